//! Report options: -a, -o, -z/-Z, -T, --sort, --combined-only, -s, -t, interval and count.
mod common;
use common::*;

/// Runs `memleak ARGS -o 0 -p FIXTURE 60` over `cmds`, then Ctrl-C: the one report printed,
/// with everything the fixture printed.
fn report_under_p(args: &[&str], cmds: &[&str]) -> (Report, Vec<String>) {
    let mut f = allocs_fixture(&[]);
    let pid = f.pid().to_string();
    let mut all = args.to_vec();
    all.extend(["-p", &pid, "60"]);
    // Every block counts, whatever its age (combined mode keeps no ages: -o does not go with it).
    if !args.contains(&"-o") && !args.contains(&"--combined-only") {
        all.extend(["-o", "0"]);
    }
    let m = memleak_attached(&all);
    let mut printed = Vec::new();
    for c in cmds {
        printed.extend(f.command(c));
    }
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let reports = parse_reports(&out.stdout);
    assert_eq!(reports.len(), 1, "{}", out.stdout.join("\n"));
    (reports[0].clone(), printed)
}

/// -a lists every outstanding block, address and size, before its stack.
#[test]
fn show_allocs_lists_each_block() {
    let (r, printed) = report_under_p(&["-a"], &["malloc 16 5", "calloc 2 24 3", "freed 64 5", "mmap 8192 1"]);
    assert_eq!(r.summary(), expected(&[("do_calloc", 144, 3), ("do_malloc", 80, 5), ("do_mmap", 8192, 1)]));
    let mut printed_addrs = fixture_addrs(&printed);
    printed_addrs.sort();
    assert_eq!(printed_addrs.len(), 9);
    let mut listed: Vec<(u64, u64)> = r.stacks.iter().flat_map(|s| s.addrs.clone()).collect();
    listed.sort();
    assert_eq!(listed, printed_addrs);
    for st in &r.stacks {
        assert_eq!(st.addrs.iter().map(|a| a.1).sum::<u64>(), st.bytes, "{st:?}");
        assert_eq!(st.addrs.len() as u64, st.count, "{st:?}");
    }
    // Without -a, no addr lines.
    let (r, _) = report_under_p(&[], &["malloc 16 5"]);
    assert!(r.stacks.iter().all(|s| s.addrs.is_empty()));
}

/// -o hides blocks younger than the age given: an old block shows, a young one does not.
#[test]
fn older_hides_young_blocks() {
    let mut f = allocs_fixture(&[]);
    let pid = f.pid().to_string();
    let mut m = memleak_attached(&["-o", "3000", "-p", &pid, "1"]);
    f.command("malloc 111 1");
    // Shows once 3 s old: wait for a report with it.
    m.expect("the 3 s old block in a report", |l| l == "\t111 bytes in 1 allocations from stack");
    // Allocated now, reported right away (on Ctrl-C): seconds younger than -o.
    f.command("calloc 1 222 1");
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let last = parse_reports(&out.stdout).pop().expect("a report");
    assert_eq!(last.summary(), expected(&[("do_malloc", 111, 1)]), "{}", out.stdout.join("\n"));
}

/// -z and -Z keep sizes in [min, max], both ends included, whichever the entry point.
#[test]
fn size_filters_keep_min_to_max() {
    let (r, _) = report_under_p(
        &["-z", "100", "-Z", "5000"],
        &["malloc 99 1", "malloc 100 2", "malloc 5000 1", "malloc 5001 1", "calloc 10 10 1", "calloc 1 99 1"],
    );
    assert_eq!(r.summary(), expected(&[("do_calloc", 100, 1), ("do_malloc", 5200, 3)]));
    let (r, _) = report_under_p(&["-z", "64", "-Z", "64"], &["malloc 63 1", "malloc 64 3", "valloc 65 1"]);
    assert_eq!(r.summary(), expected(&[("do_malloc", 192, 3)]));
    // realloc moves a block across the bounds: the old record ends, the new one counts only
    // when inside them.
    let (r, _) = report_under_p(&["-z", "50"], &["realloc 100 10", "realloc 10 100", "realloc 60 70 40"]);
    assert_eq!(r.summary(), expected(&[("do_realloc", 100, 1)]));
}

/// -T shows only the N largest stacks (largest last); --sort count orders by count.
#[test]
fn top_and_sort() {
    // malloc: 1000 bytes in 1; calloc: 500 bytes in 50; valloc: 300 bytes in 3.
    let cmds = ["malloc 1000 1", "calloc 1 10 50", "valloc 100 3"];
    let order = |r: &Report| r.stacks.iter().map(|s| s.func(0).to_string()).collect::<Vec<_>>();

    let (r, _) = report_under_p(&[], &cmds);
    assert_eq!(order(&r), ["do_valloc", "do_calloc", "do_malloc"]);
    let (r, _) = report_under_p(&["-T", "2"], &cmds);
    assert!(r.header.ends_with("] Top 2 stacks with outstanding allocations:"), "{}", r.header);
    assert_eq!(order(&r), ["do_calloc", "do_malloc"]);
    let (r, _) = report_under_p(&["--sort", "count"], &cmds);
    assert_eq!(order(&r), ["do_malloc", "do_valloc", "do_calloc"]);
    let (r, _) = report_under_p(&["--sort", "count", "-T", "1"], &cmds);
    assert_eq!(r.summary(), expected(&[("do_calloc", 500, 50)]));
    let (r, _) = report_under_p(&["--sort", "size", "-T", "1"], &cmds);
    assert_eq!(r.summary(), expected(&[("do_malloc", 1000, 1)]));
}

