//! Each allocator entry point, reported to the byte; frees, failures and nesting counted right.
mod common;
use common::*;

/// One call of each entry point (the allocs fixture's commands), and what it leaves outstanding:
/// one stack per entry point, each from its own call site in the fixture.
const EVERY_ENTRY_POINT: &[&str] = &[
    "malloc 100 3",
    "calloc 3 40 2",
    "realloc 10 100 1000",
    "reallocarray 2 8 4",
    "posix_memalign 64 200 2",
    "aligned_alloc 64 256 1",
    "memalign 128 320 1",
    "valloc 500 1",
    "pvalloc 600 1",
    "mmap 8192 2",
    "mremap 4096 12288",
];
const EVERY_ENTRY_POINT_REPORT: &[(&str, u64, u64)] = &[
    ("do_malloc", 300, 3),
    ("do_calloc", 240, 2),
    ("do_realloc", 1000, 1),
    ("do_reallocarray", 32, 1),
    ("do_posix_memalign", 400, 2),
    ("do_aligned_alloc", 256, 1),
    ("do_memalign", 320, 1),
    ("do_valloc", 500, 1),
    ("do_pvalloc", 600, 1),
    ("do_mmap", 16384, 2),
    ("do_mremap", 12288, 1),
];

/// One stack per entry point, each from its own call site in the fixture.
#[test]
fn each_entry_point_is_reported_to_the_byte() {
    let out = run_under_c(&["-T", "50"], EVERY_ENTRY_POINT);
    let r = final_report(&out.stdout);
    assert_eq!(r.summary(), expected(EVERY_ENTRY_POINT_REPORT), "{}", out.stdout.join("\n"));
    let exe = fixture("allocs");
    for st in &r.stacks {
        assert_symbolized(st, &exe);
        assert_eq!(st.func(1), "run", "the call site's caller: {st:?}");
    }
    assert_plausible_symbols(&r);
    // Largest last.
    let bytes: Vec<u64> = r.stacks.iter().map(|s| s.bytes).collect();
    assert!(bytes.windows(2).all(|w| w[0] <= w[1]), "not in ascending order: {bytes:?}");
    assert_eq!(r.header.split("] ").nth(1), Some("Top 50 stacks with outstanding allocations:"));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

/// The same under -p, where the probes go onto a running process.
#[test]
fn each_entry_point_under_p() {
    let mut f = allocs_fixture(&[]);
    let pid = f.pid().to_string();
    let m = memleak_attached(&["-o", "0", "-T", "50", "-p", &pid, "60"]);
    for c in EVERY_ENTRY_POINT {
        f.command(c);
    }
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let reports = parse_reports(&out.stdout);
    assert_eq!(reports.len(), 1, "{}", out.stdout.join("\n"));
    assert_eq!(reports[0].summary(), expected(EVERY_ENTRY_POINT_REPORT), "{}", out.stdout.join("\n"));
    for st in &reports[0].stacks {
        assert_symbolized(st, &fixture("allocs"));
    }
}

/// free and munmap end records; a block allocated and freed in between never shows.
#[test]
fn freed_blocks_are_never_reported() {
    let out = run_under_c(
        &[],
        &[
            "freed 64 200",
            "malloc 16 4",
            "calloc 2 16 3",
            "mmap 4096 2",
            "mremap 4096 8192",
            "posix_memalign 32 48 2",
            "free_all",
            "freed 4096 10",
            "malloc 24 1",
        ],
    );
    let r = final_report(&out.stdout);
    assert_eq!(r.summary(), expected(&[("do_malloc", 24, 1)]), "{}", out.stdout.join("\n"));
}

/// realloc(p, 0) frees p; a chain of reallocs leaves one block of the last size.
#[test]
fn realloc_chains_and_realloc_to_zero() {
    let out = run_under_c(
        &[],
        &[
            "realloc0 50",
            "realloc0 5000",
            // 100 → 200000 crosses glibc's mmap threshold, 400000 is an mremap inside realloc.
            "realloc 100 200000 400000",
            "realloc 8 16 32 64 128 256 512",
            "realloc 4096 16",
        ],
    );
    let r = final_report(&out.stdout);
    // All three chains come from one call site: 400000 + 512 + 16 bytes in 3 blocks.
    assert_eq!(r.summary(), expected(&[("do_realloc", 400528, 3)]), "{}", out.stdout.join("\n"));
}

/// Failed calls allocate nothing: malloc returning NULL, posix_memalign returning EINVAL,
/// mmap returning MAP_FAILED, realloc failing (which leaves the old block in place).
#[test]
fn failed_calls_allocate_nothing() {
    let out = run_under_c(&[], &["fail_malloc", "fail_posix_memalign", "fail_mmap", "fail_realloc 20"]);
    let r = final_report(&out.stdout);
    // fail_realloc mallocs 20 bytes, then fails to grow them: the 20 bytes stay.
    assert_eq!(r.summary(), expected(&[("do_malloc", 20, 1)]), "{}", out.stdout.join("\n"));
}

/// A malloc that glibc serves with mmap is one allocation, not two; its free likewise.
#[test]
fn malloc_served_by_mmap_counts_once() {
    let out = run_under_c(
        &["-a"],
        &["malloc 1048576 2", "calloc 1 300000 1", "posix_memalign 4096 1000000 1", "malloc 2000000 1"],
    );
    let r = final_report(&out.stdout);
    assert_eq!(
        r.summary(),
        expected(&[("do_malloc", 4097152, 3), ("do_calloc", 300000, 1), ("do_posix_memalign", 1000000, 1)]),
        "{}",
        out.stdout.join("\n")
    );
    // The addresses are the ones malloc returned, not the mappings under them.
    let mut printed = fixture_addrs(&out.stdout);
    let mut reported: Vec<(u64, u64)> = r.stacks.iter().flat_map(|s| s.addrs.clone()).collect();
    printed.sort();
    reported.sort();
    assert_eq!(printed, reported);

    let freed = run_under_c(&[], &["malloc 1048576 2", "free_all", "calloc 1 100 1"]);
    assert_eq!(final_report(&freed.stdout).summary(), expected(&[("do_calloc", 100, 1)]));
}

/// In glibc memalign and aligned_alloc are one function: probed once, both call sites reported.
#[test]
fn memalign_and_aligned_alloc_are_one_function() {
    // Probes are uprobes' matter: the in-process capture interposes both names.
    let out = run_under_c(&["-v", "--capture", "uprobes"], &["memalign 64 100 1", "aligned_alloc 64 128 2"]);
    // "memleak:   aligned_alloc/memalign       entry 0x99610 ...": one line per probe.
    let entries: Vec<Vec<&str>> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("memleak:   "))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").split('/').collect())
        .collect();
    let with = |name: &str| entries.iter().filter(|e| e.contains(&name)).cloned().collect::<Vec<_>>();
    let mut both = with("memalign");
    assert_eq!(both.len(), 1, "one probe for memalign: {}", out.stderr);
    assert_eq!(with("aligned_alloc"), both, "aligned_alloc shares memalign's probe: {}", out.stderr);
    both[0].sort();
    // And glibc's internal name for it, __libc_memalign.
    assert_eq!(both[0], ["__libc_memalign", "aligned_alloc", "memalign"], "{}", out.stderr);
    let r = final_report(&out.stdout);
    assert_eq!(r.summary(), expected(&[("do_aligned_alloc", 256, 2), ("do_memalign", 100, 1)]));
}

