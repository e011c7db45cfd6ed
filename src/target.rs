//! The traced process: checking a -p pid, and running a -c command held before exec until the
//! probes are in place (its allocator is found by src/allocator).
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::procfs::Status;

use crate::ldso::{self, LoadOrder};

const PF_KTHREAD: u64 = 0x0020_0000;

/// Checks that `pid` is a live user-space process.
pub fn check_pid(pid: i32) -> Result<()> {
    let stat = match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("no such process: {pid}"),
        Err(e) => return Err(e).with_context(|| format!("cannot read /proc/{pid}/stat")),
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        bail!("process {pid} has exited (zombie)");
    }
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    if flags & PF_KTHREAD != 0 {
        bail!("pid {pid} is a kernel thread: run memleak without -p to trace the kernel's allocators");
    }
    // /proc/TID exists for every thread too; the probes and records go by process.
    let tgid = Status::of(pid).and_then(|s| s.tgid);
    if let Some(tgid) = tgid
        && tgid != pid
    {
        bail!("{pid} is a thread of process {tgid}: give -p {tgid}");
    }
    Ok(())
}

const CAP_SYS_PTRACE: u32 = 19;

/// Checks that memleak may read process `pid`'s memory as the kernel's ptrace access check
/// (PTRACE_MODE_READ_FSCREDS) decides it: the same user (real, effective and saved ids all
/// memleak's filesystem ids) and a dumpable process, or CAP_SYS_PTRACE. Tracing a process
/// exposes its data, so memleak asks the kernel that question before attaching anything:
/// opening /proc/PID/environ makes exactly that check. A -c command, memleak's own child, needs
/// none. Fails with one line naming what is missing.
pub fn check_access(pid: i32) -> Result<()> {
    let err = match fs::File::open(format!("/proc/{pid}/environ")) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("no such process: {pid}"),
        Err(e) => e,
    };
    if err.raw_os_error() != Some(libc::EACCES) && err.raw_os_error() != Some(libc::EPERM) {
        return Err(err).with_context(|| format!("cannot check access to process {pid} (/proc/{pid}/environ)"));
    }
    bail!("{}", access_denied(pid, &Status::of(pid).unwrap_or_default(), &Status::own()))
}

/// Why the kernel refused access to `pid`, from its status and memleak's own.
fn access_denied(pid: i32, status: &Status, own: &Status) -> String {
    let ids = |v: Option<[u32; 4]>| v.map(|a| a.to_vec()).unwrap_or_default();
    let (uid, gid) = (ids(status.uid), ids(status.gid));
    let (my_uid, my_gid) = (ids(own.uid), ids(own.gid));
    let has_ptrace = own.has_cap(CAP_SYS_PTRACE);
    // The effective ids: a set-uid program's real uid is its caller's.
    let target_uid = uid.get(1).map_or("?".to_string(), |u| u.to_string());
    // The kernel compares memleak's filesystem ids (the 4th) with the target's real,
    // effective and saved ids (the first three).
    let my_fsuid = my_uid.get(3).copied();
    let my_fsgid = my_gid.get(3).copied();
    let same_uid = my_fsuid.is_some_and(|u| uid.iter().take(3).all(|x| *x == u));
    let same_gid = my_fsgid.is_some_and(|g| gid.iter().take(3).all(|x| *x == g));
    let show = |v: Option<u32>| v.map_or("?".to_string(), |u| u.to_string());
    if has_ptrace {
        // An LSM, or a target in a user namespace memleak's capabilities do not cover.
        format!(
            "cannot trace pid {pid} (uid {target_uid}): the kernel denies access to its memory although memleak has CAP_SYS_PTRACE (a security module, or another user namespace)"
        )
    } else if !same_uid {
        format!(
            "cannot trace pid {pid} (uid {target_uid}): memleak runs as uid {} without CAP_SYS_PTRACE",
            show(my_fsuid)
        )
    } else if !same_gid {
        let target_gid = gid.get(1).map_or("?".to_string(), |g| g.to_string());
        format!(
            "cannot trace pid {pid} (uid {target_uid}, gid {target_gid}): memleak runs as gid {} without CAP_SYS_PTRACE",
            show(my_fsgid)
        )
    } else {
        format!(
            "cannot trace pid {pid} (uid {target_uid}): it is not dumpable (set-uid, or prctl PR_SET_DUMPABLE 0) and memleak runs without CAP_SYS_PTRACE"
        )
    }
}

