//! Symbols (issue 8, items 2, 10, 11), as root with real processes and real BPF:
//! - a process that replaces its library's file by a symlink to a root-only ELF, or by a FIFO,
//!   gets neither that file's symbols printed nor memleak stuck: mapped files are read only
//!   through /proc/PID/map_files (src/objects.rs) and debug links are not followed;
//! - C++ names print as c++filt prints them, C names as written (src/demangle.rs);
//! - a library loaded and unloaded in a loop is symbolized on every run, and two libraries
//!   loaded at the same address are told apart (frames located per object in BPF).
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;

use common::{Proc, Report, Stack, final_report, memleak_attached};

fn fixture_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/symbols").join(name)
}

/// A scratch directory for one test.
fn out_dir(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("symbols-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

fn run(cmd: &mut Command) {
    let st = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(st.success(), "{cmd:?} failed");
}

fn build(compiler: &str, args: &[&str], src: &Path, out: &Path) -> PathBuf {
    run(Command::new(compiler).args(args).arg("-o").arg(out).arg(src));
    out.to_path_buf()
}

/// The dlloop library built as `lib<name>.so`: functions `<name>_leak`, `<name>_leak_inner`.
fn dl_lib(dir: &Path, name: &str) -> PathBuf {
    build(
        "gcc",
        &["-O2", "-g", "-fomit-frame-pointer", "-shared", "-fPIC", &format!("-DLIB={name}")],
        &fixture_src("dlloop_lib.c"),
        &dir.join(format!("lib{name}.so")),
    )
}

/// Starts a fixture that says "ready PID" first, and waits for that line.
fn start(exe: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    let mut p = Proc::spawn(&exe.file_name().unwrap().to_string_lossy(), cmd);
    let pid = p.pid();
    p.expect_line(&format!("ready {pid}"));
    p
}

/// Runs memleak -p on a started fixture: `go` is sent once attached, `until` awaited, then
/// "end"; returns memleak's final report and its whole output.
fn trace_pid(mut fx: Proc, until: &str) -> (Report, Vec<String>) {
    let pid = fx.pid().to_string();
    let m = memleak_attached(&["-p", &pid]);
    fx.send("go");
    fx.expect_line(until);
    fx.send("end");
    assert!(fx.finish().status.success(), "the fixture exits 0");
    // A memleak stuck (in an open, say) fails here, after EXIT_TIMEOUT.
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "memleak's exit status; stderr: {}", out.stderr);
    (final_report(&out.stdout), out.stdout)
}

/// The stacks whose first frame is in `func`, with their total (bytes, allocations).
fn totals(r: &Report, func: &str) -> (Vec<Stack>, u64, u64) {
    let s: Vec<Stack> = r.stacks_in(func).into_iter().cloned().collect();
    let (b, c) = s.iter().fold((0, 0), |a, s| (a.0 + s.bytes, a.1 + s.count));
    (s, b, c)
}

// ---- Item 2: files the target controls

/// The swap fixture's library (stripped of its DWARF, with a .gnu_debuglink to swap.debug
/// beside it), and a root-only library with the same code under other names (priv_*).
fn swap_setup(test: &str) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = out_dir(test);
    let lib = dl_lib(&dir, "swap");
    let debug = dir.join("swap.debug");
    run(Command::new("objcopy").arg("--only-keep-debug").arg(&lib).arg(&debug));
    run(Command::new("objcopy").arg("--strip-debug").arg("--add-gnu-debuglink").arg(&debug).arg(&lib));
    let private = dir.join("private");
    std::fs::create_dir_all(&private).unwrap();
    let secret = dl_lib(&private, "priv");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let exe = build("gcc", &["-O2", "-g", "-ldl"], &fixture_src("swap.c"), &dir.join("swap"));
    (exe, lib, debug, secret)
}