/// Threads allocating at once: per-thread state keeps every call apart. Creating threads
/// allocates too (their stacks and TLS), from pthread_create: only the threads' own call
/// site is compared exactly, and the blocks they freed never show.
#[test]
fn threads_allocating_at_once() {
    let out = run_under_c(&["-T", "50"], &["quiet", "threads 8 24 500"]);
    let r = final_report(&out.stdout);
    let mine = r.stacks_in("do_thread_malloc");
    // One stack; a second only when a walk ended early (threads mapping while others unwind),
    // which the report must say.
    assert!(
        mine.len() == 1 || (mine.len() == 2 && r.warnings.iter().any(|w| w.contains(" end early: "))),
        "{}",
        out.stdout.join("\n")
    );
    let total = mine.iter().fold((0, 0), |(b, n), s| (b + s.bytes, n + s.count));
    assert_eq!(total, (8 * 500 * 24, 8 * 500));
    let full = mine.iter().max_by_key(|s| s.count).expect("a stack");
    assert_eq!(full.func(1), "thread_main", "{full:?}");
    assert_eq!(full.module(0), fixture("allocs").to_string_lossy());
    assert!(r.stacks_in("do_malloc_and_free").is_empty(), "{}", out.stdout.join("\n"));
    assert!(r.stacks.iter().all(|s| s.bytes != 48), "a freed 48-byte block shows: {}", out.stdout.join("\n"));
    // pthread_create's own allocations are symbolized to it (once as a function in libc6-dbg's
    // debug info that blazesym returned at address 0, printed as +0x89d01).
    assert_plausible_symbols(&r);
}

