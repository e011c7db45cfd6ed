//! Stacks without frame pointers (issue 5): the same call chains built with and without frame
//! pointers must give the same stacks, and match gdb's. Runs memleak as root against fixture
//! programs compiled here (tests/fixtures/unwind/), with real BPF.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod common;

use common::{Stack, final_report, parse_reports};

const MEMLEAK: &str = env!("CARGO_BIN_EXE_memleak");
/// Generous: the machine is a loaded 2-core VM.
const WAIT: Duration = Duration::from_secs(120);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unwind").join(name)
}

/// A scratch directory for this test's binaries.
fn out_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("memleak-unwind-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn build(compiler: &str, args: &[&str], src: &Path, out: &Path) -> PathBuf {
    let st = Command::new(compiler).args(args).arg("-o").arg(out).arg(src).status().expect("compiler runs");
    assert!(st.success(), "{compiler} {args:?} {} failed", src.display());
    out.to_path_buf()
}

fn lines(out: &str) -> Vec<String> {
    out.lines().map(String::from).collect()
}

/// The dlopen fixture, -O2 without frame pointers: its library and the program that loads it.
fn build_dlopen_fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let lib = build(
        "gcc",
        &["-O2", "-g", "-fomit-frame-pointer", "-shared", "-fPIC"],
        &fixture("dl_lib.c"),
        &dir.join("libdl_fixture.so"),
    );
    let main = build("gcc", &["-O2", "-g", "-fomit-frame-pointer"], &fixture("dl_main.c"), &dir.join("dl_main"));
    (lib, main)
}

