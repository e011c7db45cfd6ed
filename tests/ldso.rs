//! How memleak finds what a -c command loads (src/ldso): the same objects in the same order as
//! the system's own `ldd` lists them (run here, as root, on trusted programs and fixtures
//! only), and never by running the program's ELF interpreter (PT_INTERP) with privilege.
mod common;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn fixture_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ldso").join(name)
}

/// A fresh directory for one test's objects, readable by every user.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ldso").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// gcc `src` (a file of tests/fixtures/ldso) into `out` with `args`.
fn gcc(out: &Path, src: &str, args: &[&str]) -> PathBuf {
    std::fs::create_dir_all(out.parent().expect("a parent")).expect("mkdir");
    let st = Command::new("gcc")
        .args(["-O1", "-Wall", "-Werror", "-o"])
        .arg(out)
        .arg(fixture_src(src))
        .args(args)
        .status()
        .expect("gcc runs");
    assert!(st.success(), "gcc {src} {args:?}");
    out.to_path_buf()
}

fn write_script(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// What memleak -v says a command loads: the objects after the executable, as "path (how)".
struct Said {
    objects: Vec<(String, String)>,
    notes: Vec<String>,
    out: Finished,
}

fn memleak_says(cmd: &str, env: &[(&str, &str)]) -> Said {
    // No allocation is recorded (-z): these runs are about start-up, not reports.
    let mut c = memleak_command(&["-v", "--frame-pointers", "-z", "1000000000", "-c", cmd]);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = Proc::spawn("memleak", c).finish();
    let lines: Vec<&str> = out.stderr.lines().collect();
    let start = lines.iter().position(|l| l.contains(" loads, in symbol lookup order")).unwrap_or_else(|| {
        panic!("{cmd}: no load order in:\n{}", out.stderr);
    });
    let objects = lines[start + 1..]
        .iter()
        .map_while(|l| l.strip_prefix("memleak:   "))
        .filter(|l| !l.starts_with("interpreter "))
        .skip(1)
        .map(|l| {
            let (p, how) = l.split_once(" (").expect("path (how)");
            (p.to_string(), how.trim_end_matches(')').to_string())
        })
        .collect();
    let notes = lines.iter().filter_map(|l| l.strip_prefix("memleak: note: ")).map(str::to_string).collect();
    Said { objects, notes, out }
}

/// What ldd lists: each object's path, or "NAME => not found"; the vDSO left out.
fn ldd(prog: &Path, env: &[(&str, &str)]) -> Vec<String> {
    let out = Command::new("ldd").arg(prog).envs(env.iter().copied()).output().expect("ldd runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            match l.split_once(" => ") {
                Some((name, "not found")) => Some(format!("{name} => not found")),
                Some((_, rest)) => rest.split(" (").next().map(str::to_string),
                None if l.starts_with('/') => l.split(" (").next().map(str::to_string),
                None => None,
            }
        })
        .collect()
}

fn paths(s: &Said) -> Vec<String> {
    s.objects.iter().map(|(p, _)| p.clone()).collect()
}

#[test]
fn system_programs_load_what_ldd_lists_in_its_order() {
    let mut checked = 0;
    for (prog, args) in
        [("/bin/ls", "/"), ("/usr/bin/python3", "-c pass"), ("/usr/bin/gdb", "--version"), ("/usr/bin/node", "-e 0")]
    {
        if !Path::new(prog).exists() {
            continue;
        }
        let said = memleak_says(&format!("{prog} {args}"), &[]);
        assert_eq!(said.out.code(), Some(0), "{prog}: {}", said.out.stderr);
        let want = ldd(Path::new(prog), &[]);
        assert!(want.len() >= 3, "{prog}: {want:?}");
        assert_eq!(paths(&said), want, "{prog}");
        assert!(said.notes.is_empty(), "{prog}: {:?}", said.notes);
        checked += 1;
    }
    assert!(checked >= 3, "ls, python3 and gdb are installed by scripts/setup");
}

/// app needs liba (DT_RUNPATH $ORIGIN/lib), which needs libb (its own DT_RUNPATH $ORIGIN).
fn runpath_app(dir: &Path) -> PathBuf {
    let lib = dir.join("lib");
    let rp = "-Wl,--enable-new-dtags,-rpath,$ORIGIN";
    gcc(&lib.join("libb.so"), "libb.c", &["-shared", "-fPIC", "-Wl,-soname,libb.so"]);
    let libb = lib.join("libb.so");
    gcc(&lib.join("liba.so"), "liba.c", &["-shared", "-fPIC", "-Wl,-soname,liba.so", rp, libb.to_str().unwrap()]);
    let liba = lib.join("liba.so");
    gcc(&dir.join("app"), "app.c", &["-Wl,--enable-new-dtags,-rpath,$ORIGIN/lib", liba.to_str().unwrap()])
}

#[test]
fn runpath_origin_fixture_loads_what_ldd_lists() {
    let dir = scratch("runpath");
    let app = runpath_app(&dir);
    let said = memleak_says(app.to_str().unwrap(), &[]);
    assert_eq!(said.out.code(), Some(0), "{}", said.out.stderr);
    assert_eq!(paths(&said), ldd(&app, &[]));
    let lib = dir.join("lib");
    assert_eq!(said.objects[0], (lib.join("liba.so").display().to_string(), "DT_RUNPATH".to_string()));
    assert_eq!(said.objects[2], (lib.join("libb.so").display().to_string(), "DT_RUNPATH".to_string()));
}

