//! The allocator actually in use, found without -O: a C program with four leak sites and a C++
//! program leaking through new and new[], under glibc and under jemalloc, tcmalloc and
//! mimalloc (the Debian packages scripts/setup installs) preloaded through
//! `env LD_PRELOAD=... prog`, and the C program with jemalloc linked in: every site exact to
//! the byte and the block. Also -O by soname, a plugin's allocator loaded with dlopen, a process
//! that allocates through nothing memleak probes, and Go programs.
mod common;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const LIBDIR: &str = "/usr/lib/x86_64-linux-gnu";
/// The preloaded allocators, by file name.
const PRELOADED: &[&str] = &["libjemalloc.so.2", "libtcmalloc_minimal.so.4", "libmimalloc.so.2"];

const C_SITES: &[(&str, u64, u64)] =
    &[("leak_malloc", 300, 3), ("leak_calloc", 600, 2), ("leak_realloc", 5000, 1), ("leak_memalign", 512, 2)];
const CXX_SITES: &[(&str, u64, u64)] = &[("leak_new()", 144, 3), ("leak_new_array()", 200, 2)];

fn src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/allocators").join(name)
}

fn out_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("allocators");
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

/// Compiles `source` into `out` with `compiler` and `extra` flags (after the source: libraries).
fn build(compiler: &str, source: &str, out: &str, extra: &[&str]) -> PathBuf {
    let out = out_dir().join(out);
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let status = Command::new(compiler)
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-Wall", "-Werror", "-o"])
        .arg(&tmp)
        .arg(src(source))
        .args(extra)
        .status()
        .expect("the compiler runs");
    assert!(status.success(), "{compiler} {source} {extra:?} failed");
    std::fs::rename(&tmp, &out).expect("rename into place");
    out
}

fn c_program() -> PathBuf {
    static P: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    P.get_or_init(|| build("gcc", "leaks.c", "leaks", &[])).clone()
}

fn cxx_program() -> PathBuf {
    static P: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    P.get_or_init(|| build("g++", "leaks.cpp", "leaks_cxx", &[])).clone()
}

/// `memleak ARGS -c CMD` to its end: exit status 0; its output.
fn run_c(args: &[&str], cmd: &str) -> Finished {
    let mut all = args.to_vec();
    all.extend(["-T", "100", "-c", cmd]);
    let out = memleak(&all).finish();
    assert_eq!(out.code(), Some(0), "memleak {all:?}:\n{}\n{}", out.stdout.join("\n"), out.stderr);
    out
}

/// The final report's stacks that come from `exe`'s own code (first frame in it), as
/// (function, bytes, count): runtimes' own start-up allocations (libstdc++'s exception pool,
/// tcmalloc's registration) are left aside.
fn own_sites(out: &Finished, exe: &Path) -> Vec<(String, u64, u64)> {
    let r = final_report(&out.stdout);
    let exe = exe.to_string_lossy();
    let mut v: Vec<_> =
        r.stacks.iter().filter(|s| s.module(0) == exe).map(|s| (s.func(0).to_string(), s.bytes, s.count)).collect();
    v.sort();
    v
}

/// The `Tracing ...` line of `object` (a path's end) on stderr.
fn tracing_line<'a>(stderr: &'a str, object: &str) -> &'a str {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("Tracing ") && l.contains(&format!("{object} (pid ")))
        .unwrap_or_else(|| panic!("no Tracing line for {object} in:\n{stderr}"))
}

/// The preloaded case's command line.
fn preloaded(lib: &str, prog: &Path) -> String {
    format!("env LD_PRELOAD={LIBDIR}/{lib} {}", prog.display())
}

