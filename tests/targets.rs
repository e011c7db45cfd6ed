//! The traced process: -p and -c, the seed's demonstration, exit status, the final report,
//! several tracers at once, and -c under sudo.
mod common;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Starts examples/leaky.c and waits until its libc is mapped (it has no handshake of its own).
fn start_leaky(args: &[&str]) -> Proc {
    let mut cmd = Command::new(fixture("leaky"));
    cmd.args(args);
    let p = Proc::spawn("leaky", cmd);
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", p.pid())).unwrap_or_default();
        if maps.contains("/libc.so") {
            return p;
        }
        assert!(Instant::now() < deadline, "leaky never mapped libc");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The demo's stack: N*16 bytes in N allocations from main, each block of 16 bytes listed.
fn assert_demo_stack(st: &Stack, exe: &std::path::Path) {
    assert_eq!(st.bytes, 16 * st.count, "{st:?}");
    assert_eq!(st.func(0), "main", "{st:?}");
    assert_symbolized(st, exe);
    assert_eq!(st.addrs.len() as u64, st.count, "one addr line per allocation: {st:?}");
    assert!(st.addrs.iter().all(|&(_, size)| size == 16), "{st:?}");
    let mut addrs: Vec<u64> = st.addrs.iter().map(|a| a.0).collect();
    addrs.dedup();
    assert_eq!(addrs.len() as u64, st.count, "distinct addresses: {st:?}");
}

/// The seed's demonstration under -p: one stack from main, growing every interval; the freed
/// 64-byte blocks never show.
#[test]
fn demo_under_p() {
    let leaky = start_leaky(&["100000", "50000"]);
    let pid = leaky.pid().to_string();
    let out = memleak(&["-a", "-p", &pid, "1", "3"]).finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let reports = parse_reports(&out.stdout);
    assert_eq!(reports.len(), 3, "{}", out.stdout.join("\n"));
    let exe = fixture("leaky");
    let mut last = 0;
    for r in &reports {
        assert_eq!(r.stacks.len(), 1, "only the 16-byte leak: {}", out.stdout.join("\n"));
        let st = &r.stacks[0];
        assert_demo_stack(st, &exe);
        assert!(st.count > last, "grows every interval: {}", out.stdout.join("\n"));
        last = st.count;
    }
    assert!(!out.stdout.iter().any(|l| l.contains("size = 64")));
}

/// The demonstration under -c: growing reports while it runs, then its exit and a final report
/// with every one of its 60 leaks.
#[test]
fn demo_under_c() {
    let exe = fixture("leaky");
    let cmd = format!("{} 60 50000", exe.display());
    let out = memleak(&["-a", "-c", &cmd, "1"]).finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let reports = parse_reports(&out.stdout);
    let (periodic, fin): (Vec<&Report>, Vec<&Report>) = reports.iter().partition(|r| !r.after_exit);
    assert_eq!(fin.len(), 1, "{}", out.stdout.join("\n"));
    assert_eq!(fin[0].stacks.len(), 1, "{}", out.stdout.join("\n"));
    assert_eq!((fin[0].stacks[0].bytes, fin[0].stacks[0].count), (960, 60));
    assert_demo_stack(&fin[0].stacks[0], &exe);
    let mut last = 0;
    let mut nonempty = 0;
    for r in &periodic {
        assert!(r.stacks.len() <= 1, "{}", out.stdout.join("\n"));
        if let Some(st) = r.stacks.first() {
            assert_demo_stack(st, &exe);
            assert!(st.count > last && st.count < 60, "grows every interval: {}", out.stdout.join("\n"));
            last = st.count;
            nonempty += 1;
        }
    }
    assert!(nonempty >= 2, "reports while it runs: {}", out.stdout.join("\n"));
    let exit = out.stdout.iter().find(|l| is_exit_line(l)).expect("exit line");
    assert!(exit.ends_with(" exited with status 0."), "{exit}");
}

/// -p sees only what is allocated after the probes are attached.
#[test]
fn p_ignores_blocks_allocated_before_attach() {
    let mut f = allocs_fixture(&[]);
    f.command("malloc 77 1");
    let pid = f.pid().to_string();
    let m = memleak_attached(&["-o", "0", "-p", &pid, "60"]);
    f.command("malloc 88 2");
    f.command("freed 64 10");
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let reports = parse_reports(&out.stdout);
    assert_eq!(reports.len(), 1, "{}", out.stdout.join("\n"));
    assert_eq!(reports[0].summary(), expected(&[("do_malloc", 176, 2)]));
}

/// The command's exit status is memleak's, and is printed; a death by signal N is 128+N.
#[test]
fn exit_status_is_passed_through() {
    let exe = fixture("allocs");
    for (cmd, code) in [("'malloc 10 1' 'exit 7'", 7), ("'exit 0'", 0), ("'kill 15'", 143), ("'kill 6'", 134)] {
        let out = memleak(&["-c", &format!("{} {cmd}", exe.display())]).finish();
        assert_eq!(out.code(), Some(code), "{cmd}: {}\n{}", out.stdout.join("\n"), out.stderr);
        let exit = out.stdout.iter().find(|l| is_exit_line(l)).expect("exit line");
        let pid = out.stdout.iter().find_map(|l| l.strip_prefix("ready ")).expect("ready line");
        assert!(exit.ends_with(&format!("] Process {pid} exited with status {code}.")), "{exit}");
        final_report(&out.stdout);
    }
}

/// The final report after the process exits is symbolized, under -c ...
#[test]
fn final_report_after_exit_is_symbolized_under_c() {
    let out = run_under_c(&[], &["malloc 40 2", "calloc 4 10 1"]);
    let r = final_report(&out.stdout);
    assert_eq!(r.summary(), expected(&[("do_calloc", 40, 1), ("do_malloc", 80, 2)]));
    for st in &r.stacks {
        assert_symbolized(st, &fixture("allocs"));
    }
}

/// ... and under -p, even when the process exits right after allocating.
#[test]
fn final_report_after_exit_is_symbolized_under_p() {
    let mut f = allocs_fixture(&[]);
    let pid = f.pid();
    let mut m = memleak_attached(&["-o", "0", "-p", &pid.to_string(), "60"]);
    // Both at once: the process is gone before memleak's next look at its stacks.
    f.send("malloc 40 2\nexit 0");
    m.expect("Process N exited", is_exit_line);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let exit = out.stdout.iter().find(|l| is_exit_line(l)).expect("exit line");
    assert!(exit.ends_with(&format!("] Process {pid} exited.")), "{exit}");
    let r = final_report(&out.stdout);
    assert_eq!(r.summary(), expected(&[("do_malloc", 80, 2)]), "{}", out.stdout.join("\n"));
    assert_symbolized(&r.stacks[0], &fixture("allocs"));
}

/// Two tracers on two processes at once (and a third on a -c command): each sees its own.
#[test]
fn two_traced_processes_at_once() {
    let mut a = allocs_fixture(&[]);
    let mut b = allocs_fixture(&[]);
    let ma = memleak_attached(&["-o", "0", "-p", &a.pid().to_string(), "60"]);
    let mb = memleak_attached(&["-o", "0", "-p", &b.pid().to_string(), "60"]);
    let exe = fixture("allocs");
    let cmd = format!("{} 'valloc 3000 2' 'exit 0'", exe.display());
    let mc = memleak(&["-c", &cmd]);
    a.command("malloc 111 2");
    b.command("calloc 1 222 3");
    a.command("freed 333 5");
    b.command("malloc 444 1");
    let out_c = mc.finish();
    ma.signal(libc::SIGINT);
    mb.signal(libc::SIGINT);
    let (out_a, out_b) = (ma.finish(), mb.finish());
    let ra = parse_reports(&out_a.stdout);
    let rb = parse_reports(&out_b.stdout);
    assert_eq!(ra.last().expect("a report").summary(), expected(&[("do_malloc", 222, 2)]));
    assert_eq!(rb.last().expect("a report").summary(), expected(&[("do_calloc", 666, 3), ("do_malloc", 444, 1)]));
    assert_eq!(final_report(&out_c.stdout).summary(), expected(&[("do_valloc", 6000, 2)]));
}

/// -c: nothing memleak does between fork and exec counts as the program's (here a program
/// that allocates nothing, run as another user so the child changes ids before exec).
#[test]
fn nothing_between_fork_and_exec_is_reported() {
    let exe = fixture("allocs");
    for sudo in [false, true] {
        let mut cmd = memleak_command(&["-c", &format!("{} 'exit 0'", exe.display())]);
        if sudo {
            cmd.env("SUDO_UID", "65534").env("SUDO_GID", "65534").env("SUDO_USER", "nobody");
        }
        let out = Proc::spawn("memleak", cmd).finish();
        assert_eq!(out.code(), Some(0), "{}", out.stderr);
        let r = final_report(&out.stdout);
        assert_eq!(r.stacks, vec![], "sudo={sudo}: {}", out.stdout.join("\n"));
    }
}

/// -c under sudo runs the command as the invoking user (SUDO_UID/SUDO_GID), and traces it.
#[test]
fn c_under_sudo_runs_as_the_invoking_user() {
    let exe = fixture("allocs");
    let mut cmd = memleak_command(&["-c", &format!("{} uid 'exit 0'", exe.display())]);
    cmd.env("SUDO_UID", "65534").env("SUDO_GID", "65533");
    let out = Proc::spawn("memleak", cmd).finish();
    assert_eq!(out.code(), Some(0), "{}\n{}", out.stdout.join("\n"), out.stderr);
    assert!(out.stdout.iter().any(|l| l == "uid 65534 gid 65533"), "{}", out.stdout.join("\n"));
    // The fixture leaks getuid() bytes.
    assert_eq!(final_report(&out.stdout).summary(), expected(&[("do_malloc", 65534, 1)]));
}

/// A static executable has its allocator inside: found there, under -p and -c.
#[test]
fn static_executable_is_its_own_allocator() {
    let exe = static_fixture("allocs");
    let cmds = ["malloc 100 2", "calloc 2 10 1", "mmap 4096 1", "freed 64 3", "realloc 10 1000"];
    let want = expected(&[("do_calloc", 20, 1), ("do_malloc", 200, 2), ("do_mmap", 4096, 1), ("do_realloc", 1000, 1)]);

    let mut f = start_allocs(&exe, &[]);
    let m = memleak_attached(&["-o", "0", "-p", &f.pid().to_string(), "60"]);
    for c in cmds {
        f.command(c);
    }
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let r = parse_reports(&out.stdout).pop().expect("a report");
    assert_eq!(r.summary(), want, "{}", out.stdout.join("\n"));
    for st in &r.stacks {
        assert_symbolized(st, &exe);
    }

    // Under -c the C library's own start-up allocations (its _dl_* tables, made before main)
    // show as well.
    let out = run_exe_under_c(&exe, &["-T", "50"], &cmds);
    let mut r = final_report(&out.stdout);
    let (mine, startup): (Vec<_>, Vec<_>) = r.stacks.into_iter().partition(|s| s.func(0).starts_with("do_"));
    assert!(
        startup.iter().all(|s| !s.frames.iter().any(|f| f.starts_with("main+"))),
        "only start-up allocations besides the fixture's: {}",
        out.stdout.join("\n")
    );
    r.stacks = mine;
    assert_eq!(r.summary(), want, "{}", out.stdout.join("\n"));
}

/// exec replaces the process's memory: the blocks of the old image are gone with it.
#[test]
fn exec_discards_the_old_images_blocks() {
    let exe = fixture("allocs");
    let mut m = memleak_attached(&["-c", exe.to_str().expect("utf-8")]);
    let ready = m.expect("ready", |l| l.starts_with("ready "));
    m.command("malloc 100 2");
    m.send("exec");
    m.expect_line(&ready);
    m.command("malloc 50 1");
    m.send("exit 0");
    let out = m.finish();
    assert_eq!(final_report(&out.stdout).summary(), expected(&[("do_malloc", 50, 1)]), "{}", out.stdout.join("\n"));

    let mut f = allocs_fixture(&[]);
    let pid = f.pid();
    let m = memleak_attached(&["-o", "0", "-p", &pid.to_string(), "60"]);
    f.command("malloc 100 2");
    f.send("exec");
    f.expect_line(&format!("ready {pid}"));
    f.command("malloc 50 1");
    m.signal(libc::SIGINT);
    let out = m.finish();
    let r = parse_reports(&out.stdout).pop().expect("a report");
    assert_eq!(r.summary(), expected(&[("do_malloc", 50, 1)]), "{}", out.stdout.join("\n"));
}

/// A process in another mount namespace (as in a container) maps files whose paths name other
/// files in memleak's namespace: probes and symbols must reach the files it really mapped
/// (through /proc/PID/map_files), before and after it exits. Here a private namespace has a copy
/// of libc mounted over libc's path, and the fixture mounted over an empty placeholder file.
#[test]
fn p_traces_a_process_in_another_mount_namespace() {
    let exe = fixture("allocs");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("mount-ns");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("directory");
    let libc_path = std::fs::canonicalize("/lib/x86_64-linux-gnu/libc.so.6").expect("Debian's libc");
    let (libc_copy, exe_copy, shown) = (dir.join("libc-copy.so.6"), dir.join("allocs-copy"), dir.join("allocs"));
    std::fs::copy(&libc_path, &libc_copy).expect("copy libc");
    std::fs::copy(&exe, &exe_copy).expect("copy the fixture");
    std::fs::write(&shown, b"").expect("the placeholder");
    let script = format!(
        "mount --bind {} {} && mount --bind {} {} && exec {}",
        libc_copy.display(),
        libc_path.display(),
        exe_copy.display(),
        shown.display(),
        shown.display()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script]);
    let mut f = Proc::spawn("allocs-ns", cmd);
    let pid = f.pid();
    f.expect_line(&format!("ready {pid}"));
    let m = memleak_attached(&["-o", "0", "-p", &pid.to_string(), "60"]);
    f.command("malloc 100 3");
    f.command("freed 64 10");
    f.send("exit 0");
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let r = final_report(&out.stdout);
    assert_eq!(r.summary(), expected(&[("do_malloc", 300, 3)]), "{}", out.stdout.join("\n"));
    // Symbolized after the exit, from the files it mapped; printed by its own paths.
    let st = &r.stacks[0];
    assert_eq!(st.module(0), shown.to_str().expect("utf-8"), "{}", out.stdout.join("\n"));
    assert!(st.frames.iter().any(|f| f.starts_with("main+0x")), "{}", out.stdout.join("\n"));
}