#[test]
fn ld_library_path_and_ld_preload_as_ldd_sees_them() {
    let dir = scratch("env");
    let app = runpath_app(&dir);
    // A 32-bit impostor first (skipped), then a directory whose glibc-hwcaps copy is taken
    // on a CPU that has x86-64-v2, before the libb.so of DT_RUNPATH.
    let soname = ["-shared", "-fPIC", "-Wl,-soname,libb.so"];
    let alt = gcc(&dir.join("alt/libb.so"), "libb.c", &soname);
    gcc(&dir.join("alt/glibc-hwcaps/x86-64-v2/libb.so"), "libb.c", &soname);
    let mut bytes = std::fs::read(&alt).expect("read");
    bytes[4] = 1;
    std::fs::create_dir_all(dir.join("c32")).expect("mkdir");
    std::fs::write(dir.join("c32/libb.so"), bytes).expect("write");
    let libp = gcc(&dir.join("pre/libp.so"), "libp.c", &["-shared", "-fPIC"]);
    let llp = format!("{}:{}", dir.join("c32").display(), dir.join("alt").display());
    let preload = format!("{} libz.so.1", libp.display());
    let env = [("LD_LIBRARY_PATH", llp.as_str()), ("LD_PRELOAD", preload.as_str())];
    let said = memleak_says(app.to_str().unwrap(), &env);
    assert_eq!(said.out.code(), Some(0), "{}", said.out.stderr);
    let want = ldd(&app, &env);
    assert_eq!(paths(&said), want);
    assert_eq!(said.objects[0], (libp.display().to_string(), "a path, preloaded".to_string()));
    assert_eq!(said.objects[1].1, "ld.so.cache, preloaded", "{:?}", said.objects);
    let libb = said.objects.iter().find(|(p, _)| p.ends_with("/libb.so")).expect("libb");
    assert!(libb.0.starts_with(&dir.join("alt").display().to_string()), "{libb:?}");
    assert_eq!(libb.1, "LD_LIBRARY_PATH");
}

#[test]
fn a_missing_library_is_said() {
    let dir = scratch("missing");
    let app = runpath_app(&dir);
    std::fs::remove_file(dir.join("lib/libb.so")).expect("rm");
    let said = memleak_says(app.to_str().unwrap(), &[]);
    let want = ldd(&app, &[]);
    assert!(want.contains(&"libb.so => not found".to_string()), "{want:?}");
    let found: Vec<String> = want.into_iter().filter(|w| !w.ends_with("not found")).collect();
    assert_eq!(paths(&said), found);
    let liba = dir.join("lib/liba.so");
    assert_eq!(
        said.notes,
        [format!(
            "libb.so, needed by {}: cannot open shared object file: No such file or directory: the dynamic linker will not start the program",
            liba.display()
        )]
    );
    // As said: ld.so refuses to start it (exit status 127), and memleak passes that on.
    assert_eq!(said.out.code(), Some(127), "{}", said.out.stderr);
}

/// The uids a recorder wrote, one per line.
fn recorded(uids: &Path) -> Vec<String> {
    std::fs::read_to_string(uids).expect("uids").lines().map(str::to_string).collect()
}

fn run_as(prog: &Path, sudo: bool) -> Finished {
    let mut c = memleak_command(&["-c", prog.to_str().expect("utf-8")]);
    if sudo {
        c.env("SUDO_UID", "65534").env("SUDO_GID", "65534");
    }
    Proc::spawn("memleak", c).finish()
}

/// A program whose PT_INTERP is a script recording `id -u`, and a #! script run by such a
/// program: memleak (root, command run as uid 65534) runs neither interpreter; and an ELF
/// recorder as PT_INTERP, which the kernel does run: as the user, never as root.
#[test]
fn the_programs_interpreter_is_never_run_as_root() {
    let dir = scratch("recorder");
    let uids = dir.join("uids");
    std::fs::write(&uids, "").expect("create");
    std::fs::set_permissions(&uids, std::fs::Permissions::from_mode(0o666)).expect("chmod");

    let script = dir.join("recorder");
    write_script(&script, &format!("#!/bin/sh\nid -u >> {}\n", uids.display()));
    let victim = gcc(&dir.join("victim"), "hello.c", &[&format!("-Wl,--dynamic-linker={}", script.display())]);
    let via = dir.join("via-script");
    write_script(&via, &format!("#!{}\n", victim.display()));
    for prog in [&victim, &via] {
        for sudo in [true, false] {
            let out = run_as(prog, sudo);
            let err = out.stderr.trim_end();
            // The kernel would refuse a script as ELF interpreter (EIO): memleak says so first.
            assert_eq!(out.code(), Some(1), "{}: {err}", prog.display());
            assert_eq!(
                err,
                format!(
                    "memleak: cannot run {}: its ELF interpreter: {}: not an ELF file",
                    victim.display(),
                    script.display()
                )
            );
        }
    }
    assert_eq!(recorded(&uids), Vec::<String>::new(), "the script interpreter never ran");

    let elf = dir.join("elf-recorder");
    let define = format!("-DUIDS=\"{}\"", uids.display());
    gcc(&elf, "recorder.c", &["-static-pie", "-nostdlib", "-fPIE", "-fno-stack-protector", &define]);
    let victim = gcc(&dir.join("victim-elf"), "hello.c", &[&format!("-Wl,--dynamic-linker={}", elf.display())]);
    let via = dir.join("via-elf");
    write_script(&via, &format!("#!{}\n", victim.display()));
    for prog in [&victim, &via] {
        let out = run_as(prog, true);
        assert_eq!(out.code(), Some(0), "{}: {}", prog.display(), out.stderr);
        assert!(out.stderr.contains("is not glibc's dynamic linker"), "{}", out.stderr);
    }
    // Run twice, by the kernel, as the user each time.
    assert_eq!(recorded(&uids), ["65534", "65534"]);
}