#[test]
fn c_program_under_glibc_and_each_preloaded_allocator() {
    let prog = c_program();
    let plain = run_c(&[], prog.to_str().unwrap());
    assert_eq!(own_sites(&plain, &prog), expected(C_SITES), "{}", plain.stdout.join("\n"));
    assert!(tracing_line(&plain.stderr, "libc.so.6").starts_with("Tracing malloc, calloc, realloc"));
    for lib in PRELOADED {
        let out = run_c(&[], &preloaded(lib, &prog));
        let text = out.stdout.join("\n");
        assert_eq!(own_sites(&out, &prog), expected(C_SITES), "{lib}:\n{text}\n{}", out.stderr);
        // The allocator binds malloc: its line lists it first; libc's own malloc is said to be
        // overridden by it.
        assert!(tracing_line(&out.stderr, lib).starts_with("Tracing malloc, calloc, realloc"), "{}", out.stderr);
        let libc = tracing_line(&out.stderr, "libc.so.6");
        assert!(libc.contains("also its own malloc") && libc.contains(&format!("which {lib}")), "{libc}");
        let r = final_report(&out.stdout);
        assert!(r.warnings.is_empty(), "{lib}: {:?}", r.warnings);
        // No mapping of the allocator's own: every stack holds what the program or a runtime
        // asked for, none the arenas behind it.
        assert!(r.total_bytes() < 200_000, "{lib}: {} bytes:\n{text}", r.total_bytes());
    }
}

#[test]
fn cxx_program_under_glibc_and_each_preloaded_allocator() {
    let prog = cxx_program();
    let plain = run_c(&[], prog.to_str().unwrap());
    assert_eq!(own_sites(&plain, &prog), expected(CXX_SITES), "{}", plain.stdout.join("\n"));
    // libstdc++'s own operator new, which calls malloc: counted once, at the new.
    assert!(tracing_line(&plain.stderr, "libstdc++.so.6").contains("operator new/delete"), "{}", plain.stderr);
    for lib in PRELOADED {
        let out = run_c(&[], &preloaded(lib, &prog));
        assert_eq!(own_sites(&out, &prog), expected(CXX_SITES), "{lib}:\n{}\n{}", out.stdout.join("\n"), out.stderr);
        // These allocators export their own operator new and delete, which win over libstdc++'s.
        assert!(tracing_line(&out.stderr, lib).contains("operator new/delete"), "{}", out.stderr);
        // (mimalloc lacks the 4 nothrow forms of delete: libstdc++ binds those.)
        let std = tracing_line(&out.stderr, "libstdc++.so.6");
        assert!(std.contains("its own operator new/delete") && std.contains(&format!("which {lib}")), "{std}");
    }
}

#[test]
fn jemalloc_linked_into_the_executable() {
    // As a library the executable needs (DT_NEEDED), and linked in statically.
    let dynamic = build("gcc", "leaks.c", "leaks_ljemalloc", &["-ljemalloc"]);
    let out = run_c(&[], dynamic.to_str().unwrap());
    assert_eq!(own_sites(&out, &dynamic), expected(C_SITES), "{}", out.stdout.join("\n"));
    assert!(tracing_line(&out.stderr, "libjemalloc.so.2").starts_with("Tracing malloc, "), "{}", out.stderr);

    let archive = format!("{LIBDIR}/libjemalloc_pic.a");
    let linked_in = build("gcc", "leaks.c", "leaks_jemalloc_static", &[&archive, "-lpthread", "-lm", "-ldl"]);
    let out = run_c(&[], linked_in.to_str().unwrap());
    let sites: Vec<_> = own_sites(&out, &linked_in).into_iter().filter(|s| s.0.starts_with("leak_")).collect();
    assert_eq!(sites, expected(C_SITES), "{}", out.stdout.join("\n"));
    let name = linked_in.file_name().unwrap().to_string_lossy();
    let line = tracing_line(&out.stderr, &name);
    assert!(line.starts_with("Tracing malloc, ") && line.contains("mallocx"), "{line}");
    // libc's malloc is there too, overridden by the executable's.
    assert!(tracing_line(&out.stderr, "libc.so.6").contains(&format!("which {name} override")), "{}", out.stderr);
}

