//! Reachability (issue 11): memleak's leak classes equal valgrind's on the same program, at a
//! command's exit and on a running process (a block held only in a register, one only on a
//! thread's stack, one only in a dead frame below a stack pointer); --error-exitcode;
//! suppressions; a multi-threaded process goes on intact after its scans. The fixture
//! (tests/fixtures/reach.c) knows every block's class; valgrind runs on the same binary.
mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// (innermost function of the fixture, class, bytes, blocks), summed by the first two.
type Classes = Vec<(String, String, u64, u64)>;

fn reach() -> std::path::PathBuf {
    fixture("reach")
}

fn row(f: &str, c: &str, b: u64, n: u64) -> (String, String, u64, u64) {
    (f.to_string(), c.to_string(), b, n)
}

/// The classes at exit of `reach exit`, by the fixture's function (every one is known).
fn expected_at_exit() -> Classes {
    let mut v = vec![
        row("lost_direct", "definitely lost", 120, 3),
        row("lost_head", "definitely lost", 48, 1),
        row("lost_child", "indirectly lost", 48, 2),
        row("lost_grandchild", "indirectly lost", 16, 1),
        row("lost_cycle", "definitely lost", 32, 1),
        row("lost_cycle", "indirectly lost", 32, 1),
        row("self_ref", "definitely lost", 24, 1),
        // Its only pointer is in a block freed since: free memory is no root.
        row("orphan", "definitely lost", 40, 1),
        row("interior", "possibly lost", 64, 1),
        row("possible_child", "possibly lost", 24, 1),
        row("make_node", "still reachable", 96, 3),
        row("new_array", "still reachable", 56, 1),
        // stdout's buffer (a pipe: 4096 bytes), allocated under printf in main.
        row("main", "still reachable", 4096, 1),
    ];
    v.sort();
    v
}

/// valgrind's output: its loss records by the fixture's function, and its LEAK SUMMARY.
#[derive(Debug, Default)]
struct Valgrind {
    classes: Classes,
    summary: Vec<(String, u64, u64)>,
    heuristics: Vec<(String, u64, u64)>,
}

fn number(s: &str) -> u64 {
    s.replace(',', "").parse().unwrap_or_else(|_| panic!("not a number: {s:?}"))
}

/// Parses valgrind's leak report (--leak-check=full, every kind shown).
fn parse_valgrind(text: &str) -> Valgrind {
    let mut v = Valgrind::default();
    let mut map: std::collections::BTreeMap<(String, String), (u64, u64)> = Default::default();
    // The loss record being read: (class, direct bytes, blocks), waiting for its first frame
    // in the fixture.
    let mut record: Option<(String, u64, u64)> = None;
    let mut in_summary = false;
    for line in text.lines() {
        // "==123== " prefix.
        let body = line.split_once("== ").map_or(line, |(_, b)| b).trim();
        if let Some((head, rest)) = body.split_once(" blocks are ") {
            let class = rest.split(" in loss record").next().unwrap_or("").to_string();
            let (bytes, blocks) = head.split_once(" bytes in ").expect("bytes in blocks");
            // "64 (32 direct, 32 indirect)": the record's own bytes are the direct ones.
            let direct = match bytes.split_once(" (") {
                Some((_, d)) => number(d.split(" direct").next().unwrap_or("")),
                None => number(bytes),
            };
            record = Some((class, direct, number(blocks)));
            continue;
        }
        if let Some((class, b, n)) = &record
            && let Some(frame) = body.strip_prefix("by 0x")
            && frame.contains("(reach.c:")
        {
            let func = frame.split_once(": ").map(|x| x.1).unwrap_or("").split(" (").next().unwrap_or("");
            let e = map.entry((func.to_string(), class.clone())).or_default();
            e.0 += b;
            e.1 += n;
            record = None;
            continue;
        }
        if body == "LEAK SUMMARY:" {
            in_summary = true;
            continue;
        }
        if in_summary {
            if let Some((what, rest)) = body.split_once(':')
                && let Some((b, n)) = rest.trim().split_once(" bytes in ")
            {
                let n = number(n.trim_end_matches(" blocks"));
                let what = what.trim();
                if ["definitely lost", "indirectly lost", "possibly lost", "still reachable"].contains(&what) {
                    v.summary.push((what.to_string(), number(b), n));
                } else if what != "suppressed" {
                    v.heuristics.push((what.to_string(), number(b), n));
                }
            }
            if body.is_empty() {
                in_summary = false;
            }
        }
    }
    v.classes = map.into_iter().map(|((f, c), (b, n))| (f, c, b, n)).collect();
    v
}

