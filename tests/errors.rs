//! Bad input and impossible requests: a clear one-line message, a non-zero exit, no panic.
mod common;
use std::process::Command;

use common::*;

/// Checks a failed run: non-zero exit, nothing on stdout, one line on stderr that starts with
/// "memleak: " and contains `needle`.
fn assert_one_line_error(out: &Finished, needle: &str) {
    let err = out.stderr.trim_end();
    assert!(!out.status.success(), "exit status {:?} for {needle:?}; stderr: {err}", out.status);
    assert!(out.code().is_some_and(|c| c != 101), "killed or panicked: {:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains('\n'), "not one line: {err:?}");
    assert!(err.starts_with("memleak: "), "{err:?}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
}

fn fails(args: &[&str], needle: &str) {
    let out = memleak_output(args);
    assert_one_line_error(&out, needle);
}

/// A pid that exists no longer: a child that has exited and been reaped.
fn dead_pid() -> i32 {
    let mut c = Command::new("true").spawn().expect("true runs");
    let pid = c.id() as i32;
    c.wait().expect("wait");
    pid
}

#[test]
fn no_such_pid() {
    let pid = dead_pid().to_string();
    fails(&["-p", &pid], &format!("no such process: {pid}"));
}

#[test]
fn kernel_thread() {
    // kthreadd is pid 2.
    fails(&["-p", "2"], "pid 2 is a kernel thread");
}

#[test]
fn process_without_the_allocator() {
    let exe = fixture_without_libc("nolibc");
    let mut p = Proc::spawn("nolibc", Command::new(&exe));
    p.expect_line("ready");
    fails(&["-p", &p.pid().to_string()], "has no libc mapped and its executable defines no malloc");
    p.send("");
    assert_eq!(p.finish().code(), Some(0));
    // The same program as a -c command: found statically linked, refused before it runs.
    fails(&["-c", exe.to_str().expect("utf-8")], "statically linked without malloc");
    // -O naming an object without the allocator.
    let mut q = Proc::spawn("nolibc", Command::new(&exe));
    q.expect_line("ready");
    fails(&["-p", &q.pid().to_string(), "-O", exe.to_str().expect("utf-8")], "defines none of the allocator functions");
}

#[test]
fn missing_obj() {
    let mut f = allocs_fixture(&[]);
    fails(&["-p", &f.pid().to_string(), "-O", "/nonexistent/libfoo.so"], "-O /nonexistent/libfoo.so: no such file");
    fails(&["-c", "/bin/true", "-O", "/nonexistent/libfoo.so"], "-O /nonexistent/libfoo.so: no such file");
    // The process was not disturbed.
    f.command("malloc 1 1");
    // Not an ELF object.
    fails(&["-p", &f.pid().to_string(), "-O", "/etc/passwd"], "-O: /etc/passwd: not an ELF file");
    fails(&["-c", "/bin/true", "-O", "/etc"], "-O: /etc: a directory, not a regular file");
    // Neither a FIFO nor a device is opened for reading: memleak would block or read forever.
    fails(&["-c", "/bin/true", "-O", "/dev/zero"], "-O: /dev/zero: a device, not a regular file");
}

#[test]
fn script_whose_interpreter_does_not_exist() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bad-interpreter");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let script = dir.join("script");
    std::fs::write(&script, "#!/nonexistent/interpreter\n").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    fails(&["-c", script.to_str().expect("utf-8")], "cannot open /nonexistent/interpreter");
}

/// -c under sudo, a program the user may not run. One the user may read but not execute: the
/// exec itself fails, memleak says so and exits non-zero after having attached. One in a
/// directory the user may not enter: memleak, which opens the command's files as the user,
/// refuses before running anything.
#[test]
fn command_that_cannot_be_executed_as_the_user() {
    use std::os::unix::fs::PermissionsExt;
    let run = |prog: &std::path::Path| {
        let mut cmd = memleak_command(&["-c", prog.to_str().expect("utf-8")]);
        cmd.env("SUDO_UID", "65534").env("SUDO_GID", "65534");
        let out = Proc::spawn("memleak", cmd).finish();
        assert_eq!(out.code(), Some(1), "{}", out.stderr);
        without_tracing_lines(&out.stderr).trim_end().to_string()
    };
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("not-executable");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let prog = dir.join("true");
    std::fs::copy("/bin/true", &prog).expect("copy /bin/true");
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o744)).expect("chmod");
    assert_eq!(run(&prog), "memleak: cannot run the command: Permission denied (os error 13)");

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("private");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let prog = dir.join("true");
    std::fs::copy("/bin/true", &prog).expect("copy /bin/true");
    assert_eq!(run(&prog), format!("memleak: cannot open {}: Permission denied (os error 13)", prog.display()));
}