/// The process replaces its library (and the debug file it links to) after memleak has
/// attached and seen it mapped, then leaks through it: the frames come from the file mapped,
/// printed under its path as the process sees it (deleted), and nothing of the other file.
fn swapped_library_is_read_from_the_mapping(mode: &str) {
    let (exe, lib, debug, secret) = swap_setup(mode);
    let (l, d, s) = (lib.to_str().unwrap(), debug.to_str().unwrap(), secret.to_str().unwrap());
    let fx = start(&exe, &[l, d, mode, s]);
    let (r, out) = trace_pid(fx, "leaked");
    let (stacks, bytes, count) = totals(&r, "swap_leak_inner");
    assert_eq!((bytes, count), (56, 1), "{r:#?}");
    let st = &stacks[0];
    assert_eq!(st.func(1), "swap_leak", "{st:#?}");
    // Named as memleak first saw it mapped, when it attached.
    assert_eq!(st.module(0), l, "{st:#?}");
    assert!(st.frames.iter().any(|f| f.starts_with("main+0x")), "{st:#?}");
    for line in &out {
        assert!(!line.contains("priv_"), "a symbol of the root-only file printed: {line}");
    }
}

#[test]
fn a_library_swapped_for_a_symlink_to_a_root_only_elf_prints_none_of_its_symbols() {
    swapped_library_is_read_from_the_mapping("symlink");
}

#[test]
fn a_library_swapped_for_a_fifo_leaves_memleak_free() {
    swapped_library_is_read_from_the_mapping("fifo");
}

// ---- Item 10: names

#[test]
fn c_functions_named_like_type_codes_print_as_written() {
    let dir = out_dir("cnames");
    let exe = build("gcc", &["-O0", "-g", "-fno-omit-frame-pointer"], &fixture_src("names.c"), &dir.join("names"));
    let out = common::memleak_output(&["-c", exe.to_str().unwrap()]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let r = final_report(&out.stdout);
    let (stacks, bytes, count) = totals(&r, "v");
    assert_eq!((bytes, count), (24, 1), "{r:#?}");
    assert_eq!(stacks[0].names()[..4], ["v", "i", "f", "main"], "{:#?}", stacks[0]);
    // libc is read through /proc/self/fd/N; its lines come from libc6-dbg's debug file, found
    // by build-id.
    let start = stacks[0].frames.iter().find(|f| f.starts_with("__libc_start_call_main+0x")).expect("libc frame");
    assert!(start.contains("libc_start_call_main.h:"), "{start}");
}

/// Raw symbol names of an object: its symbol tables and, with DWARF, every function's name
/// and linkage name (inlined functions have no symbol of their own).
fn raw_names(obj: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for args in [&["--defined-only"][..], &["-D", "--defined-only"][..]] {
        let o = Command::new("nm").args(args).arg(obj).output().expect("nm runs");
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some(n) = l.split_whitespace().nth(2) {
                names.insert(n.split('@').next().unwrap().to_string());
            }
        }
    }
    let o = Command::new("objdump").arg("--dwarf=info").arg(obj).output().expect("objdump runs");
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        if (l.contains("DW_AT_linkage_name") || l.contains("DW_AT_name"))
            && let Some((_, v)) = l.rsplit_once(": ")
        {
            names.insert(v.trim().to_string());
        }
    }
    names
}

/// c++filt's output for each name, in one run.
fn cxxfilt(names: &BTreeSet<String>) -> BTreeSet<String> {
    let mut child = Command::new("c++filt").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("c++filt");
    let input: String = names.iter().map(|n| format!("{n}\n")).collect();
    let mut stdin = child.stdin.take().unwrap();
    let w = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

#[test]
fn cxx_names_print_as_cxxfilt_prints_them() {
    let dir = out_dir("cxx");
    let libstdcxx = std::fs::canonicalize("/usr/lib/x86_64-linux-gnu/libstdc++.so.6").unwrap();
    let std_names = cxxfilt(&raw_names(&libstdcxx));
    let make_shared = "std::shared_ptr<std::enable_if<!std::is_array<int>::value, int>::type> \
                       std::make_shared<int, int>(int&&)";
    for opt in ["-O0", "-O2"] {
        let exe = build("g++", &[opt, "-g", "-pthread"], &fixture_src("cxx_names.cpp"), &dir.join(format!("cxx{opt}")));
        let expected = cxxfilt(&raw_names(&exe));
        let out = common::memleak_output(&["-c", exe.to_str().unwrap()]);
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        let r = final_report(&out.stdout);
        let (mut checked, mut seen) = (0, BTreeSet::new());
        for s in &r.stacks {
            for (i, f) in s.frames.iter().enumerate() {
                let name = common::frame_function(f);
                assert!(!name.starts_with("_Z") && !name.starts_with("_R"), "{opt}: mangled: {f}");
                let module = s.module(i);
                let names = if module == exe.to_str().unwrap() {
                    &expected
                } else if module.contains("libstdc++") {
                    &std_names
                } else {
                    continue;
                };
                if name == "[unknown]" {
                    continue;
                }
                assert!(names.contains(name), "{opt}: {name:?} is not c++filt's output of any name of {module}");
                checked += 1;
                seen.insert(name.to_string());
            }
        }
        assert!(checked > 20, "{opt}: {checked} frames checked");
        assert!(seen.contains(make_shared), "{opt}: no make_shared<int, int> frame in {seen:#?}");
        assert!(
            seen.iter().any(|n| n.starts_with("std::future<") && n.contains(" std::async<")),
            "{opt}: no std::async frame in {seen:#?}"
        );
        assert!(seen.contains("operator new(unsigned long)"), "{opt}: {seen:#?}");
    }
}

// ---- Item 11: libraries loaded and unloaded

/// How a report names an object it could not read: by its device and inode.
fn unread_name(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).unwrap();
    let (major, minor) = (libc::major(md.dev()), libc::minor(md.dev()));
    format!("device {major}:{minor} inode {}", md.ino())
}

