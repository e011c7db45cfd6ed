//! ptrace, as memleak uses it on the processes it follows: seize (never stop a process to
//! attach), learn of their execs, exits and children from the stops, and resume every stop
//! exactly as the process would have gone on untraced (signals delivered, group-stops kept).
use std::io;

/// The options memleak seizes with: stops at exec (a new image: its allocator is found and
/// probed before it runs) and at exit (its memory still readable); when following, the
/// processes it starts are seized too (their threads as well: any thread may start one).
pub fn options(follow: bool) -> libc::c_ulong {
    let mut o = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_TRACEEXEC;
    if follow {
        o |= libc::PTRACE_O_TRACEFORK | libc::PTRACE_O_TRACEVFORK | libc::PTRACE_O_TRACECLONE;
    }
    o as libc::c_ulong
}

fn request(req: libc::c_uint, tid: i32, data: libc::c_ulong) -> io::Result<()> {
    // SAFETY: ptrace requests that take an integer as data on a thread memleak traces (or is
    // about to seize); the kernel checks the rest.
    let r = unsafe { libc::ptrace(req, tid, 0, data) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Seizes thread `tid` without stopping it.
pub fn seize(tid: i32, options: libc::c_ulong) -> io::Result<()> {
    request(libc::PTRACE_SEIZE, tid, options)
}

/// Seizes every thread of process `pid`, those it creates meanwhile too; returns the threads.
pub fn seize_process(pid: i32, options: libc::c_ulong) -> io::Result<Vec<i32>> {
    seize(pid, options)?;
    let mut seized = vec![pid];
    // A thread created while the list is read is seized on the next pass; with TRACECLONE
    // (following) the seized ones report those they create.
    loop {
        let mut new = 0;
        for tid in threads(pid) {
            if !seized.contains(&tid) && seize(tid, options).is_ok() {
                seized.push(tid);
                new += 1;
            }
        }
        if new == 0 {
            return Ok(seized);
        }
    }
}

/// The thread ids of process `pid` (/proc/PID/task).
pub fn threads(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Resumes a stopped thread, delivering `sig` (0: none).
pub fn cont(tid: i32, sig: i32) {
    let _ = request(libc::PTRACE_CONT, tid, sig as libc::c_ulong);
}

/// Resumes a thread in a group-stop without running it: it stays stopped as it would
/// untraced, and memleak hears when it is continued.
pub fn listen(tid: i32) {
    let _ = request(libc::PTRACE_LISTEN, tid, 0);
}

/// Lets a thread go, delivering `sig`: memleak stops tracing it.
pub fn detach(tid: i32, sig: i32) {
    let _ = request(libc::PTRACE_DETACH, tid, sig as libc::c_ulong);
}

/// The message of the event stop a thread is in: a new child's pid, an exit status.
pub fn event_msg(tid: i32) -> Option<u64> {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: PTRACE_GETEVENTMSG writes one unsigned long to the address given.
    let r = unsafe { libc::ptrace(libc::PTRACE_GETEVENTMSG, tid, 0, &mut msg as *mut libc::c_ulong) };
    (r == 0).then_some(msg)
}

/// What waitpid said of a thread memleak traces (or of its own child).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Exited(i32),
    Killed(i32),
    /// An event stop: PTRACE_EVENT_* and the stop signal.
    Event(i32, i32),
    /// A signal on its way to the thread.
    Signal(i32),
}

/// The next change of any traced thread or child, without waiting; None if there is none.
pub fn next_change() -> Option<(i32, Change)> {
    let mut status = 0;
    // SAFETY: waitpid writing to a local.
    let tid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL) };
    if tid <= 0 {
        return None;
    }
    Some((tid, decode(status)))
}

/// The change a waitpid status describes.
pub fn decode(status: i32) -> Change {
    if libc::WIFEXITED(status) {
        return Change::Exited(libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        return Change::Killed(libc::WTERMSIG(status));
    }
    let event = (status >> 16) & 0xff;
    let sig = libc::WSTOPSIG(status);
    if event != 0 { Change::Event(event, sig) } else { Change::Signal(sig) }
}

/// The ids (real, effective, saved, filesystem) of a process's user and group.
pub fn credentials(pid: i32) -> Option<([u32; 4], [u32; 4])> {
    let s = crate::procfs::Status::of(pid)?;
    Some((s.uid?, s.gid?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_decode() {
        assert_eq!(decode(3 << 8), Change::Exited(3));
        assert_eq!(decode(9), Change::Killed(9));
        // A stop (0x7f) with SIGTRAP and PTRACE_EVENT_EXEC (4).
        assert_eq!(decode((4 << 16) | (libc::SIGTRAP << 8) | 0x7f), Change::Event(4, libc::SIGTRAP));
        assert_eq!(decode((libc::SIGUSR1 << 8) | 0x7f), Change::Signal(libc::SIGUSR1));
        let me = std::process::id() as i32;
        let (uid, gid) = credentials(me).unwrap();
        // SAFETY: getuid/getgid have no preconditions.
        assert_eq!((uid[0], gid[0]), unsafe { (libc::getuid(), libc::getgid()) });
        assert!(threads(me).contains(&me));
    }
}