/// Says what the dynamic linker will not find or do as memleak found it (always), and with
/// -v the objects the command loads, in symbol lookup order.
pub fn report_load_order(order: &LoadOrder, verbose: bool) {
    for n in &order.notes {
        errln!("memleak: note: {n}");
    }
    for m in &order.missing {
        let (name, by) = (m.name.to_string_lossy(), m.needed_by.display());
        if m.preload {
            errln!("memleak: note: {by} object {name}: {}: the dynamic linker ignores it", m.why);
        } else {
            errln!("memleak: note: {name}, needed by {by}: {}: the dynamic linker will not start the program", m.why);
        }
    }
    if !verbose {
        return;
    }
    for s in &order.scripts {
        errln!("memleak: {} is run by its #! interpreter", s.display());
    }
    let secure = if order.secure { " (secure mode)" } else { "" };
    errln!("memleak: {} loads, in symbol lookup order{secure}:", order.executable().path.display());
    for o in &order.objects {
        let preload = if o.preload { ", preloaded" } else { "" };
        errln!("memleak:   {} ({}{preload})", o.path.display(), o.found.describe());
    }
    if let Some(i) = &order.interpreter {
        errln!("memleak:   interpreter {}", i.path.display());
    }
}

/// The credentials a -c command runs with, when not memleak's own (under sudo).
pub fn command_credentials() -> Option<ldso::Credentials> {
    sudo_user().map(|(uid, gid, groups)| ldso::Credentials { uid, gid, groups })
}

/// Resolves a command name as execvp would, so that a missing program is reported up front.
pub fn resolve_program(name: &str) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![PathBuf::from(name)]
    } else {
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path).map(|d| d.join(name)).collect()
    };
    for c in &candidates {
        if let Ok(meta) = fs::metadata(c) {
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(c.clone());
            }
            if name.contains('/') {
                bail!("cannot run {name}: not an executable file");
            }
        }
    }
    bail!("cannot run {name}: no such command")
}

/// A -c command forked and held before exec: it runs its program only once released.
pub struct HeldChild {
    pub pid: i32,
    go: OwnedFd,
    exec_err: OwnedFd,
}

/// The user a command runs as under sudo: SUDO_UID/SUDO_GID, when memleak runs as root.
fn sudo_user() -> Option<(u32, u32, Vec<libc::gid_t>)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let uid: u32 = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    let gid: u32 = std::env::var("SUDO_GID").ok()?.parse().ok()?;
    let mut groups = vec![gid];
    if let Ok(user) = std::env::var("SUDO_USER") {
        let name = CString::new(user).ok()?;
        let mut n: libc::c_int = 64;
        let mut buf = vec![0 as libc::gid_t; n as usize];
        // SAFETY: buf holds n entries; getgrouplist writes at most n and updates n.
        let r = unsafe { libc::getgrouplist(name.as_ptr(), gid, buf.as_mut_ptr(), &mut n) };
        if r >= 0 {
            buf.truncate(n as usize);
            groups = buf;
        }
    }
    Some((uid, gid, groups))
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: pipe2 just returned these descriptors, owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn cstring(s: &[u8]) -> Result<CString> {
    CString::new(s).map_err(|_| anyhow::anyhow!("argument holds a NUL byte"))
}

impl HeldChild {
    /// Forks `argv` (argv[0] already resolved to `prog`), holding the child before exec.
    pub fn spawn(prog: &Path, argv: &[String]) -> Result<HeldChild> {
        Self::spawn_with(prog, argv, &[], &[])
    }

