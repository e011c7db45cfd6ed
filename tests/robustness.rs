//! memleak on a production machine: it sleeps when idle, never panics (closed or full stderr,
//! huge numbers), stops on the signals users send at any moment, and its start-up can always be
//! interrupted.
mod common;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// CPU time (user + system) process `pid` has used, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat.rsplit_once(") ").expect("comm").1.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of stat(5), 12 and 13 after the command name.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as u64 }
}

/// The CPU time `pid` uses over 5 s, as a share of one core.
fn idle_cpu_share(pid: i32) -> f64 {
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(5));
    (cpu_ticks(pid) - before) as f64 / (5 * ticks_per_second()) as f64
}

/// Kernel mode with nothing to report for a minute sleeps: its own CPU time over 5 s is far
/// under 10% of a core (it used to poll with a zero timeout, a whole core).
#[test]
fn kernel_mode_sleeps_when_idle() {
    let mut m = memleak(&["60"]);
    m.expect_line("Attaching to kernel allocators, Ctrl+C to quit.");
    let share = idle_cpu_share(m.pid());
    assert!(share < 0.1, "kernel mode used {:.0}% of a core while idle", share * 100.0);
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
}

/// User mode too: a tick a second, no more.
#[test]
fn user_mode_sleeps_when_idle() {
    let f = allocs_fixture(&[]);
    let m = memleak_attached(&["-p", &f.pid().to_string(), "60"]);
    let share = idle_cpu_share(m.pid());
    assert!(share < 0.1, "user mode used {:.0}% of a core while idle", share * 100.0);
    m.signal(libc::SIGINT);
    assert_eq!(m.finish().code(), Some(0));
}

/// How stderr is given to memleak.
#[derive(Debug, Clone, Copy)]
enum Stderr {
    Closed,
    Full,
}

/// Runs memleak with stderr closed or /dev/full and stdout read; returns (exit code, stdout).
fn run_with_stderr(args: &[&str], how: Stderr) -> (Option<i32>, String) {
    let mut cmd = memleak_command(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    match how {
        Stderr::Full => {
            cmd.stderr(File::options().write(true).open("/dev/full").expect("/dev/full"));
        }
        Stderr::Closed => {
            // SAFETY: close(2) in the child before exec, an async-signal-safe call.
            unsafe {
                cmd.stderr(Stdio::inherit()).pre_exec(|| {
                    libc::close(2);
                    Ok(())
                });
            }
        }
    }
    let out = cmd.output().expect("memleak runs");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Messages to a closed or full stderr are lost, never a panic (exit 101): errors keep their
/// exit status, notes and -v lines do not end the run.
#[test]
fn closed_or_full_stderr_never_panics() {
    let exe = fixture("allocs");
    let cmd = format!("{} 'malloc 8 2' 'exit 3'", exe.display());
    for how in [Stderr::Closed, Stderr::Full] {
        // Usage error, run-time error, and a whole run with -v, a note and a final report.
        assert_eq!(run_with_stderr(&["--bogus"], how).0, Some(2), "{how:?}");
        assert_eq!(run_with_stderr(&["-c", "/nonexistent/program"], how).0, Some(1), "{how:?}");
        let (code, stdout) = run_with_stderr(&["-v", "--max-allocs", "10000001", "-c", &cmd], how);
        assert_eq!(code, Some(3), "{how:?}: the command's status; stdout: {stdout}");
        let lines: Vec<String> = stdout.lines().map(String::from).collect();
        assert_eq!(final_report(&lines).summary(), expected(&[("do_malloc", 16, 2)]), "{how:?}");
    }
    // --help and --version to a closed or full stdout.
    for args in [["--help"], ["--version"]] {
        let status = memleak_command(&args).stdout(File::options().write(true).open("/dev/full").unwrap()).status();
        assert_eq!(status.expect("runs").code(), Some(0));
        // SAFETY: close(1) in the child before exec.
        let status = unsafe {
            memleak_command(&args)
                .pre_exec(|| {
                    libc::close(1);
                    Ok(())
                })
                .status()
        };
        assert_eq!(status.expect("runs").code(), Some(0));
    }
}

/// An interval of 2^64-1 seconds never comes round: no overflow, the command's exit still
/// gives the final report.
#[test]
fn an_interval_past_the_end_of_time() {
    let out = run_under_c(&["18446744073709551615"], &["malloc 40 2"]);
    assert_eq!(parse_reports(&out.stdout).len(), 1, "{:?}", out.stdout);
    assert_eq!(final_report(&out.stdout).summary(), expected(&[("do_malloc", 80, 2)]));
}

/// -o of 2^64 ns and more (it used to wrap to half a millisecond, showing every block) hides
/// every block while the process lives; the final report, after its exit, shows them all.
/// Every other number at its largest is taken too.
#[test]
fn huge_ages_and_counts_hide_nothing_wrongly() {
    let exe = fixture("allocs");
    let cmd = exe.to_str().expect("utf-8");
    let top = usize::MAX.to_string();
    let max = u64::MAX.to_string();
    let mut m = memleak_attached(&["-o", "18446744073710", "-T", &top, "-Z", &max, "-c", cmd, "1", &max]);
    m.expect("the fixture's ready line", |l| l.starts_with("ready "));
    m.command("malloc 100 3");
    // Two reports after the blocks exist: the second was read after they were made.
    for _ in 0..2 {
        m.expect("a report", is_header);
    }
    m.send("exit 0");
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let reports = parse_reports(&out.stdout);
    for r in reports.iter().filter(|r| !r.after_exit) {
        assert!(r.stacks.is_empty(), "a block younger than -o shown: {r:?}");
    }
    assert!(reports.iter().filter(|r| !r.after_exit).count() >= 2);
    assert_eq!(final_report(&out.stdout).summary(), expected(&[("do_malloc", 300, 3)]));
}

/// Above 10 M entries memleak says what the allocation table takes before taking it; -v's
/// measure of the table agrees.
#[test]
fn a_large_allocation_map_is_announced() {
    let out = memleak(&["-v", "--max-allocs", "20000000", "-c", "/bin/true"]).finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let note = out.stderr.lines().next().unwrap_or_default();
    assert_eq!(
        note,
        "memleak: note: --max-allocs 20000000 takes 1.2 GiB of kernel memory at start (the allocation table, 64 bytes per allocation it can hold)"
    );
    let measured: u64 = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("memleak: kernel memory: allocation map "))
        .and_then(|r| r.split(' ').next())
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("no kernel memory line: {}", out.stderr));
    assert_eq!(measured, 1_280_000_000, "{measured} bytes");
}

