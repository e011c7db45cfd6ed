//! Issue 3: probes placed past the entry miss no call, the one-link and classic attach modes
//! agree, and under load from 4 threads every allocation and free is seen (exact counts).
//! Runs as root against real processes with real BPF.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{Finished, final_report, memleak_bin, memleak_output};

fn build_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("probe_cost");
    std::fs::create_dir_all(&dir).expect("create the fixture directory");
    dir
}

fn cc(args: &[&str]) {
    let out = Command::new("cc").args(args).output().expect("run cc");
    assert!(out.status.success(), "cc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn src(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// libprologues.so and its driver, built once.
fn prologues() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = build_dir();
        let lib = dir.join("libprologues.so");
        let driver = dir.join("prologues_driver");
        cc(&["-shared", "-fPIC", "-o", lib.to_str().unwrap(), &src("tests/fixtures/prologues.S")]);
        cc(&[
            "-O0",
            "-fno-omit-frame-pointer",
            "-o",
            driver.to_str().unwrap(),
            &src("tests/fixtures/prologues_driver.c"),
            lib.to_str().unwrap(),
            &format!("-Wl,-rpath,{}", dir.display()),
        ]);
        (lib, driver)
    })
}

fn churn() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = build_dir().join("churn");
        cc(&["-O2", "-fno-omit-frame-pointer", "-pthread", "-o", out.to_str().unwrap(), &src("bench/churn.c")]);
        out
    })
}

fn memleak(args: &[&str]) -> Finished {
    let run = memleak_output(args);
    assert!(run.status.success(), "memleak {args:?} failed:\n{}\n{}", run.stdout.join("\n"), run.stderr);
    run
}

/// (bytes, count) of the final report's stack whose first frame is in `function`, if any.
fn final_stack(run: &Finished, function: &str) -> Option<(u64, u64)> {
    let report = final_report(&run.stdout);
    let stacks = report.stacks_in(function);
    assert!(stacks.len() <= 1, "several {function} stacks:\n{}", run.stdout.join("\n"));
    stacks.first().map(|s| (s.bytes, s.count))
}

/// The probe delta memleak -v chose for `name` (the first of the names at its address, as in
/// glibc's "free/cfree/__libc_free").
fn delta(stderr: &str, name: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.split_whitespace().nth(1).and_then(|n| n.split('/').next()) == Some(name))
        .unwrap_or_else(|| panic!("no -v line for {name} in:\n{stderr}"));
    let plus = line.split("(+").nth(1).expect("a (+N: ...) part");
    plus.split(':').next().unwrap().parse().unwrap()
}

fn check_prologues(attach: &str) {
    let (lib, driver) = prologues();
    let n = 300u64;
    let cmd = format!("{} {n}", driver.display());
    let run = memleak(&["-v", "--attach", attach, "-O", lib.to_str().unwrap(), "-S", "fx_", "-c", &cmd]);
    // Each function's placement, as docs/probe-placement.md says.
    for (name, want) in
        [("fx_malloc", 4), ("fx_calloc", 3), ("fx_realloc", 3), ("fx_free", 0), ("fx_valloc", 0), ("fx_pvalloc", 0)]
    {
        assert_eq!(delta(&run.stderr, name), want, "{name}:\n{}", run.stderr);
    }
    assert!(run.stderr.contains("fx_pvalloc") && run.stderr.contains("single-stepped"), "{}", run.stderr);
    // Calls traced equal calls made: every kept block, exactly, and none of the freed ones.
    for (via, size) in
        [("via_malloc", 24), ("via_calloc", 40), ("via_realloc", 56), ("via_valloc", 72), ("via_pvalloc", 88)]
    {
        assert_eq!(final_stack(&run, via), Some((n * size, n)), "{via} ({attach}):\n{}", run.stdout.join("\n"));
    }
    assert_eq!(final_stack(&run, "freed"), None, "freed blocks reported:\n{}", run.stdout.join("\n"));
}

#[test]
fn probes_past_the_entry_miss_no_call() {
    check_prologues("session");
}

#[test]
fn uprobe_multi_links_place_and_count_the_same() {
    check_prologues("multi");
}

#[test]
fn classic_uprobes_place_and_count_the_same() {
    check_prologues("classic");
}

#[test]
fn glibc_probe_offsets_follow_the_rule() {
    let (_, driver) = prologues();
    // Where uprobes go on malloc and free: the in-process capture needs none there.
    let run = memleak(&["-v", "--capture", "uprobes", "-c", &format!("{} 1", driver.display())]);
    // Debian 12's glibc: free begins `test %rdi,%rdi; je`, malloc with `push %r12`.
    assert_eq!(delta(&run.stderr, "free"), 3, "{}", run.stderr);
    assert_eq!(delta(&run.stderr, "malloc"), 0, "{}", run.stderr);
}

#[test]
fn four_threads_of_churn_lose_nothing() {
    // 4 threads x 1,000,000 malloc/free pairs; every 1000th iteration leaks 1000 bytes.
    let run = memleak(&["-c", &format!("{} pairs 1000000 4 1000", churn().display())]);
    let text = run.stdout.join("\n");
    let r = final_report(&run.stdout);
    // Every leak, exactly. (Counted over all stacks from leak_one: a stack whose walk ended
    // early, which the report says, is a stack of its own.)
    let leaks = r.stacks_in("leak_one").iter().fold((0, 0), |(b, n), s| (b + s.bytes, n + s.count));
    assert_eq!(leaks, (4_000_000, 4_000), "{text}");
    // A missed free would leave a churn block behind: the churn loop's own stacks must be empty.
    assert!(r.stacks_in("churn").is_empty(), "{text}");
    // Nothing lost: the only warning allowed says how many stack walks ended early.
    let losses: Vec<&String> = r.warnings.iter().filter(|w| !w.contains(" end early: ")).collect();
    assert!(losses.is_empty(), "losses under load:\n{text}");
}

#[test]
fn the_benchmark_runs_at_a_small_n() {
    let out = Command::new(src("bench/overhead"))
        .arg("20000")
        .env("MEMLEAK", memleak_bin())
        .output()
        .expect("run bench/overhead");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for label in [
        "untraced",
        "floor: empty programs",
        "floor, entries only",
        "memleak -p ",
        "memleak -p -s 1000",
        "memleak -p --sample-bytes",
        "heaptrack",
        "entry-probe design",
        "memleak -p / floor",
        // Both capture modes of -c (bench/overhead runs each one --help offers).
        "memleak -c --capture uprobes / heaptrack",
        "memleak -c --capture preload / heaptrack",
        "fixed cost",
        "report at 20000 outstanding",
    ] {
        let line = text.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label:?} line:\n{text}"));
        assert!(line.chars().any(|c| c.is_ascii_digit()), "{label}: no number in {line:?}");
    }
    assert!(text.contains("20002 allocations"), "the report saw every held block:\n{text}");
}