/// The sites glibc's run reports are valgrind's (still reachable: the blocks are kept in a
/// static array), to the byte.
#[test]
fn c_program_sites_agree_with_valgrind() {
    let prog = c_program();
    let out = Command::new("valgrind")
        .args(["--leak-check=full", "--show-leak-kinds=all"])
        .arg(&prog)
        .output()
        .expect("valgrind runs (scripts/setup installs it)");
    let text = String::from_utf8_lossy(&out.stderr);
    // "==1== 300 bytes in 3 blocks are still reachable in loss record 1 of 4" then its frames.
    let mut theirs = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let Some(rest) = l.split_once("== ").map(|x| x.1).filter(|r| r.contains(" in loss record ")) else { continue };
        let mut w = rest.split_whitespace();
        let bytes: u64 = w.next().unwrap().replace(',', "").parse().unwrap();
        let blocks: u64 = w.nth(2).unwrap().replace(',', "").parse().unwrap();
        let site = lines[i + 1..]
            .iter()
            .take_while(|f| f.contains(" at 0x") || f.contains(" by 0x"))
            .find_map(|f| f.split(": ").nth(1).and_then(|s| s.split(' ').next()).filter(|s| s.starts_with("leak_")))
            .unwrap_or_else(|| panic!("no fixture frame under {l}:\n{text}"));
        theirs.push((site.to_string(), bytes, blocks));
    }
    theirs.sort();
    assert_eq!(theirs, expected(C_SITES), "{text}");
    let ours = run_c(&[], prog.to_str().unwrap());
    assert_eq!(own_sites(&ours, &prog), theirs);
}

/// The cookie's meaning reaches the BPF program in every attach mode.
#[test]
fn every_attach_mode_reads_the_cookie() {
    let prog = c_program();
    for attach in ["session", "multi"] {
        let out = run_c(&["--attach", attach], &preloaded("libjemalloc.so.2", &prog));
        assert_eq!(own_sites(&out, &prog), expected(C_SITES), "{attach}:\n{}", out.stdout.join("\n"));
    }
    // Classic uprobes take a link per probe (slow to close): glibc alone.
    let out = run_c(&["--attach", "classic"], prog.to_str().unwrap());
    assert_eq!(own_sites(&out, &prog), expected(C_SITES), "classic:\n{}", out.stdout.join("\n"));
}

/// The C program started with jemalloc preloaded and waiting on stdin.
fn waiting_c_program(preload: Option<&str>) -> Proc {
    let mut cmd = Command::new(c_program());
    cmd.arg("wait");
    if let Some(lib) = preload {
        cmd.env("LD_PRELOAD", format!("{LIBDIR}/{lib}"));
    }
    let mut p = Proc::spawn("leaks", cmd);
    p.expect("ready", |l| l.starts_with("ready "));
    p
}

#[test]
fn obj_by_soname_under_p() {
    let mut p = waiting_c_program(Some("libjemalloc.so.2"));
    let pid = p.pid().to_string();
    let m = memleak_attached(&["-T", "100", "-p", &pid, "-O", "libjemalloc.so.2"]);
    p.send("");
    p.expect_line("leaked");
    p.send("");
    assert_eq!(p.finish().code(), Some(0));
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(own_sites(&out, &c_program()), expected(C_SITES), "{}", out.stdout.join("\n"));
    // -O: that object alone.
    let lines: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("Tracing ")).collect();
    assert_eq!(lines.len(), 1, "{}", out.stderr);
    assert!(lines[0].contains(&format!("{LIBDIR}/libjemalloc.so.2 (pid {pid})")), "{}", lines[0]);
}

#[test]
fn obj_not_mapped_is_an_error() {
    let mut p = waiting_c_program(None);
    let pid = p.pid().to_string();
    for obj in ["libjemalloc.so.2", &format!("{LIBDIR}/libjemalloc.so.2")] {
        let out = memleak_output(&["-p", &pid, "-O", obj]);
        let err = out.stderr.trim_end();
        assert_eq!(out.code(), Some(1), "{err}");
        assert_eq!(err, format!("memleak: -O {obj}: not mapped by process {pid}"));
    }
    p.send("");
    p.expect_line("leaked");
    p.send("");
    assert_eq!(p.finish().code(), Some(0));
}