/// Runs `memleak -c cmd` to the command's exit; returns the final report.
fn trace(cmd: &str, extra: &[&str]) -> (Vec<Stack>, Vec<String>) {
    let args = [extra, &["-c", cmd]].concat();
    let out = common::memleak_command(&args).output().expect("memleak runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "memleak -c {cmd}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let r = final_report(&lines(&stdout));
    (r.stacks, r.warnings)
}

/// Bytes and allocations by the stack's function names.
fn by_names(stacks: &[Stack]) -> BTreeMap<Vec<String>, (u64, u64)> {
    let mut m = BTreeMap::new();
    for s in stacks {
        let e = m.entry(s.names()).or_insert((0, 0));
        e.0 += s.bytes;
        e.1 += s.count;
    }
    m
}

/// The (bytes, allocations) of the stacks whose names begin with `prefix`.
fn leaked_from(stacks: &[Stack], prefix: &[&str]) -> (u64, u64) {
    by_names(stacks)
        .iter()
        .filter(|(n, _)| n.len() >= prefix.len() && n.iter().zip(prefix).all(|(a, b)| a == b))
        .fold((0, 0), |acc, (_, v)| (acc.0 + v.0, acc.1 + v.1))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The line of the first occurrence of `needle` in a fixture source.
fn line_of(src: &str, needle: &str) -> usize {
    let text = std::fs::read_to_string(fixture(src)).unwrap();
    text.lines().position(|l| l.contains(needle)).expect("needle in source") + 1
}

const LIBC_START: [&str; 3] = ["__libc_start_call_main", "__libc_start_main", "_start"];

fn c_builds(test: &str) -> [PathBuf; 3] {
    let dir = out_dir(test);
    let src = fixture("chain.c");
    let common = ["-O2", "-g", "-pthread"];
    [
        build("gcc", &[&common[..], &["-fno-omit-frame-pointer"]].concat(), &src, &dir.join("chain_fp")),
        build("gcc", &[&common[..], &["-fomit-frame-pointer"]].concat(), &src, &dir.join("chain_nofp")),
        build("gcc", &[&common[..], &["-fomit-frame-pointer", "-no-pie"]].concat(), &src, &dir.join("chain_nopie")),
    ]
}

#[test]
fn c_chains_are_the_same_with_and_without_frame_pointers_pie_or_not() {
    let builds = c_builds("c");
    let reports: Vec<_> = builds.iter().map(|b| trace(&format!("{} thread", b.display()), &[])).collect();
    let level4_line = line_of("chain.c", "NOINLINE char *level4");
    for ((stacks, warnings), bin) in reports.iter().zip(&builds) {
        assert!(warnings.is_empty(), "{}: {warnings:?}", bin.display());
        let chain = [&["level4", "level3", "level2", "level1", "main"][..], &LIBC_START[..]].concat();
        assert_eq!(leaked_from(stacks, &chain), (300, 3), "{}: {stacks:#?}", bin.display());
        let dup = [&["dup4", "dup3", "dup2", "dup1", "main"][..], &LIBC_START[..]].concat();
        let strdup: Vec<_> = stacks.iter().filter(|s| s.names()[1..] == dup[..]).collect();
        assert_eq!(strdup.iter().map(|s| (s.bytes, s.count)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1)), (80, 2));
        assert!(strdup.iter().all(|s| s.names()[0].contains("strdup")), "{strdup:#?}");
        // The qsort callback: through libc's sort and back into the program.
        let sort = by_names(stacks).into_iter().find(|(n, _)| n[0] == "by_value").expect("the qsort stack");
        assert_eq!(sort.1, (24, 1));
        let i = sort.0.iter().position(|n| n == "sort_outer").expect("sort_outer below qsort");
        assert!(sort.0[1..i].iter().any(|n| n.contains("qsort")), "{:?}", sort.0);
        assert_eq!(sort.0[i + 1..], [&["main"][..], &LIBC_START[..]].concat()[..]);
        // The second thread ends at clone3, its outermost frame.
        let thread = strings(&["level4", "level3", "level2", "level1", "worker", "start_thread", "clone3"]);
        assert_eq!(by_names(stacks).get(&thread), Some(&(100, 1)), "{}: {stacks:#?}", bin.display());
        // file:line from DWARF, for the program and for libc (libc6-dbg).
        let level4 = stacks.iter().flat_map(|s| &s.frames).find(|f| f.starts_with("level4+")).unwrap();
        assert!(level4.ends_with(&format!("chain.c:{level4_line}")), "{level4}");
        let start_main = stacks.iter().flat_map(|s| &s.frames).find(|f| f.starts_with("__libc_start_main+"));
        assert!(start_main.unwrap().contains("libc-start.c:"), "{start_main:?}");
    }
    assert_eq!(by_names(&reports[0].0), by_names(&reports[1].0), "with vs without frame pointers");
    assert_eq!(by_names(&reports[1].0), by_names(&reports[2].0), "PIE vs non-PIE");
}

#[test]
fn frame_pointer_walk_loses_callers_the_tables_find() {
    let [_, nofp, _] = c_builds("fpwalk");
    let (stacks, _) = trace(&nofp.display().to_string(), &["--frame-pointers"]);
    let chain = [&["level4", "level3", "level2", "level1", "main"][..], &LIBC_START[..]].concat();
    assert_eq!(leaked_from(&stacks, &chain), (0, 0), "the old walk found the whole chain: {stacks:#?}");
    // It still sees the direct caller: the return address at the top of the stack.
    assert_eq!(leaked_from(&stacks, &["level4"]), (300, 3), "{stacks:#?}");
}

#[test]
fn c_chain_matches_gdb_backtrace() {
    let [_, nofp, _] = c_builds("gdb");
    let gdb = Command::new("gdb")
        .args([
            "-batch",
            "-nx",
            "-ex",
            "break main",
            "-ex",
            "run",
            "-ex",
            "break malloc",
            "-ex",
            "continue",
            "-ex",
            "bt",
        ])
        .arg(&nofp)
        .stdin(Stdio::null())
        .output()
        .expect("gdb runs");
    let text = String::from_utf8_lossy(&gdb.stdout);
    // "#1  0x000055555555527c in level4 (n=<optimized out>) at chain.c:21"
    let frames: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.split_once("  ")?.1;
            let rest = rest.split_once(" in ").map_or(rest, |(_, r)| r);
            Some(rest.split(' ').next()?.to_string())
        })
        .collect();
    assert!(frames.len() > 5 && frames[0].contains("malloc"), "gdb bt: {text}");
    let (stacks, _) = trace(&nofp.display().to_string(), &[]);
    let ours = by_names(&stacks).into_keys().find(|n| n[0] == "level4").expect("the level chain");
    // gdb stops at main; memleak goes on to _start.
    assert_eq!(ours[..frames.len() - 1], frames[1..], "memleak vs gdb: {text}");
    // And the lines agree: gdb's "at /path/chain.c:21" is memleak's trailing file:line.
    let gdb_lines: Vec<&str> =
        text.lines().filter(|l| l.starts_with('#')).skip(1).filter_map(|l| l.rsplit(" at ").next()).collect();
    let stack = stacks.iter().find(|s| s.names()[0] == "level4").unwrap();
    for (ours, theirs) in stack.frames.iter().zip(&gdb_lines) {
        assert!(ours.ends_with(theirs), "memleak {ours:?} vs gdb {theirs:?}");
    }
}