#[test]
fn command_that_does_not_exist() {
    fails(&["-c", "/nonexistent/program arg"], "cannot run /nonexistent/program");
    fails(&["-c", "no-such-command-anywhere"], "cannot run no-such-command-anywhere: no such command");
    // A file that is not executable.
    fails(&["-c", env!("CARGO_MANIFEST_DIR")], "cannot run");
}

#[test]
fn bad_arguments() {
    for (args, needle) in [
        (&["-p", "1", "-c", "ls"][..], "cannot be used with"),
        (&["-p", "1", "-z", "100", "-Z", "10"][..], "can't be greater than max size"),
        (&["-p", "1", "-s", "0"][..], "sample rate"),
        (&["-p", "1", "0"][..], "interval must be at least 1"),
        (&["-p", "1", "-i", "0"][..], "interval must be at least 1"),
        (&["-p", "1", "--sort", "age"][..], "invalid value 'age'"),
        (&["-p", "1", "--bogus"][..], "unexpected argument '--bogus'"),
        (&["-p", "1", "-q"][..], "unexpected argument '-q'"),
        (&["-p", "abc"][..], "invalid value 'abc'"),
        (&["-p", "1", "--max-allocs", "268435456"][..], "the allocation table holds at most 134217728 records"),
        (&["-p", "1", "--max-allocs", "134217729"][..], "--max-allocs 134217729: the allocation table holds at most"),
    ] {
        let out = memleak_output(args);
        assert_one_line_error(&out, needle);
        assert_eq!(out.code(), Some(2), "{args:?}: usage errors exit 2");
    }
}

/// setpriv as on this machine (util-linux).
fn unprivileged(pre: &[&str], args: &[&str]) -> Finished {
    let mut cmd = Command::new("setpriv");
    cmd.args(pre).arg(memleak_bin()).args(args);
    Proc::spawn("memleak", cmd).finish()
}

#[test]
fn without_root_or_capabilities() {
    let mut f = allocs_fixture(&[]);
    let pid = f.pid().to_string();
    let needed = "memleak needs root, or the capabilities CAP_BPF and CAP_PERFMON";
    // An ordinary user.
    let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"];
    assert_one_line_error(&unprivileged(&nobody, &["-p", &pid]), needed);
    assert_one_line_error(&unprivileged(&nobody, &["-c", "/bin/true"]), needed);
    // Root without the capabilities: the bounding set drops them before exec.
    let capless = ["--bounding-set=-sys_admin,-bpf,-perfmon"];
    assert_one_line_error(&unprivileged(&capless, &["-p", &pid]), needed);
    // With CAP_BPF and CAP_PERFMON (and CAP_CHECKPOINT_RESTORE for /proc/PID/map_files,
    // CAP_SYS_PTRACE, ptrace for -c) but not CAP_SYS_ADMIN, the check lets it through and the
    // run works.
    let caps = ["--bounding-set=-sys_admin"];
    let mut m = {
        let mut cmd = Command::new("setpriv");
        cmd.args(caps).arg(memleak_bin()).args(["-o", "0", "-p", &pid, "60"]);
        Proc::spawn("memleak", cmd)
    };
    m.expect("Attaching", |l| l.starts_with("Attaching to pid "));
    f.command("malloc 33 3");
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(parse_reports(&out.stdout)[0].summary(), expected(&[("do_malloc", 99, 3)]));
}