/// Two libraries, the same code under other names, loaded in turn (at the same address, as
/// each is unloaded before the next), 100 times each, while memleak -p traces; four runs. Each
/// library's 100 leaks are in stacks of its own: symbolized from its file, or, when memleak
/// never found it mapped (it is mapped for microseconds at a time), printed by its device and
/// inode with the reason. A walk that met a library before its unwind table was in stops
/// there, and the report says so.
#[test]
fn a_library_loaded_and_unloaded_in_a_loop_is_symbolized_every_run() {
    let dir = out_dir("dlloop");
    let (a, b) = (dl_lib(&dir, "a"), dl_lib(&dir, "b"));
    let exe = build("gcc", &["-O2", "-g", "-ldl"], &fixture_src("dlloop.c"), &dir.join("dlloop"));
    let mut unread = 0;
    for run in 0..4 {
        let fx = start(&exe, &["100", a.to_str().unwrap(), b.to_str().unwrap()]);
        let (r, _) = trace_pid(fx, "looped");
        for (lib, name) in [(&a, "a"), (&b, "b")] {
            let inner = format!("{name}_leak_inner");
            let (stacks, bytes, count) = totals(&r, &inner);
            // Named by its path if memleak saw it in the process's maps, else by device and inode.
            let named = [unread_name(lib), lib.display().to_string()].map(|n| format!("[unknown] [{n}] ("));
            let not_read: Vec<&Stack> =
                r.stacks.iter().filter(|s| named.iter().any(|n| s.frames[0].starts_with(n))).collect();
            for s in &not_read {
                assert!(s.frames[0].ends_with("[not readable: unmapped before memleak could open it]"), "{s:#?}");
                unread += s.count;
            }
            let (nb, nc) = not_read.iter().fold((0, 0), |a, s| (a.0 + s.bytes, a.1 + s.count));
            assert_eq!((bytes + nb, count + nc), (4000, 100), "run {run}, lib{name}: {r:#?}");
            for s in &stacks {
                assert_eq!(s.module(0), lib.to_str().unwrap(), "run {run}: {s:#?}");
                let full = [inner.clone(), format!("{name}_leak"), "load_and_leak".into(), "main".into()];
                if s.frames.len() == 1 {
                    assert!(
                        r.warnings.iter().any(|w| w.contains("in an object without an unwind table yet")),
                        "run {run}: a stack ended early without saying why: {r:#?}"
                    );
                } else {
                    assert_eq!(s.names()[..4], full, "run {run}: {s:#?}");
                    assert_eq!(s.module(1), lib.to_str().unwrap());
                }
            }
        }
        // Every frame of every stack has a name, or says why it cannot have one.
        for f in r.stacks.iter().flat_map(|s| &s.frames) {
            assert!(!f.starts_with("[unknown] [unknown]") || f.contains("[not readable: "), "run {run}: {f}");
        }
    }
    eprintln!("allocations in a library memleak never found mapped, over 4 runs: {unread} of 800");
}