/// Under -c, an object -O names may come later (dlopen); if it never does, memleak says so.
#[test]
fn obj_never_loaded_under_c_is_said() {
    let out = run_c(&["-O", "libjemalloc.so.2"], c_program().to_str().unwrap());
    assert!(
        out.stderr.contains("memleak: note: -O libjemalloc.so.2: no traced process loaded it: nothing was traced"),
        "{}",
        out.stderr
    );
}

fn plugin() -> (PathBuf, PathBuf) {
    static P: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let lib = build("gcc", "plugin.c", "libplugin.so", &["-shared", "-fPIC", "-lmimalloc"]);
        let main = build("gcc", "dlopen_main.c", "dlopen_main", &["-ldl"]);
        (main, lib)
    })
    .clone()
}

/// A plugin loaded with dlopen brings mimalloc: its mi_malloc calls are traced, under -c from
/// the first one (its constructor's: the command waits at the dlopen until the probes are in).
#[test]
fn a_plugins_allocator_arrives_with_dlopen() {
    let (main, lib) = plugin();
    let out = run_c(&[], &format!("{} {}", main.display(), lib.display()));
    let r = final_report(&out.stdout);
    let lib_name = lib.to_string_lossy();
    let mut sites: Vec<_> = r
        .stacks
        .iter()
        .filter(|s| s.module(0) == lib_name)
        .map(|s| (s.func(0).to_string(), s.bytes, s.count))
        .collect();
    sites.sort();
    assert_eq!(sites, expected(&[("plugin_init", 1000, 1), ("plugin_leak", 192, 3)]), "{}", out.stdout.join("\n"));
    let line = tracing_line(&out.stderr, "libmimalloc.so.2.0");
    assert!(line.contains("mi_*") && !line.contains("after it was loaded"), "{line}");
}

/// Under -p the plugin's allocator is probed once memleak has seen the dlopen: its later calls
/// are traced, and the line says from when.
#[test]
fn a_plugins_allocator_arrives_with_dlopen_under_p() {
    let (main, lib) = plugin();
    let mut cmd = Command::new(&main);
    cmd.arg(&lib).arg("wait");
    let mut p = Proc::spawn("dlopen_main", cmd);
    p.expect("ready", |l| l.starts_with("ready "));
    let pid = p.pid().to_string();
    let mut m = memleak(&["-T", "100", "-p", &pid]);
    m.expect("Attaching", |l| l.starts_with("Attaching to pid "));
    p.send("");
    p.expect_line("loaded");
    // memleak's stderr is read at the end: wait until the probes are surely in place.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    p.send("");
    p.expect_line("leaked");
    p.send("");
    assert_eq!(p.finish().code(), Some(0));
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let r = final_report(&out.stdout);
    let leak: Vec<_> = r.stacks_in("plugin_leak").iter().map(|s| (s.bytes, s.count)).collect();
    assert_eq!(leak, [(192, 3)], "{}", out.stdout.join("\n"));
    let line = tracing_line(&out.stderr, "libmimalloc.so.2.0");
    assert!(line.contains("ms after it was loaded (calls before were not seen)"), "{line}");
}

/// A process whose allocations bypass every probe gets a WARNING naming what was probed, not a
/// clean report.
#[test]
fn allocations_that_bypass_the_probes_are_warned_of() {
    let prog = build("gcc", "bypass.c", "bypass", &[]);
    let out = run_c(&[], prog.to_str().unwrap());
    let r = final_report(&out.stdout);
    assert!(r.stacks.is_empty(), "{:?}", r.stacks);
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    let w = &r.warnings[0];
    assert!(w.starts_with("no allocation call seen from pid "), "{w}");
    assert!(w.ends_with("(probed: the allocator functions of libc.so.6)"), "{w}");
    // A program that allocates gets none.
    let fine = run_c(&[], c_program().to_str().unwrap());
    assert!(final_report(&fine.stdout).warnings.is_empty());
}