/// SIGHUP (the terminal went away) ends the run like SIGTERM: a last report, exit 0.
#[test]
fn sighup_gives_the_last_report() {
    let mut f = allocs_fixture(&[]);
    let m = memleak_attached(&["-o", "0", "-p", &f.pid().to_string(), "60"]);
    f.command("malloc 24 2");
    m.signal(libc::SIGHUP);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(parse_reports(&out.stdout).pop().expect("a report").summary(), expected(&[("do_malloc", 48, 2)]));
    f.command("malloc 1 1");
}

/// memleak in a process group of its own, as a shell's job is.
fn memleak_in_own_group(args: &[&str]) -> Proc {
    let mut cmd = memleak_command(args);
    cmd.process_group(0);
    Proc::spawn("memleak", cmd)
}

fn kill_group(pgid: i32, sig: i32) {
    // SAFETY: a signal to the process group of our own child, which leads it.
    assert_eq!(unsafe { libc::kill(-pgid, sig) }, 0);
}

/// A terminal's Ctrl-C reaches memleak and its -c command at once: the command dies of it,
/// and memleak says so, prints the final report of everything and exits with its status.
#[test]
fn ctrl_c_to_the_group_ends_with_the_command() {
    let exe = fixture("allocs");
    let mut m = memleak_in_own_group(&["-c", exe.to_str().expect("utf-8"), "60"]);
    m.expect("Attaching", |l| l.starts_with("Attaching to pid "));
    let ready = m.expect("the fixture's ready line", |l| l.starts_with("ready "));
    let pid: i32 = ready["ready ".len()..].parse().expect("pid");
    m.command("malloc 64 5");
    kill_group(m.pid(), libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(130), "{}", out.stderr);
    assert!(
        out.stdout.iter().any(|l| l.ends_with(&format!("] Process {pid} exited with status 130."))),
        "{:?}",
        out.stdout
    );
    assert_eq!(final_report(&out.stdout).summary(), expected(&[("do_malloc", 320, 5)]));
}