/// Tens of thousands of outstanding blocks: every one is read back from the maps.
#[test]
fn many_outstanding_blocks_are_all_reported() {
    let out = run_under_c(&[], &["quiet", "malloc 16 50000", "calloc 1 24 30000"]);
    assert_eq!(
        final_report(&out.stdout).summary(),
        expected(&[("do_calloc", 720000, 30000), ("do_malloc", 800000, 50000)])
    );
    // And with -a, each block listed.
    let (r, _) = {
        let mut f = allocs_fixture(&[]);
        let m = memleak_attached(&["-a", "-o", "0", "-p", &f.pid().to_string(), "60"]);
        f.command("quiet");
        f.command("malloc 8 40000");
        m.signal(libc::SIGINT);
        let out = m.finish();
        (parse_reports(&out.stdout).pop().expect("a report"), out)
    };
    assert_eq!(r.summary(), expected(&[("do_malloc", 320000, 40000)]));
    let mut addrs: Vec<u64> = r.stacks[0].addrs.iter().map(|a| a.0).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 40000);
}

/// More distinct stacks than the stack map holds: the allocations past it are still counted,
/// under a line saying their stacks were not stored, and a warning says how many.
#[test]
fn stack_map_full_is_said_not_hidden() {
    // 2^16 = 65536 blocks, each from its own stack.
    let out = run_under_c(&["-T", "100000"], &["quiet", "paths 16"]);
    let r = final_report(&out.stdout);
    let total: u64 = r.stacks.iter().map(|s| s.count).sum();
    assert_eq!(total, 65536);
    assert_eq!(r.total_bytes(), 65536 * 8);
    let unstored: Vec<&Stack> =
        r.stacks.iter().filter(|s| s.frames.first().is_some_and(|f| f.starts_with("[stack not stored"))).collect();
    assert_eq!(unstored.len(), 1, "one line for all allocations without a stack");
    let warning = format!("{} allocations without a stack: the stack map is full", unstored[0].count);
    assert!(r.warnings.iter().any(|w| w.starts_with(&warning)), "{warning:?} not in {:?}", r.warnings);
    // Every stored stack is the fixture's, whole.
    for st in r.stacks.iter().filter(|s| s.count > 0 && !s.frames[0].starts_with("[stack not stored")) {
        assert_eq!((st.func(0), st.count), ("do_malloc", 1), "{st:?}");
        assert!(st.frames.iter().filter(|f| f.starts_with("path_")).count() == 16, "{st:?}");
    }
}

/// Stacks deeper than the frames kept are cut, and the report says how many were.
#[test]
fn deep_stacks_are_truncated_with_a_warning() {
    let out = run_under_c(&[], &["recurse 300 5", "recurse 10 1"]);
    let r = final_report(&out.stdout);
    assert_eq!(r.stacks.len(), 2, "{}", out.stdout.join("\n"));
    let deep = &r.stacks[1];
    assert_eq!((deep.bytes, deep.count), (40, 5));
    assert_eq!(deep.frames.len(), 127, "{deep:?}");
    assert!(deep.frames[1..].iter().all(|f| f.starts_with("do_recurse+")), "{deep:?}");
    assert_eq!(r.warnings, ["5 stacks truncated at 127 frames"]);
    let shallow = &r.stacks[0];
    assert_eq!((shallow.bytes, shallow.count, shallow.func(1)), (8, 1, "do_recurse"));
    assert_symbolized(shallow, &fixture("allocs"));
}