/// --combined-only keeps per-stack totals in BPF: the same numbers, frees subtracted.
#[test]
fn combined_only_gives_the_same_totals() {
    let cmds = ["malloc 16 5", "calloc 3 8 2", "freed 64 20", "mmap 4096 2", "free_all", "malloc 24 3", "valloc 10 1"];
    let (r, _) = report_under_p(&["--combined-only"], &cmds);
    assert_eq!(r.summary(), expected(&[("do_malloc", 72, 3), ("do_valloc", 10, 1)]));
    // And under -c, to its final report.
    let out = run_under_c(&["--combined-only"], &["malloc 100 2", "freed 16 10", "realloc 10 100 1000"]);
    assert_eq!(final_report(&out.stdout).summary(), expected(&[("do_malloc", 200, 2), ("do_realloc", 1000, 1)]));
}

/// -s N records about one allocation in N. 20000 allocations at -s 10: the count is
/// binomial(20000, 0.1), mean 2000, sigma 42.4; it must lie within 6 sigma (1745..=2255).
#[test]
fn sample_rate_within_binomial_bounds() {
    let (r, _) = report_under_p(&["-s", "10"], &["quiet", "malloc 16 20000"]);
    assert_eq!(r.stacks.len(), 1, "{r:?}");
    let st = &r.stacks[0];
    assert_eq!(st.func(0), "do_malloc");
    assert_eq!(st.bytes, 16 * st.count);
    assert!((1745..=2255).contains(&st.count), "{} sampled of 20000 at -s 10", st.count);
}

/// -t prints one line per call: the size and address at the allocation's return, and the
/// address and size at the free's entry.
#[test]
fn trace_prints_each_call() {
    let mut f = allocs_fixture(&[]);
    let pid = f.pid().to_string();
    let mut m = memleak_attached(&["-t", "-p", &pid, "60"]);
    let a = fixture_addrs(&f.command("malloc 48 1"))[0].0;
    let b = fixture_addrs(&f.command("calloc 3 8 1"))[0].0;
    f.command("free_all");
    let is_trace = |l: &str| l.starts_with("alloc exited, ") || l.starts_with("free entered, ");
    let lines = [
        format!("alloc exited, size = 48, result = {a:x}"),
        format!("alloc exited, size = 24, result = {b:x}"),
        format!("free entered, address = {a:x}, size = 48"),
        format!("free entered, address = {b:x}, size = 24"),
    ];
    for e in &lines {
        m.expect(e, |l| l == e);
    }
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let traced: Vec<&String> = out.stdout.iter().filter(|l| is_trace(l)).collect();
    assert_eq!(traced, lines.iter().collect::<Vec<_>>(), "{}", out.stdout.join("\n"));
}

/// "interval count": that many reports, then memleak exits by itself.
#[test]
fn interval_and_count() {
    let mut f = allocs_fixture(&[]);
    f.command("malloc 10 1");
    let out = memleak(&["-p", &f.pid().to_string(), "1", "2"]).finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(parse_reports(&out.stdout).len(), 2, "{}", out.stdout.join("\n"));
    for r in parse_reports(&out.stdout) {
        assert_eq!(r.summary(), expected(&[]), "allocated before attach: {r:?}");
    }
}

/// -O names the object holding the allocator and -S its prefix: here the fixture's own
/// pool_malloc/pool_free. libc's malloc is then not traced; the missing names are listed.
#[test]
fn obj_and_symbols_prefix() {
    let exe = fixture("allocs");
    let obj = exe.to_str().expect("utf-8");
    let (r, _) = report_under_p(&["-O", obj, "-S", "pool_"], &["malloc 10 2", "pool 48 3 5", "calloc 1 8 1"]);
    assert_eq!(r.summary(), expected(&[("do_pool_malloc", 144, 3)]));
    assert_symbolized(&r.stacks[0], &exe);

    let out = run_under_c(&["-O", obj, "--symbols-prefix", "pool_"], &["pool 16 1 2", "malloc 10 1"]);
    assert_eq!(final_report(&out.stdout).summary(), expected(&[("do_pool_malloc", 16, 1)]));
    let note = out.stderr.lines().find(|l| l.contains("note:")).unwrap_or_else(|| panic!("{}", out.stderr));
    assert!(note.contains(&format!("{obj} has no pool_calloc, pool_realloc")), "{note}");
    assert!(note.ends_with(": not traced"), "{note}");
}

/// SIGTERM ends the run like Ctrl-C: one last report, exit 0; the process goes on.
#[test]
fn sigterm_prints_a_last_report() {
    let mut f = allocs_fixture(&[]);
    let m = memleak_attached(&["-o", "0", "-p", &f.pid().to_string(), "60"]);
    f.command("malloc 12 3");
    m.signal(libc::SIGTERM);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(parse_reports(&out.stdout).pop().expect("a report").summary(), expected(&[("do_malloc", 36, 3)]));
    f.command("malloc 1 1");
}

/// The reader going away (memleak ... | head -1) ends memleak quietly at its next report.
#[test]
fn closed_stdout_ends_quietly() {
    use std::io::BufRead;
    let f = allocs_fixture(&[]);
    let mut child = memleak_command(&["-p", &f.pid().to_string(), "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("memleak runs");
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut first).expect("a line");
    assert!(first.starts_with("Attaching to pid "), "{first}");
    // The reader is dropped: the pipe is closed.
    let deadline = std::time::Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "memleak kept running with nobody reading");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert_eq!(status.code(), Some(0), "{err}");
    assert_eq!(without_tracing_lines(&err), "");
}