/// Processes whose command line holds `token`.
fn processes_with(token: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(token) {
            found.push(pid);
        }
    }
    found
}

/// Waits until no process holds `token` in its command line.
fn assert_none_left(token: &str) {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        let left = processes_with(token);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ctrl-C at any moment from launch on ends memleak, and nothing of it is left: during
/// start-up it dies at once (its held command reads EOF and exits), later it ends as above.
#[test]
fn ctrl_c_right_after_launch_leaves_nothing_behind() {
    let exe = fixture("allocs");
    for delay_ms in [0, 1, 5, 20, 50, 100, 200] {
        let token = format!("memleak-robustness-{}-{delay_ms}", std::process::id());
        let cmd = format!("{} {token}", exe.display());
        let m = memleak_in_own_group(&["-c", &cmd]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        kill_group(m.pid(), libc::SIGINT);
        let out = m.finish();
        use std::os::unix::process::ExitStatusExt;
        let ok = out.status.signal() == Some(libc::SIGINT) || out.code() == Some(130);
        assert!(ok, "after {delay_ms} ms: {:?}; stderr: {}", out.status, out.stderr);
        assert_none_left(&token);
    }
}

/// A start-up step held (by gdb, at the BPF object's load) when SIGINT comes: memleak dies of
/// it there, instead of going on to attach and trace; its held command is gone too.
#[test]
fn sigint_in_a_held_start_up_step_ends_memleak() {
    let exe = fixture("allocs");
    let token = format!("memleak-startup-{}", std::process::id());
    // A command without spaces (gdb escapes them): the fixture under a name holding the token.
    let link = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(&token);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&exe, &link).expect("symlink");
    let cmd = link.to_str().expect("utf-8").to_string();
    let out = Command::new("gdb")
        .args(["-batch", "-nx", "-ex", "set startup-with-shell off", "-ex", "break bpf_object__load", "-ex", "run"])
        .args(["-ex", "signal SIGINT", "--args", memleak_bin(), "-c", &cmd])
        .env_remove("SUDO_UID")
        .stdin(Stdio::null())
        .output()
        .expect("gdb runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Breakpoint 1, "), "never held at the load:\n{text}");
    assert!(text.contains("Program terminated with signal SIGINT"), "memleak went on:\n{text}");
    assert!(!text.contains("Attaching to pid"), "{text}");
    assert_none_left(&token);
    std::fs::remove_file(&link).expect("remove the link");
}

/// A reader that stops reading (a pager left open) fills memleak's stdout pipe; Ctrl-C still
/// ends memleak, which says its output was lost, instead of staying blocked in a write.
#[test]
fn sigint_with_stdout_blocked_ends_memleak() {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: descriptors pipe2 just made, owned here.
    let (read_end, write_end) =
        unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on our own pipe.
    let capacity = unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) };
    assert!(capacity > 0);
    let mut f = allocs_fixture(&[]);
    let mut cmd = memleak_command(&["-t", "-p", &f.pid().to_string(), "60"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::from(write_end)).stderr(Stdio::piped());
    let mut m = cmd.spawn().expect("memleak runs");
    drop(cmd); // the parent's copy of the pipe's write end
    let mut read_end = File::from(read_end);
    let mut first = Vec::new();
    let mut byte = [0u8];
    while first.last() != Some(&b'\n') {
        assert_eq!(std::io::Read::read(&mut read_end, &mut byte).expect("read"), 1, "memleak ended: {first:?}");
        first.push(byte[0]);
    }
    assert!(first.starts_with(b"Attaching to pid "), "{first:?}");
    // -t lines (about 45 bytes each) until every page of the pipe is in use (poll then says
    // it takes no more): nobody reads it.
    let full = || {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes the bytes waiting in the pipe into n.
        unsafe { libc::ioctl(read_end.as_raw_fd(), libc::FIONREAD, &mut n) };
        n > capacity - 4096
    };
    let deadline = Instant::now() + LINE_TIMEOUT;
    while !full() {
        assert!(Instant::now() < deadline, "the pipe never filled");
        f.command("malloc 8 100");
    }
    // 4.5 KB more than it can take: memleak blocks on it.
    f.command("malloc 8 100");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(m.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(s) = m.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "memleak stayed blocked on its stdout after SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut m.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(without_tracing_lines(&err), "memleak: standard output is blocked (nobody reads it): output lost\n");
    drop(read_end);
}