fn go_build(out: &str, cgo: bool) -> PathBuf {
    let dir = out_dir().join("go");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let bin = dir.join(out);
    let mut cmd = Command::new("go");
    cmd.args(["build", "-o"]).arg(&bin);
    if cgo {
        cmd.arg("-ldflags=-linkmode=external");
    }
    let status = cmd
        .arg(src("goleak.go"))
        .env("CGO_ENABLED", if cgo { "1" } else { "0" })
        .env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("path"))
        .env("GO111MODULE", "off")
        .env("HOME", &dir)
        .status()
        .expect("go runs (golang-go, installed by scripts/setup)");
    assert!(status.success(), "go build {out}");
    bin
}

#[test]
fn go_programs_say_what_is_not_traced() {
    let pure = go_build("goleak", false);
    let out = memleak_output(&["-c", pure.to_str().unwrap()]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert_eq!(
        out.stderr.trim_end(),
        format!(
            "memleak: {} is a Go program without cgo: Go's own allocator is not traced (cgo's malloc is), and it has no C allocator",
            pure.display()
        )
    );
    let cgo = go_build("goleak_cgo", true);
    let out = run_c(&[], cgo.to_str().unwrap());
    let notes: Vec<&str> = out.stderr.lines().filter(|l| l.contains("is a Go program")).collect();
    assert_eq!(
        notes,
        [format!(
            "memleak: note: {} is a Go program: Go's own allocator is not traced (cgo's malloc is)",
            cgo.display()
        )],
        "{}",
        out.stderr
    );
}

/// The allocators' malloc and free are probed on instructions the kernel emulates (a
/// single-stepped probe costs about 10 us a call here): jemalloc's free and mimalloc's malloc
/// copy or keep their argument in another register before the first such instruction, and
/// the probe reads it there.
#[test]
fn allocator_entry_points_are_not_single_stepped() {
    let prog = c_program();
    for lib in PRELOADED {
        let out = run_c(&["-v"], &preloaded(lib, &prog));
        // The allocator's own lines follow its "attached to" line.
        let at = out.stderr.find(&format!("attached to {LIBDIR}/{lib}")).unwrap_or_else(|| panic!("{}", out.stderr));
        let own: Vec<&str> = out.stderr[at..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("memleak:   "))
            .filter(|l| {
                let names = l.split_whitespace().nth(1).unwrap_or("");
                ["malloc", "free", "realloc", "_Znwm", "_ZdlPv"].contains(&names.split('/').next().unwrap_or(""))
            })
            .collect();
        assert!(own.len() >= 4, "{lib}: {own:#?}\n{}", out.stderr);
        for l in own {
            assert!(!l.contains("single-stepped"), "{lib}: {l}");
        }
    }
}

/// The same programs with each allocator below memleak's preload library (appended to the
/// LD_PRELOAD memleak gave, as a user's own preload is; `env LD_PRELOAD=...` above replaces it,
/// and so runs on uprobes): recorded in-process, forwarded to that allocator, every site exact.
#[test]
fn each_allocator_below_the_preload_library() {
    for (prog, sites) in [(c_program(), C_SITES), (cxx_program(), CXX_SITES)] {
        for lib in PRELOADED {
            let cmd = format!("sh -c 'LD_PRELOAD=\"$LD_PRELOAD:{LIBDIR}/{lib}\" exec {}'", prog.display());
            let out = run_c(&["-v", "--capture", "preload"], &cmd);
            let text = format!("{}\n{}", out.stdout.join("\n"), out.stderr);
            assert_eq!(own_sites(&out, &prog), expected(sites), "{lib}:\n{text}");
            assert!(out.stderr.contains("memleak: capture: in-process (preload library) for pid "), "{lib}:\n{text}");
            assert!(!out.stderr.contains("traced with uprobes"), "{lib}:\n{text}");
            // The allocator really is below: its file is mapped, and nothing was lost.
            let r = final_report(&out.stdout);
            assert!(r.warnings.is_empty(), "{lib}: {:?}", r.warnings);
            assert!(out.stderr.contains(&format!("{LIBDIR}/{lib}")), "{lib} not loaded:\n{text}");
        }
    }
}