/// (class or heuristic, bytes, allocations).
type Totals = Vec<(String, u64, u64)>;

fn memleak_summary(r: &Report) -> (Totals, Totals) {
    let s = r.leak_summary.as_ref().unwrap_or_else(|| panic!("no leak summary: {r:?}"));
    (s.classes.clone(), s.heuristics.clone())
}

/// The report as text, for assertion messages.
fn show(lines: &[String]) -> String {
    lines.join("\n")
}

#[test]
fn classes_at_exit_equal_valgrinds() {
    let exe = reach();
    let vg = Command::new("valgrind")
        .args(["--leak-check=full", "--show-leak-kinds=all", "--run-libc-freeres=no"])
        .arg(&exe)
        .args(["exit", "3"])
        .stdout(Stdio::piped())
        .output()
        .expect("valgrind runs");
    assert_eq!(vg.status.code(), Some(3), "valgrind passes the exit status on");
    let vg = parse_valgrind(&String::from_utf8_lossy(&vg.stderr));
    assert_eq!(vg.classes, expected_at_exit(), "valgrind's classes");

    let out = memleak_output(&["-c", &format!("{} exit 3", exe.display())]);
    assert_eq!(out.code(), Some(3), "{}", out.stderr);
    let r = final_report(&out.stdout);
    assert_eq!(r.classes_by_function(&exe.to_string_lossy()), vg.classes, "{}", show(&out.stdout));
    let (summary, heuristics) = memleak_summary(&r);
    assert_eq!(summary, vg.summary, "{}", show(&out.stdout));
    assert_eq!(
        vg.summary,
        [
            ("definitely lost".to_string(), 264, 7),
            ("indirectly lost".to_string(), 96, 4),
            ("possibly lost".to_string(), 88, 2),
            ("still reachable".to_string(), 4248, 5)
        ]
    );
    assert_eq!(heuristics, [("newarray".to_string(), 56, 1)]);
    assert_eq!(heuristics, vg.heuristics);
    // Entries come in valgrind's order of classes, one per class of a stack.
    let order: Vec<&str> = r.stacks.iter().map(|s| s.class.as_deref().unwrap_or("")).collect();
    let mut sorted = order.clone();
    let rank = |c: &&str| {
        ["definitely lost", "indirectly lost", "possibly lost", "still reachable"].iter().position(|x| x == c)
    };
    sorted.sort_by_key(rank);
    assert_eq!(order, sorted);
    let cycle: Vec<&Stack> = r.stacks_in("lost_cycle");
    assert_eq!(cycle.len(), 2, "one stack, two classes: {cycle:?}");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let scanned = &r.leak_summary.as_ref().expect("summary").scanned;
    assert!(scanned.starts_with("scanned at its exit: ") && scanned.contains("exit held "), "{scanned}");
}

/// Runs `reach hold` under valgrind, asks for a leak check while it holds its blocks (vgdb),
/// and returns it.
fn valgrind_while_holding(exe: &std::path::Path) -> Valgrind {
    let mut cmd = Command::new("valgrind");
    cmd.args(["--leak-check=full", "--show-leak-kinds=all", "--run-libc-freeres=no", "--vgdb=yes"])
        .arg(exe)
        .arg("hold");
    let mut p = Proc::spawn("valgrind reach hold", cmd);
    p.expect("ready", |l| l.starts_with("ready "));
    p.command("build");
    p.send("hold");
    p.expect_line("holding");
    let vgdb = Command::new("vgdb")
        .args([&format!("--pid={}", p.pid()), "leak_check", "full", "reachable", "any", "heuristics", "all"])
        .output()
        .expect("vgdb runs");
    p.send("x");
    let out = p.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    parse_valgrind(&String::from_utf8_lossy(&vgdb.stdout))
}