#[test]
fn cxx_new_chain_is_the_same_with_and_without_frame_pointers() {
    let dir = out_dir("cxx");
    let src = fixture("chain.cpp");
    let fp = build("g++", &["-O2", "-g", "-fno-omit-frame-pointer"], &src, &dir.join("cxx_fp"));
    let nofp = build("g++", &["-O2", "-g", "-fomit-frame-pointer"], &src, &dir.join("cxx_nofp"));
    let a = trace(&fp.display().to_string(), &[]);
    let b = trace(&nofp.display().to_string(), &[]);
    let chain = [
        // libstdc++'s operator new is probed itself: the stack starts at its caller.
        &["shapes::level1(int)", "shapes::level2(int)", "shapes::level3(int)"][..],
        &["Factory::make(int)", "main"][..],
        &LIBC_START[..],
    ]
    .concat();
    for (stacks, warnings) in [&a, &b] {
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(leaked_from(stacks, &chain), (144, 3), "{stacks:#?}");
    }
    assert_eq!(by_names(&a.0), by_names(&b.0));
}

#[test]
fn rust_chain_is_the_same_with_and_without_frame_pointers() {
    let dir = out_dir("rust");
    let src = fixture("chain.rs");
    let common = ["-C", "opt-level=2", "-g"];
    let fp = build("rustc", &[&common[..], &["-C", "force-frame-pointers=yes"]].concat(), &src, &dir.join("rs_fp"));
    let nofp = build("rustc", &common, &src, &dir.join("rs_nofp"));
    let a = trace(&fp.display().to_string(), &[]);
    let b = trace(&nofp.display().to_string(), &[]);
    for (stacks, warnings) in [&a, &b] {
        assert!(warnings.is_empty(), "{warnings:?}");
        let chain: BTreeMap<_, _> = by_names(stacks)
            .into_iter()
            .filter_map(|(n, v)| {
                let i = n.iter().position(|f| f == "chain::level4")?;
                Some((n[i..].to_vec(), v))
            })
            .collect();
        let total = chain.values().fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        assert_eq!(total, (600, 3), "{stacks:#?}");
        for names in chain.keys() {
            assert_eq!(
                names[..5],
                strings(&["chain::level4", "chain::level3", "chain::level2", "chain::level1", "chain::main"])
            );
            assert_eq!(names[names.len() - 3..], strings(&LIBC_START));
        }
        // Box::new is inlined into level4 and prints as its own frame.
        let frames: Vec<&String> = stacks.iter().flat_map(|s| &s.frames).collect();
        assert!(frames.iter().any(|f| f.contains("Box<T>::new") && f.ends_with("(inlined)")), "{frames:#?}");
    }
    assert_eq!(by_names(&a.0), by_names(&b.0));
}