    /// spawn, with `set` in the command's environment (replacing those names; `{pid}` in a
    /// value becomes the command's pid) and the descriptors `keep` inherited across its exec
    /// (the in-process capture's library).
    pub fn spawn_with(prog: &Path, argv: &[String], set: &[(String, String)], keep: &[i32]) -> Result<HeldChild> {
        // Everything the child needs is built before fork: after it, no allocation.
        let path = cstring(prog.as_os_str().as_bytes())?;
        let args: Vec<CString> = argv.iter().map(|a| cstring(a.as_bytes())).collect::<Result<_>>()?;
        let mut arg_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        arg_ptrs.push(std::ptr::null());
        let env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| !set.iter().any(|(n, _)| k.as_bytes() == n.as_bytes()))
            .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
            .chain(set.iter().map(|(k, v)| cstring(format!("{k}={v}").as_bytes())))
            .collect::<Result<_>>()?;
        let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        env_ptrs.push(std::ptr::null());
        // Values naming the pid, completed in the child into buffers allocated here: (index in
        // env_ptrs, text before the pid, text after it, the buffer).
        type WithPid = (usize, Vec<u8>, Vec<u8>, Vec<u8>);
        let mut with_pid: Vec<WithPid> = Vec::new();
        // Only memleak's own entries (the last ones): the user's values stay as they are.
        for (i, e) in env.iter().enumerate().skip(env.len() - set.len()) {
            let b = e.as_bytes();
            if let Some(at) = b.windows(5).position(|w| w == b"{pid}") {
                with_pid.push((i, b[..at].to_vec(), b[at + 5..].to_vec(), Vec::with_capacity(b.len() + 16)));
            }
        }
        let user = sudo_user();
        let (go_rd, go_wr) = pipe()?;
        let (err_rd, err_wr) = pipe()?;

        // SAFETY: fork in a process with no other threads yet; the child below makes only
        // async-signal-safe syscalls on memory prepared before the fork, then execs or exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if pid == 0 {
            // SAFETY: see above.
            unsafe {
                let fail = |fd: i32| -> ! {
                    let e = *libc::__errno_location();
                    libc::write(fd, (&e as *const i32).cast(), 4);
                    libc::_exit(127)
                };
                let err = err_wr.as_raw_fd();
                libc::close(go_wr.as_raw_fd());
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
                let empty: libc::sigset_t = std::mem::zeroed();
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                if let Some((uid, gid, groups)) = &user
                    && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(*gid) != 0
                        || libc::setuid(*uid) != 0)
                {
                    fail(err);
                }
                // Wait for the tracer: one byte means go; EOF means it gave up.
                let mut b = 0u8;
                loop {
                    let n = libc::read(go_rd.as_raw_fd(), (&mut b as *mut u8).cast(), 1);
                    if n == 1 {
                        break;
                    }
                    if n == 0 || *libc::__errno_location() != libc::EINTR {
                        libc::_exit(127);
                    }
                }
                for &fd in keep {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
                // Within the capacity reserved before fork: no allocation.
                let mut digits = [0u8; 12];
                let mut n = libc::getpid() as u32;
                let mut d = digits.len();
                loop {
                    d -= 1;
                    digits[d] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                for (i, head, tail, buf) in with_pid.iter_mut() {
                    buf.clear();
                    buf.extend_from_slice(head);
                    buf.extend_from_slice(&digits[d..]);
                    buf.extend_from_slice(tail);
                    buf.push(0);
                    env_ptrs[*i] = buf.as_ptr().cast();
                }
                libc::execve(path.as_ptr(), arg_ptrs.as_ptr(), env_ptrs.as_ptr());
                fail(err);
            }
        }
        drop(go_rd);
        drop(err_wr);
        Ok(HeldChild { pid, go: go_wr, exec_err: err_rd })
    }

    /// Lets the child exec its program; fails if the exec failed.
    pub fn release(self) -> Result<i32> {
        let b = 1u8;
        // SAFETY: writes one byte from a live stack variable to our pipe.
        let n = unsafe { libc::write(self.go.as_raw_fd(), (&b as *const u8).cast(), 1) };
        if n != 1 {
            let e = std::io::Error::last_os_error();
            // It died before it was released (a Ctrl-C to the whole group): the run's loop
            // reaps it and reports its status.
            if e.raw_os_error() == Some(libc::EPIPE) {
                return Ok(self.pid);
            }
            return Err(e).context("releasing the command");
        }
        // The error pipe closes on a successful exec (O_CLOEXEC) or carries errno.
        let mut f = fs::File::from(self.exec_err);
        let mut e = [0u8; 4];
        loop {
            let mut p = libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one live pollfd.
            if unsafe { libc::poll(&mut p, 1, 20) } == 0 {
                // Asked to stop while its exec takes long: the run's loop ends the run.
                if crate::signals::stop_requested() {
                    return Ok(self.pid);
                }
                // A signal stopped it before its exec, in memleak's ptrace: let it go on.
                resume_stopped(self.pid);
                continue;
            }
            return match f.read(&mut e) {
                Ok(4) => {
                    let err = std::io::Error::from_raw_os_error(i32::from_ne_bytes(e));
                    bail!("cannot run the command: {err}")
                }
                _ => Ok(self.pid),
            };
        }
    }
}