#[test]
fn classes_of_a_running_process_equal_valgrinds() {
    let exe = reach();
    let mut vg = valgrind_while_holding(&exe);
    // Before memleak attaches, the fixture started its holder thread: pthread_create's
    // thread-local storage vector (a possibly lost calloc, pointed at 16 bytes in) is a block
    // valgrind knows and memleak, attached later, does not.
    let before = row("main", "possibly lost", 272, 1);
    assert!(vg.classes.contains(&before), "{:?}", vg.classes);
    vg.classes.retain(|c| *c != before);
    // Attached to a running process, memleak cannot tell the allocator's free memory from
    // blocks allocated before it attached: it scans both as roots (docs/reachability.md). So
    // the block whose only pointer lies in freed memory is still reachable here.
    let orphan = row("orphan", "definitely lost", 40, 1);
    assert!(vg.classes.contains(&orphan), "{:?}", vg.classes);
    vg.classes.retain(|c| *c != orphan);
    vg.classes.push(row("orphan", "still reachable", 40, 1));
    vg.classes.sort();
    for s in &mut vg.summary {
        match s.0.as_str() {
            "possibly lost" => (s.1, s.2) = (s.1 - before.2, s.2 - before.3),
            "definitely lost" => (s.1, s.2) = (s.1 - orphan.2, s.2 - orphan.3),
            "still reachable" => (s.1, s.2) = (s.1 + orphan.2, s.2 + orphan.3),
            _ => {}
        }
    }

    let (mut f, pid) = reach_hold(&exe);
    let m = memleak_attached(&["--scan", "-o", "0", "-p", &pid.to_string(), "3600"]);
    f.command("build");
    f.send("hold");
    f.expect_line("holding");

    m.signal(libc::SIGINT);
    let out = m.finish();
    f.send("x");
    let fin = f.finish();
    assert_eq!(fin.code(), Some(0), "{}", fin.stderr);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let reports = parse_reports(&out.stdout);
    assert_eq!(reports.len(), 1, "{}", show(&out.stdout));
    let r = &reports[0];
    let mine = r.classes_by_function(&exe.to_string_lossy());
    assert_eq!(mine, vg.classes, "{}", show(&out.stdout));
    assert_eq!(memleak_summary(r).0, vg.summary, "{}", show(&out.stdout));
    // What this test is about, said outright.
    for want in [
        row("hold_in_register", "still reachable", 104, 1),
        row("stack_block", "still reachable", 72, 1),
        row("dead_frame_block", "definitely lost", 88, 1),
        row("lost_direct", "definitely lost", 120, 3),
    ] {
        assert!(mine.contains(&want), "{want:?} in {mine:?}");
    }
    let scanned = &r.leak_summary.as_ref().expect("summary").scanned;
    assert!(scanned.contains("the registers of 2 threads; the process was stopped "), "{scanned}");
}

#[test]
fn error_exitcode_fails_on_leaks_only() {
    let exe = reach().display().to_string();
    let run = |args: &[&str], cmd: &str| {
        let mut all = args.to_vec();
        let cmd = format!("{exe} {cmd}");
        all.extend(["-c", &cmd]);
        memleak_output(&all)
    };
    // Definite leaks: the status asked for.
    let out = run(&["--error-exitcode", "42"], "exit 3");
    assert_eq!(out.code(), Some(42), "{}", out.stderr);
    assert_eq!(final_report(&out.stdout).leak_summary.expect("summary").class("definitely lost"), (264, 7));
    // Everything still reachable: the command's own status.
    let out = run(&["--error-exitcode", "42"], "clean 7");
    assert_eq!(out.code(), Some(7), "{}", out.stderr);
    let s = final_report(&out.stdout).leak_summary.expect("summary");
    assert_eq!((s.class("definitely lost"), s.class("possibly lost")), ((0, 0), (0, 0)));
    assert_eq!(s.class("still reachable"), (4096 + 96 + 56, 5));
    // The kinds that count are valgrind's choice.
    let out = run(&["--error-exitcode", "42", "--errors-for-leak-kinds", "reachable"], "clean 7");
    assert_eq!(out.code(), Some(42), "{}", out.stderr);
    let out = run(&["--error-exitcode=42", "--errors-for-leak-kinds=indirect"], "exit 0");
    assert_eq!(out.code(), Some(42), "{}", out.stderr);
    let out = run(&["--error-exitcode", "42", "--errors-for-leak-kinds", "none"], "exit 5");
    assert_eq!(out.code(), Some(5), "{}", out.stderr);
}