#[test]
fn dlopened_library_gets_its_table() {
    let dir = out_dir("dlopen");
    let (lib, main) = build_dlopen_fixture(&dir);
    let cmd = format!("{} {}", main.display(), lib.display());
    let mut child = common::memleak_command(&["-v", "-c", &cmd])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("memleak runs");
    // Handshake: memleak says it loaded the library's table (after the fixture's dlopen).
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let lib_name = lib.display().to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("unwind table for") && line.contains(&lib_name) {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(WAIT).expect("memleak loads the dlopen'd library's table");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stacks = final_report(&lines(&stdout)).stacks;
    let chain = [&["lib_inner", "lib_outer", "call_lib", "main"][..], &LIBC_START[..]].concat();
    assert_eq!(leaked_from(&stacks, &chain), (72, 1), "{stdout}");
}

#[test]
fn code_without_cfi_falls_back_to_its_frame_pointer() {
    let dir = out_dir("nocfi");
    let mut stacks_by_build = Vec::new();
    for (name, flag) in [("nocfi_fp", "-fno-omit-frame-pointer"), ("nocfi_nofp", "-fomit-frame-pointer")] {
        let out = dir.join(name);
        let st = Command::new("gcc")
            .args(["-O2", "-g", flag, "-o"])
            .arg(&out)
            .arg(fixture("nocfi_main.c"))
            .arg(fixture("nocfi.S"))
            .status()
            .expect("gcc runs");
        assert!(st.success());
        let (stacks, warnings) = trace(&out.display().to_string(), &[]);
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        let chain = [&["leaf", "nocfi_call", "via_asm", "main"][..], &LIBC_START[..]].concat();
        assert_eq!(leaked_from(&stacks, &chain), (112, 2), "{name}: {stacks:#?}");
        stacks_by_build.push(by_names(&stacks));
    }
    assert_eq!(stacks_by_build[0], stacks_by_build[1]);
}

#[test]
fn attaching_to_a_running_process_loads_its_tables() {
    let dir = out_dir("pid");
    let (lib, main) = build_dlopen_fixture(&dir);
    // The fixture dlopens, says "loaded", leaks after one line on stdin and exits after another.
    let mut fixture = Command::new(&main)
        .arg(&lib)
        .arg("wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("fixture runs");
    let mut fixture_out = BufReader::new(fixture.stdout.take().unwrap());
    let mut line = String::new();
    fixture_out.read_line(&mut line).unwrap();
    assert_eq!(line, "loaded\n");
    let mut memleak = Command::new(MEMLEAK)
        .args(["-p", &fixture.id().to_string(), "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("memleak runs");
    let (tx, rx) = mpsc::channel();
    let out = memleak.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // Attached (the tables of what the process maps were loaded before): let it leak.
    let first = rx.recv_timeout(WAIT).expect("memleak's first line");
    assert!(first.starts_with("Attaching to pid"), "{first}");
    let mut stdin = fixture.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    // Reports every second; the one that shows the leak's stack ends the wait.
    let mut report = String::new();
    loop {
        let l = rx.recv_timeout(WAIT).expect("a report with the leak");
        if l.contains("Top 10 stacks") {
            report.clear();
        }
        report.push_str(&l);
        report.push('\n');
        if l.contains("_start+") && report.contains("lib_inner+") {
            break;
        }
    }
    stdin.write_all(b"end\n").unwrap();
    assert!(fixture.wait().unwrap().success());
    let _ = memleak.wait();
    let r = parse_reports(&lines(&report)).pop().expect("a report");
    let (stacks, warnings) = (r.stacks, r.warnings);
    assert!(warnings.is_empty(), "{warnings:?}");
    let chain = [&["lib_inner", "lib_outer", "call_lib", "main"][..], &LIBC_START[..]].concat();
    assert_eq!(leaked_from(&stacks, &chain), (72, 1), "{report}");
}