/// An ordinary user holding CAP_BPF and CAP_PERFMON may load BPF, but not read another user's
/// process: memleak asks the kernel's ptrace access check first and says what is missing,
/// with or without -O (which skips reading the process's maps).
#[test]
fn another_users_process_needs_cap_sys_ptrace() {
    let mut f = allocs_fixture(&[]);
    let pid = f.pid().to_string();
    let nobody_with_bpf = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all,+bpf,+perfmon,+checkpoint_restore",
        "--ambient-caps=+bpf,+perfmon,+checkpoint_restore",
    ];
    let needed = format!("cannot trace pid {pid} (uid 0): memleak runs as uid 65534 without CAP_SYS_PTRACE");
    assert_one_line_error(&unprivileged(&nobody_with_bpf, &["-p", &pid]), &needed);
    let libc = "/lib/x86_64-linux-gnu/libc.so.6";
    assert_one_line_error(&unprivileged(&nobody_with_bpf, &["-p", &pid, "-O", libc]), &needed);
    // Nothing was attached: the process allocates untraced and goes on.
    f.command("malloc 8 1");
    f.send("exit 0");
    assert_eq!(f.finish().code(), Some(0));
}

/// The same user's own process needs no CAP_SYS_PTRACE: the check lets it through. It needs
/// CAP_CHECKPOINT_RESTORE, which opening /proc/PID/map_files takes.
#[test]
fn own_process_needs_bpf_perfmon_and_checkpoint_restore() {
    let exe = fixture("allocs");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&exe);
    let mut f = Proc::spawn("allocs", cmd);
    let pid = f.pid().to_string();
    f.expect_line(&format!("ready {pid}"));
    let bpf_only = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all,+bpf,+perfmon",
        "--ambient-caps=+bpf,+perfmon",
    ];
    assert_one_line_error(
        &unprivileged(&bpf_only, &["-p", &pid]),
        "memleak needs root, or the capabilities CAP_BPF and CAP_PERFMON (and CAP_CHECKPOINT_RESTORE",
    );
    let mut m = {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+bpf,+perfmon,+checkpoint_restore",
            "--ambient-caps=+bpf,+perfmon,+checkpoint_restore",
        ]);
        cmd.arg(memleak_bin()).args(["-o", "0", "-p", &pid, "60"]);
        Proc::spawn("memleak", cmd)
    };
    m.expect("Attaching", |l| l.starts_with("Attaching to pid "));
    f.command("malloc 21 2");
    m.signal(libc::SIGINT);
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert_eq!(parse_reports(&out.stdout)[0].summary(), expected(&[("do_malloc", 42, 2)]));
}

/// Help and version are not errors.
#[test]
fn help_and_version_exit_zero() {
    let out = memleak_output(&["--help"]);
    assert_eq!(out.code(), Some(0));
    assert!(out.stdout.iter().any(|l| l.starts_with("EXAMPLES:")), "{:?}", out.stdout);
    let out = memleak_output(&["--version"]);
    assert_eq!(out.code(), Some(0));
    assert_eq!(out.stdout, [format!("memleak {}", env!("CARGO_PKG_VERSION"))]);
}

#[test]
fn exited_process_not_yet_reaped() {
    let mut f = allocs_fixture(&[]);
    let pid = f.pid();
    f.send("exit 0");
    // Not waited for: it stays a zombie until this test reaps it.
    let stat = format!("/proc/{pid}/stat");
    let deadline = std::time::Instant::now() + LINE_TIMEOUT;
    while !std::fs::read_to_string(&stat).unwrap_or_default().contains(") Z ") {
        assert!(std::time::Instant::now() < deadline, "{pid} never became a zombie");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    fails(&["-p", &pid.to_string()], &format!("process {pid} has exited (zombie)"));
    assert_eq!(f.finish().code(), Some(0));
}

/// -p with a thread id: the message names the process to give instead.
#[test]
fn thread_id_instead_of_process_id() {
    let mut f = allocs_fixture(&[]);
    let lines = f.command("park");
    let tid: i32 = lines.iter().find_map(|l| l.strip_prefix("thread ")).and_then(|t| t.parse().ok()).expect("a tid");
    assert_ne!(tid, f.pid());
    fails(&["-p", &tid.to_string()], &format!("{tid} is a thread of process {}: give -p {}", f.pid(), f.pid()));
}