#[test]
fn suppressions_silence_stacks_and_say_so() {
    let dir = std::env::temp_dir().join(format!("memleak-supp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let supp = dir.join("leaks.supp");
    let mut f = std::fs::File::create(&supp).expect("suppressions file");
    writeln!(f, "# direct leaks of the fixture\nleak:lost_direct\n\nleak:^lost_tree$").expect("write");
    drop(f);
    let exe = reach();
    let supp_arg = supp.to_string_lossy().to_string();
    let out = memleak_output(&["--suppressions", &supp_arg, "-c", &format!("{} exit 0", exe.display())]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let r = final_report(&out.stdout);
    let names: Vec<String> = r.stacks.iter().flat_map(|s| s.names()).collect();
    assert!(!names.iter().any(|n| n == "lost_direct" || n == "lost_tree"), "{}", show(&out.stdout));
    let s = r.leak_summary.expect("summary");
    // lost_tree's head, children and grandchild, lost_direct's three blocks.
    assert_eq!(s.suppressed, Some((120 + 48 + 48 + 16, 3 + 1 + 2 + 1)));
    assert_eq!(s.class("definitely lost"), (264 - 120 - 48, 7 - 3 - 1));
    assert_eq!(s.class("indirectly lost"), (96 - 64, 4 - 3));
    assert_eq!(s.class("still reachable"), (4248, 5));

    // Every stack of a kind that counts suppressed: the gate passes.
    let all = dir.join("all.supp");
    std::fs::write(&all, "leak:lost_\nleak:self_ref\nleak:interior\n").expect("write");
    let all_arg = all.to_string_lossy().to_string();
    let out = memleak_output(&[
        "--error-exitcode",
        "9",
        "--suppressions",
        &all_arg,
        "-c",
        &format!("{} exit 4", exe.display()),
    ]);
    assert_eq!(out.code(), Some(4), "{}\n{}", out.stderr, show(&out.stdout));

    // Without classification (--no-scan) the report still leaves them out, and says so.
    let out = memleak_output(&["--no-scan", "--suppressions", &supp_arg, "-c", &format!("{} exit 0", exe.display())]);
    let r = final_report(&out.stdout);
    assert!(r.leak_summary.is_none() && r.stacks.iter().all(|s| s.class.is_none()));
    assert_eq!(r.suppressed, Some((232, 7)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The fixture's state letter in /proc/PID/stat (R, S, T...).
fn state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()).expect("state")
}

fn count(f: &mut Proc) -> (u64, u64) {
    let lines = f.command("count");
    let l = lines.iter().find(|l| l.starts_with("count ")).expect("count line");
    let w: Vec<&str> = l.split(' ').collect();
    (w[1].parse().expect("count"), w[3].parse().expect("rt"))
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn threads_go_on_intact_after_scans() {
    let mut f = Proc::spawn("reach workers", {
        let mut c = Command::new(reach());
        c.args(["workers", "4"]);
        c
    });
    let pid = f.pid();
    f.expect_line(&format!("ready {pid}"));
    let mut m = memleak_attached(&["--scan", "-o", "0", "-p", &pid.to_string(), "1"]);
    // SIGUSR1 is blocked in every thread: pending until the fixture lets it in.
    // SAFETY: kill on our own child.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let (c0, _) = count(&mut f);
    // Real-time signals queue: every one sent must arrive, scans or not.
    let sent = 200;
    let mut scans = 0;
    for i in 0..sent {
        // SAFETY: kill on our own child.
        unsafe { libc::kill(pid, libc::SIGRTMIN()) };
        if i % 40 == 0 {
            m.expect("a scanned report", is_summary_header);
            scans += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(scans >= 5);
    wait_until("every real-time signal", || count(&mut f).1 == sent);
    wait_until("the workers counting on", || count(&mut f).0 > c0);
    assert_eq!(count(&mut f).1, sent, "no more signals than were sent");
    assert_eq!(f.command("usr1").first().map(String::as_str), Some("usr1 0"), "still pending");

    // A process in a group-stop stays stopped through a scan.
    f.signal(libc::SIGSTOP);
    wait_until("the group-stop", || matches!(state(pid), 'T' | 't'));
    m.expect("a report scanned while stopped", is_summary_header);
    m.expect("another", is_summary_header);
    assert!(matches!(state(pid), 'T' | 't'), "still stopped after two scans");
    f.signal(libc::SIGCONT);
    let (c2, _) = count(&mut f);
    wait_until("the workers counting after SIGCONT", || count(&mut f).0 > c2);
    f.command("unblock");
    assert_eq!(f.command("usr1").first().map(String::as_str), Some("usr1 1"), "the pending signal was kept");
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    // Every report was classified: no "not classified" warning, 5 threads' registers each.
    for r in parse_reports(&out.stdout) {
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let s = r.leak_summary.expect("each report classified");
        assert!(s.scanned.contains("the registers of 5 threads"), "{}", s.scanned);
    }
    f.send("exit");
    assert_eq!(f.finish().code(), Some(0));
}

#[test]
fn reachability_flags_need_what_they_classify() {
    for (args, needle) in [
        (&["--scan"][..], "need -p or -c"),
        (&["--error-exitcode", "1"][..], "need -p or -c"),
        (&["-p", "1", "--scan", "--combined-only"][..], "--combined-only keeps no block addresses"),
        (&["-c", "true", "--no-scan", "--error-exitcode", "3"][..], "does not go with --no-scan"),
        (&["-c", "true", "--scan", "--no-scan"][..], "cannot be used with"),
        (&["-c", "true", "--errors-for-leak-kinds", "bogus"][..], "unknown kind \"bogus\""),
        (&["-c", "true", "--suppressions", "/nonexistent/leaks.supp"][..], "cannot read /nonexistent/leaks.supp"),
        (&["-c", "true", "--error-exitcode", "256"][..], "256"),
    ] {
        let out = memleak_output(args);
        assert_eq!(out.code(), Some(2), "{args:?}: {}", out.stderr);
        assert!(out.stderr.starts_with("memleak: ") && out.stderr.contains(needle), "{args:?}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
    }
}

/// Under -c, --scan interrupts the thread memleak traces anyway (for the command's exit) and
/// seizes the others; the command goes on, and its exit is classified as well.
#[test]
fn scans_under_c_leave_the_command_running() {
    let cmd = format!("{} workers 3", reach().display());
    let mut m = memleak_attached(&["--scan", "-o", "0", "-c", &cmd, "1"]);
    m.expect("the fixture's ready line", |l| l.starts_with("ready "));
    m.expect("a scanned report", is_summary_header);
    let count = |m: &mut Proc| -> u64 {
        let lines = m.command("count");
        let l = lines.iter().find(|l| l.starts_with("count ")).expect("count line").clone();
        l.split(' ').nth(1).expect("a number").parse().expect("count")
    };
    let c0 = count(&mut m);
    m.expect("another scanned report", is_summary_header);
    m.expect("and another", is_summary_header);
    let deadline = Instant::now() + LINE_TIMEOUT;
    while count(&mut m) <= c0 {
        assert!(Instant::now() < deadline, "the workers stopped counting");
        std::thread::sleep(Duration::from_millis(20));
    }
    m.send("exit");
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let reports = parse_reports(&out.stdout);
    assert!(reports.len() >= 4, "{}", show(&out.stdout));
    for r in &reports {
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let s = r.leak_summary.as_ref().expect("every report classified");
        if r.after_exit {
            assert!(s.scanned.starts_with("scanned at its exit: "), "{}", s.scanned);
        } else {
            assert!(s.scanned.contains("the registers of 4 threads"), "{}", s.scanned);
        }
    }
    assert!(reports.last().is_some_and(|r| r.after_exit));
}

/// Memory that cannot be read (a shared file mapping past the file's end) is counted and said.
#[test]
fn unreadable_memory_is_counted_and_said() {
    let mut f = Proc::spawn("reach workers", {
        let mut c = Command::new(reach());
        c.args(["workers", "1"]);
        c
    });
    let pid = f.pid();
    f.expect_line(&format!("ready {pid}"));
    f.command("unreadable");
    let m = memleak_attached(&["--scan", "-p", &pid.to_string(), "3600"]);
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let reports = parse_reports(&out.stdout);
    assert_eq!(reports.len(), 1, "{}", show(&out.stdout));
    let w = &reports[0].warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("8192 bytes in 1 ranges could not be read (at "), "{w:?}");
    assert!(reports[0].leak_summary.is_some());
    f.send("exit");
    assert_eq!(f.finish().code(), Some(0));
}

/// A thread's malloc arena (not the brk heap) holds a freed block that pointed at another: the
/// other is definitely lost, as valgrind says. memleak also has the thread's stack, mapped
/// memory valgrind does not count as a block: still reachable (glibc's list of cached stacks
/// points into it), and the only difference between the two reports.
#[test]
fn free_memory_of_a_threads_arena_is_no_root() {
    let exe = reach();
    let vg = Command::new("valgrind")
        .args(["--leak-check=full", "--show-leak-kinds=all", "--run-libc-freeres=no"])
        .arg(&exe)
        .arg("arena")
        .output()
        .expect("valgrind runs");
    let vg = parse_valgrind(&String::from_utf8_lossy(&vg.stderr));
    let mut want = vec![row("orphan", "definitely lost", 40, 1), row("start_arena_thread", "possibly lost", 272, 1)];
    want.sort();
    assert_eq!(vg.classes, want, "valgrind's classes");

    let out = memleak_output(&["-c", &format!("{} arena", exe.display())]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let r = final_report(&out.stdout);
    let mut mine = r.classes_by_function(&exe.to_string_lossy());
    let stack = mine
        .iter()
        .position(|c| c.0 == "start_arena_thread" && c.1 == "still reachable")
        .unwrap_or_else(|| panic!("the thread's stack: {}", show(&out.stdout)));
    let stack = mine.remove(stack);
    assert_eq!(stack.3, 1);
    assert!(stack.2 >= 1 << 20, "a thread stack's size: {stack:?}");
    // The in-process capture's library is one more TLS module: each thread's DTV (the possibly
    // lost block from start_arena_thread) has one more 16-byte slot (docs/in-process-capture.md).
    if preload_capture() {
        let dtv = mine.iter_mut().find(|c| c.0 == "start_arena_thread").expect("the thread's DTV");
        dtv.2 -= 16;
    }
    assert_eq!(mine, vg.classes, "{}", show(&out.stdout));
    let (summary, heuristics) = memleak_summary(&r);
    assert_eq!(heuristics, [("threadstack".to_string(), stack.2, 1)]);
    let reachable = |s: &Totals| s.iter().find(|c| c.0 == "still reachable").map(|c| (c.1, c.2)).expect("reachable");
    assert_eq!(reachable(&summary), (reachable(&vg.summary).0 + stack.2, reachable(&vg.summary).1 + 1));
    let mut summary = summary;
    if preload_capture() {
        let possibly = summary.iter_mut().find(|c| c.0 == "possibly lost").expect("possibly lost");
        possibly.1 -= 16;
    }
    assert_eq!(summary[..3], vg.summary[..3], "the lost classes, exactly");
}

/// With --scan under -p, memleak traces the process to its exit: the report after it exits is
/// classified too, scanned at its exit stop.
#[test]
fn p_with_scan_classifies_the_exit_too() {
    let (mut f, pid) = reach_hold(&reach());
    let m = memleak_attached(&["--scan", "--error-exitcode", "3", "-p", &pid.to_string(), "3600"]);
    f.command("build");
    f.send("hold");
    f.expect_line("holding");
    f.send("x");
    assert_eq!(f.finish().code(), Some(0));
    let out = m.finish();
    // Definite leaks in the last report: --error-exitcode's status.
    assert_eq!(out.code(), Some(3), "{}", out.stderr);
    let r = final_report(&out.stdout);
    let s = r.leak_summary.clone().unwrap_or_else(|| panic!("not classified: {}", show(&out.stdout)));
    assert!(s.scanned.starts_with("scanned at its exit: "), "{}", s.scanned);
    // As while it ran (classes_of_a_running_process_equal_valgrinds), but: r12 got its old
    // value back on the way out, so its block is lost now; at the exit stop the holder thread
    // is being killed and its stack, pointer unknown, is scanned whole: the dead frame's block
    // is found there (docs/reachability.md).
    let mine = r.classes_by_function(&reach().to_string_lossy());
    for want in [
        row("hold_in_register", "definitely lost", 104, 1),
        row("dead_frame_block", "still reachable", 88, 1),
        row("stack_block", "still reachable", 72, 1),
        row("orphan", "still reachable", 40, 1),
    ] {
        assert!(mine.contains(&want), "{want:?} in {mine:?}");
    }
    assert_eq!(s.class("definitely lost"), (264 - 40 + 104, 7));
}

/// A thread started while memleak is attached, on a stack the program mapped itself (a guard
/// page mprotected below it): a block memleak knows. The part above its stack pointer is a
/// root, the dead part below is not scanned, and the stack itself is still reachable (glibc's
/// list of user stacks points into it).
#[test]
fn a_stack_mapped_after_attach_is_scanned_from_its_pointer() {
    let exe = reach();
    let (mut f, pid) = reach_hold(&exe);
    let m = memleak_attached(&["--scan", "-o", "0", "-p", &pid.to_string(), "3600"]);
    f.command("late");
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let reports = parse_reports(&out.stdout);
    assert_eq!(reports.len(), 1, "{}", show(&out.stdout));
    let mine = reports[0].classes_by_function(&exe.to_string_lossy());
    for want in [
        row("stack_block", "still reachable", 72, 1),
        row("dead_frame_block", "definitely lost", 88, 1),
        row("start_late_holder", "possibly lost", 272, 1),
    ] {
        assert!(mine.contains(&want), "{want:?} in {}", show(&out.stdout));
    }
    // 256 KiB mapped, its lowest page made a guard page (no longer counted).
    assert!(mine.contains(&row("start_late_holder", "still reachable", 256 * 1024 - 4096, 1)), "{}", show(&out.stdout));
    f.send("exit");
    assert_eq!(f.finish().code(), Some(0));
}

/// JSON, pprof and folded stacks carry the classes and the summary of a classified report.
#[test]
fn structured_outputs_carry_the_class() {
    let exe = reach();
    let dir = std::env::temp_dir().join(format!("memleak-reach-out-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let (pb, folded) = (dir.join("heap.pb.gz"), dir.join("stacks.folded"));
    let out = memleak_output(&[
        "--format",
        "json",
        "--pprof",
        pb.to_str().expect("utf-8"),
        "--folded",
        folded.to_str().expect("utf-8"),
        "-c",
        &format!("{} exit 0", exe.display()),
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    // The last JSON document is the final report (the command's own line is not JSON).
    let last = out.stdout.iter().rev().find(|l| l.starts_with('{')).expect("a JSON report");
    let doc: serde_json::Value = serde_json::from_str(last).expect("JSON");
    let p = &doc["processes"][0];
    let summary: Vec<(String, u64, u64)> = p["summary"]
        .as_array()
        .expect("a summary")
        .iter()
        .map(|c| {
            (c["class"].as_str().unwrap().to_string(), c["bytes"].as_u64().unwrap(), c["allocations"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("definitely lost".to_string(), 264, 7),
            ("indirectly lost".to_string(), 96, 4),
            ("possibly lost".to_string(), 88, 2),
            ("still reachable".to_string(), 4248, 5)
        ]
    );
    let lost: u64 = p["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["class"] == "definitely lost")
        .map(|s| s["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(lost, 264);

    // Folded: each class is an outer frame; the definitely lost lines add up.
    let text = std::fs::read_to_string(&folded).expect("folded file");
    let sum = |class: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("[{class}];")))
            .map(|l| l.rsplit_once(' ').expect("a count").1.parse::<u64>().expect("bytes"))
            .sum()
    };
    assert_eq!((sum("definitely lost"), sum("indirectly lost"), sum("possibly lost")), (264, 96, 88), "{text}");

    // pprof: a class label on each sample, read by the real go tool pprof.
    let raw = Command::new("go")
        .args(["tool", "pprof", "-symbolize=none", "-raw"])
        .arg(&pb)
        .env("PPROF_TMPDIR", &dir)
        .output()
        .expect("go tool pprof runs (golang-go, installed by scripts/setup)");
    let raw = String::from_utf8_lossy(&raw.stdout);
    for class in ["definitely lost", "indirectly lost", "possibly lost", "still reachable"] {
        assert!(raw.contains(&format!("class:[{class}]")), "{class} in {raw}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The reach fixture in its `hold` mode, started and ready for commands: (process, pid).
fn reach_hold(exe: &std::path::Path) -> (Proc, i32) {
    let mut f = Proc::spawn("reach hold", {
        let mut c = Command::new(exe);
        c.arg("hold");
        c
    });
    let pid = f.pid();
    f.expect_line(&format!("ready {pid}"));
    (f, pid)
}
