//! The in-process capture (-c's default, docs/in-process-capture.md) where interposers
//! usually break: forked children, exec into a static image, `__libc_malloc` called directly,
//! signal handlers, many threads; and its trust boundary: a process memleak does not expect
//! gets no region, and a region the process wrote over cannot hurt memleak.
//!
//! Tests of exact numbers run with the suite's capture (./test runs it in both modes); those
//! about the library itself ask for `--capture preload`.
mod common;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use common::*;

fn job_fixture(name: &str, extra: &[&str]) -> PathBuf {
    fixture_in("job", name, extra)
}

fn text(out: &Finished) -> String {
    format!("stdout:\n{}\nstderr:\n{}", out.stdout.join("\n"), out.stderr)
}

/// The line -v prints for a process the library records.
fn in_process_line(pid: i32) -> String {
    format!("memleak: capture: in-process (preload library) for pid {pid}")
}

/// The single final report of `memleak ARGS -c "preload CMD"`, with the run's output.
fn run_preload_fixture(args: &[&str], cmd: &str) -> (Report, Finished) {
    let exe = fixture("preload");
    let mut all = vec!["--no-scan", "-v"];
    all.extend(args);
    let c = format!("{} {cmd}", exe.display());
    all.extend(["-c", &c]);
    let out = memleak_output(&all);
    assert_eq!(out.code(), Some(0), "{}", text(&out));
    assert!(out.stdout.iter().any(|l| l == "done"), "the fixture ran to its end: {}", text(&out));
    let r = final_report(&out.stdout);
    (r, out)
}

/// A forked child connects for a region of its own: its blocks are its own, exactly, and so
/// are its parent's.
#[test]
fn a_forked_child_is_followed_in_process() {
    let out = run_under_c(&["-v", "--no-scan", "--capture", "preload"], &["malloc 24 3", "fork_leak 77 2"]);
    let child: i32 = out
        .stdout
        .iter()
        .find_map(|l| l.strip_prefix("child "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("the fixture names its child: {}", text(&out)));
    assert!(out.stderr.contains(&in_process_line(child)), "{}", text(&out));
    let finals: std::collections::BTreeMap<i32, Vec<(String, u64, u64)>> =
        final_reports(&out.stdout).into_iter().map(|(pid, r)| (pid, r.summary())).collect();
    assert_eq!(finals.get(&child), Some(&expected(&[("do_fork_leak", 154, 2)])), "{}", text(&out));
    let parent = finals.keys().copied().find(|&p| p != child).expect("the parent's final report");
    assert!(out.stderr.contains(&in_process_line(parent)), "{}", text(&out));
    assert_eq!(finals[&parent], expected(&[("do_malloc", 72, 3)]), "{}", text(&out));
}

/// exec into a static image: the library cannot go there; the image is traced with uprobes,
/// said in a note, and its report is exact.
#[test]
fn an_exec_into_a_static_image_falls_back_to_uprobes_with_a_note() {
    let target = job_fixture("leak_static", &["-static"]);
    let exe = job_fixture("exec_into", &[]);
    let out = memleak_output(&[
        "--no-scan",
        "-v",
        "--capture",
        "preload",
        "-c",
        &format!("{} {}", exe.display(), target.display()),
    ]);
    assert_eq!(out.code(), Some(0), "{}", text(&out));
    let f = final_reports(&out.stdout);
    assert_eq!(f.len(), 1, "{}", text(&out));
    let (pid, r) = &f[0];
    let note = format!("memleak: note: pid {pid}: {} is statically linked: traced with uprobes", target.display());
    assert!(out.stderr.contains(&note), "no {note:?}: {}", text(&out));
    assert!(out.stderr.contains(&format!("memleak: capture: uprobes for pid {pid}")), "{}", text(&out));
    let sums = |name: &str| r.stacks_in(name).iter().fold((0, 0), |a, s| (a.0 + s.bytes, a.1 + s.count));
    assert_eq!(sums("static_leak"), (192, 3), "{}", text(&out));
    assert_eq!(sums("before_exec"), (0, 0), "the old image's block went with it: {}", text(&out));
}

/// A program calling glibc's `__libc_malloc` by that name: recorded like malloc.
#[test]
fn libc_malloc_called_directly_is_seen() {
    let (r, out) = run_preload_fixture(&[], "libc_malloc 100 3");
    assert_eq!(r.summary(), expected(&[("do_libc_malloc", 300, 3)]), "{}", text(&out));
    if preload_capture() {
        assert!(out.stderr.contains("memleak: capture: in-process (preload library) for pid "), "{}", text(&out));
    }
}

/// Signal handlers that allocate: one leaks a block each time it runs, another allocates and
/// frees while landing inside the main thread's malloc or free (a timer every 50 us). In-process
/// only: under uprobes a handler's call made inside an allocator call replaces that call's
/// per-thread state (the uprobe design: said in a WARNING, "a signal handler that allocated"),
/// which the library's per-thread depth does not need.
#[test]
fn allocations_in_signal_handlers_are_exact() {
    let (r, out) = run_preload_fixture(&["--capture", "preload"], "signal 64 20");
    assert_eq!(r.summary(), expected(&[("do_handler_malloc", 64 * 20, 20)]), "{}", text(&out));
    // Nothing lost; walks that stop at the signal frame (a CFA rule the tables do not model)
    // are said, and only those.
    let losses: Vec<&String> = r.warnings.iter().filter(|w| !w.contains(" end early: ")).collect();
    assert!(losses.is_empty(), "{}", text(&out));
}

/// Many threads allocating and freeing at once, in-process: every thread's blocks exact.
#[test]
fn a_thread_heavy_run_is_exact_in_process() {
    let out = run_under_c(&["--no-scan", "-v", "--capture", "preload", "-T", "50"], &["quiet", "threads 16 40 300"]);
    let r = final_report(&out.stdout);
    let total = r.stacks_in("do_thread_malloc").iter().fold((0, 0), |(b, n), s| (b + s.bytes, n + s.count));
    assert_eq!(total, (16 * 300 * 40, 16 * 300), "{}", text(&out));
    assert!(r.stacks_in("do_malloc_and_free").is_empty(), "{}", text(&out));
    assert!(out.stderr.contains("memleak: capture: in-process (preload library) for pid "), "{}", text(&out));
}

/// A process memleak does not expect (this test, root, connecting with a well-formed hello):
/// refused, and handed no descriptor.
#[test]
fn a_foreign_process_gets_no_region() {
    let mut m =
        memleak_attached(&["--no-scan", "--capture", "preload", "-c", &fixture("allocs").display().to_string()]);
    let ready = m.expect("the fixture's ready line", |l| l.starts_with("ready "));
    let pid: i32 = ready.trim_start_matches("ready ").trim().parse().expect("a pid");
    // The socket's name, from the command's environment.
    let env = std::fs::read(format!("/proc/{pid}/environ")).expect("the command's environment");
    let name = env
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"MEMLEAK_PRELOAD=".as_slice()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .expect("MEMLEAK_PRELOAD in the command's environment");
    // SAFETY: a new socket of ours, connected to an abstract address built here; the hello
    // and the answer go through local buffers.
    let fd = unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        std::os::fd::OwnedFd::from_raw_fd(fd)
    };
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path[1..].iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    let len = (size_of::<libc::sa_family_t>() + 1 + name.len()) as libc::socklen_t;
    // SAFETY: connect with the address above.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) };
    assert_eq!(r, 0, "connect to memleak's socket: {}", std::io::Error::last_os_error());
    // The library's hello (layout.rs: magic, offset of its per-thread word).
    let mut hello = 0x6f6c_6c65_686b_6c6du64.to_ne_bytes().to_vec();
    hello.extend(0i64.to_ne_bytes());
    // SAFETY: a send from a local buffer.
    let sent = unsafe { libc::send(fd.as_raw_fd(), hello.as_ptr().cast(), hello.len(), 0) };
    assert_eq!(sent, 16, "send a hello: {}", std::io::Error::last_os_error());
    // The answer, with any descriptor that came with it (a refusal comes at once).
    let mut buf = [0u8; 16];
    let mut cmsg = [0u8; 64];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: a plain msghdr over local buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.len();
    // SAFETY: recvmsg into the buffers above.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
    assert!(n == 0 || n == 16, "recvmsg: {n}: {}", std::io::Error::last_os_error());
    assert_eq!(msg.msg_controllen, 0, "no descriptor handed to a foreign process");
    if n == 16 {
        assert_eq!(u64::from_ne_bytes(buf[8..16].try_into().unwrap()), 0, "the answer is a refusal");
    }
    drop(fd);
    // The traced command still works and is still exact.
    m.command("malloc 40 2");
    m.send("exit 0");
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "{}", text(&out));
    assert_eq!(final_report(&out.stdout).summary(), expected(&[("do_malloc", 80, 2)]), "{}", text(&out));
}