/// Every attach mode gives the same exact numbers, nesting included (malloc served by mmap,
/// realloc by mremap, reallocarray's tail call into realloc): one session link (6.13+), an
/// entry and a return uprobe_multi link (6.6+), and classic uprobes and uretprobes, where every
/// return probe fires and return probes replace return addresses on the stack.
#[test]
fn every_attach_mode_counts_the_same() {
    let mut cmds = EVERY_ENTRY_POINT.to_vec();
    cmds.extend([
        "malloc 1048576 1",
        "realloc 100 200000 400000",
        "freed 64 10",
        "realloc0 100",
        "fail_malloc",
        "fail_posix_memalign",
        "fail_mmap",
    ]);
    for (mode, shown) in [("session", "Session"), ("multi", "Multi"), ("classic", "Classic")] {
        let out = run_under_c(&["--attach", mode, "-v", "-T", "50"], &cmds);
        assert!(out.stderr.contains(&format!("({shown} mode)")), "{}", out.stderr);
        assert_eq!(
            final_report(&out.stdout).summary(),
            expected(&[
                ("do_malloc", 1048876, 4),
                ("do_calloc", 240, 2),
                ("do_realloc", 401000, 2),
                ("do_reallocarray", 32, 1),
                ("do_posix_memalign", 400, 2),
                ("do_aligned_alloc", 256, 1),
                ("do_memalign", 320, 1),
                ("do_valloc", 500, 1),
                ("do_pvalloc", 600, 1),
                ("do_mmap", 16384, 2),
                ("do_mremap", 12288, 1),
            ]),
            "--attach {mode}:\n{}",
            out.stdout.join("\n")
        );
    }
}

/// --max-allocs bounds the allocations tracked at once: the ones past it are counted and
/// said, and a freed slot is used again.
#[test]
fn max_allocs_limit_is_said() {
    let out = run_under_c(&["--max-allocs", "100"], &["quiet", "malloc 16 150", "free_all", "calloc 1 8 20"]);
    let r = final_report(&out.stdout);
    assert_eq!(r.summary(), expected(&[("do_calloc", 160, 20)]));
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(
        r.warnings[0].starts_with("50 allocations untracked: the allocation map is full (100 entries"),
        "{:?}",
        r.warnings
    );
}

/// A free reached by a tail jump must not hide the allocations that follow it (a call whose
/// state outlived it once made every later malloc from the same caller look nested).
#[test]
fn a_tail_called_free_hides_nothing() {
    let exe = optimized_fixture("tailfree");
    let out = memleak_output(&["-t", "-c", &format!("{} 1000", exe.display())]);
    assert!(out.status.success(), "{}", out.stderr);
    let allocs = out.stdout.iter().filter(|l| l.starts_with("alloc exited, size = ")).count();
    let frees = out.stdout.iter().filter(|l| l.starts_with("free entered, address = ")).count();
    // The loader and libc allocate a few blocks of their own before main.
    assert!((1000..1010).contains(&allocs), "{allocs} allocations traced:\n{}", out.stdout.join("\n"));
    assert!((999..1009).contains(&frees), "{frees} frees traced");
    let r = final_report(&out.stdout);
    let pair: Vec<(u64, u64)> = r.stacks_in("pair").iter().map(|s| (s.bytes, s.count)).collect();
    assert_eq!(pair, [(23, 1)], "{}", out.stdout.join("\n"));
}

/// Under a size filter or --sample-bytes, a call left out takes no return probe and leaves no
/// state: the calls it makes (glibc's mmap for a large malloc) must still be seen as nested.
/// Every entry point under `-z 1` and `--sample-bytes 1` (every block sampled, each weighing
/// one) is reported exactly as without.
#[test]
fn filtered_and_sampled_runs_keep_nesting_exact() {
    for filter in [&["-z", "1"][..], &["--sample-bytes", "1"][..]] {
        let args: Vec<&str> = filter.iter().copied().chain(["--no-scan", "-T", "50"]).collect();
        let out = run_under_c(&args, EVERY_ENTRY_POINT);
        let r = final_report(&out.stdout);
        assert_eq!(r.summary(), expected(EVERY_ENTRY_POINT_REPORT), "{filter:?}: {}", out.stdout.join("\n"));
        assert!(r.warnings.is_empty(), "{filter:?}: {:?}", r.warnings);
    }
    // malloc(200000) is left out by -z; glibc serves it with an mmap of more than 200000
    // bytes, which -z alone would keep: it is part of the malloc, and left out with it.
    let out = run_under_c(&["-z", "200001", "--no-scan"], &["malloc 200000 2", "malloc 300000 1"]);
    let r = final_report(&out.stdout);
    assert_eq!(r.summary(), expected(&[("do_malloc", 300000, 1)]), "{}", out.stdout.join("\n"));
}