/// Lets a held child that a signal stopped under memleak's ptrace (signal-delivery or group
/// stop) go on as it would untraced; leaves any other state to the run's loop.
fn resume_stopped(pid: i32) {
    // SAFETY: waitid and ptrace on our own child, writing to a local siginfo.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let flags = libc::WSTOPPED | libc::WNOHANG | libc::WNOWAIT | libc::__WALL;
        if libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) != 0 || info.si_pid() != pid {
            return;
        }
        if info.si_code != libc::CLD_TRAPPED {
            return;
        }
        let status = info.si_status();
        let event = status >> 8;
        if event != 0 && event != libc::PTRACE_EVENT_STOP {
            return; // its exec or exit stop: the loop's to handle
        }
        let mut wstatus = 0;
        if libc::waitpid(pid, &mut wstatus, libc::WNOHANG | libc::__WALL) != pid || !libc::WIFSTOPPED(wstatus) {
            return;
        }
        if (wstatus >> 16) & 0xff == libc::PTRACE_EVENT_STOP {
            libc::ptrace(libc::PTRACE_LISTEN, pid, 0, 0);
        } else {
            libc::ptrace(libc::PTRACE_CONT, pid, 0, libc::WSTOPSIG(wstatus) as libc::c_ulong);
        }
    }
}

#[cfg(test)]
mod access_tests {
    use super::access_denied;
    use crate::procfs::Status;

    fn status(uid: &str, gid: &str, cap_eff: &str) -> Status {
        Status::parse(&format!("Name:\tx\nUid:\t{uid}\nGid:\t{gid}\nCapEff:\t{cap_eff}\n"))
    }

    #[test]
    fn the_refusal_names_what_is_missing() {
        let root = status("0\t0\t0\t0", "0\t0\t0\t0", "000001ffffffffff");
        let nobody = status("65534\t65534\t65534\t65534", "65534\t65534\t65534\t65534", "000000c000000000");
        assert_eq!(
            access_denied(7, &root, &nobody),
            "cannot trace pid 7 (uid 0): memleak runs as uid 65534 without CAP_SYS_PTRACE"
        );
        // Same user, another group.
        let other_group = status("65534\t65534\t65534\t65534", "100\t100\t100\t100", "0");
        assert_eq!(
            access_denied(7, &other_group, &nobody),
            "cannot trace pid 7 (uid 65534, gid 100): memleak runs as gid 65534 without CAP_SYS_PTRACE"
        );
        // Same ids: the process made itself not dumpable.
        assert!(access_denied(7, &nobody, &nobody).contains("not dumpable"));
        // A set-uid program keeps the caller's real uid but not the saved and effective ones.
        let setuid = status("65534\t0\t0\t0", "65534\t65534\t65534\t65534", "0");
        assert_eq!(
            access_denied(7, &setuid, &nobody),
            "cannot trace pid 7 (uid 0): memleak runs as uid 65534 without CAP_SYS_PTRACE"
        );
        // With CAP_SYS_PTRACE (bit 19) something else refused.
        let with_ptrace = status("65534\t65534\t65534\t65534", "65534\t65534\t65534\t65534", "0000000000080000");
        assert!(access_denied(7, &root, &with_ptrace).contains("although memleak has CAP_SYS_PTRACE"));
    }
}