/// A process that writes 0xff over its whole region (all but the header): memleak reads it
/// bounded, says so in a WARNING, and exits normally.
#[test]
fn a_region_the_process_wrote_over_is_warned_of_and_survived() {
    let (r, out) = run_preload_fixture(&["--capture", "preload", "--max-allocs", "4096"], "scribble 40 3");
    assert!(out.stdout.iter().any(|l| l == "scribbled"), "{}", text(&out));
    assert!(
        r.warnings.iter().any(|w| w.contains("wrote over its in-process capture region")),
        "no WARNING: {}",
        text(&out)
    );
    assert!(!out.stderr.contains("panicked"), "{}", text(&out));
}

/// The unwind tables every process shares: none can make them writable, through its mapping
/// or by reopening the file (as root, through /proc/self/map_files): memleak's mapping is the
/// only writable one (F_SEAL_FUTURE_WRITE).
#[test]
fn the_shared_tables_cannot_be_made_writable() {
    let (_, out) = run_preload_fixture(&["--capture", "preload"], "tables 0 0");
    let said: Vec<&String> = out.stdout.iter().filter(|l| l.starts_with("tables: ") || l.starts_with("no ")).collect();
    assert!(said.is_empty(), "{}", text(&out));
}

/// --sample-bytes in either capture: 20,000 blocks of 100 bytes sampled on average once per
/// 4,096 bytes (about 490 samples) are reported as an estimate of the 2,000,000 bytes, within
/// 20% (4 standard deviations of the sample count).
#[test]
fn sampling_by_bytes_estimates_the_same_in_either_capture() {
    let out = run_under_c(&["--no-scan", "-v", "--sample-bytes", "4096"], &["quiet", "malloc 100 20000"]);
    if preload_capture() {
        assert!(out.stderr.contains("memleak: capture: in-process (preload library) for pid "), "{}", text(&out));
    }
    let r = final_report(&out.stdout);
    let (bytes, count) = r.summary().iter().filter(|s| s.0 == "do_malloc").fold((0, 0), |a, s| (a.0 + s.1, a.1 + s.2));
    assert!((1_600_000..=2_400_000).contains(&bytes), "{bytes} bytes: {}", text(&out));
    assert!((16_000..=24_000).contains(&count), "{count} blocks: {}", text(&out));
}
