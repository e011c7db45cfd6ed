//! Signals. During start-up SIGINT, SIGTERM and SIGHUP keep their default action: a start-up
//! step that is slow or stuck can be interrupted, and dying then leaves nothing behind (BPF
//! programs, maps and links are descriptors; a held -c command reads EOF on its go pipe and
//! exits). Once tracing starts ([`Signals::arm`]) they are read from a signalfd and end the run
//! with a report. SIGCHLD is read from the signalfd from the first step, before a -c command
//! is forked, so that its exit cannot be missed.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};

/// The signals that end a run (with a last report once armed).
pub const STOP: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Set once a stop signal was read: the run is ending.
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Whether the run was asked to stop: a stop signal read, or one waiting (blocked, not read
/// yet). Lets a step that waits on something outside (a blocked stdout, a command's exec) give
/// up rather than hold memleak.
pub fn stop_requested() -> bool {
    if STOPPING.load(Ordering::Relaxed) {
        return true;
    }
    // SAFETY: sigpending writes the pending set into a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut set) == 0 && STOP.iter().any(|&s| libc::sigismember(&set, s) == 1)
    }
}

pub struct Signals {
    fd: OwnedFd,
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks SIGCHLD and reads it from a new signalfd; the stop signals are left alone.
    pub fn new() -> Result<Signals> {
        // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: plain libc calls on a local sigset.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
        }
        block(&set)?;
        // SAFETY: signalfd with a valid mask returns a new descriptor or -1.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("signalfd");
        }
        // SAFETY: a descriptor signalfd just returned, owned by nobody else.
        Ok(Signals { fd: unsafe { OwnedFd::from_raw_fd(fd) }, set })
    }

    /// Tracing starts: from now on the stop signals are read from the signalfd. SIGHUP stays
    /// ignored when memleak was started ignoring it (nohup).
    pub fn arm(&mut self) -> Result<()> {
        for s in STOP {
            if s == libc::SIGHUP && ignored(s) {
                continue;
            }
            // SAFETY: adds a valid signal number to our sigset.
            unsafe { libc::sigaddset(&mut self.set, s) };
        }
        block(&self.set)?;
        // SAFETY: updates the mask of our own signalfd.
        if unsafe { libc::signalfd(self.fd.as_raw_fd(), &self.set, 0) } < 0 {
            return Err(std::io::Error::last_os_error()).context("signalfd");
        }
        Ok(())
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The signals received since the last call, lowest number first.
    pub fn read(&self) -> Vec<i32> {
        let mut sigs = Vec::new();
        loop {
            // SAFETY: signalfd_siginfo is plain data; read writes at most its size.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reads into the local struct of `size` bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
            if n != size as isize {
                return sigs;
            }
            let sig = info.ssi_signo as i32;
            if STOP.contains(&sig) {
                STOPPING.store(true, Ordering::Relaxed);
            }
            sigs.push(sig);
        }
    }

    /// Waits until a signal arrives or `timeout_ms` (-1: no limit) passes.
    pub fn wait(&self, timeout_ms: i32) {
        let mut p = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one live pollfd.
        unsafe { libc::poll(&mut p, 1, timeout_ms) };
    }
}

fn block(set: &libc::sigset_t) -> Result<()> {
    // SAFETY: blocks the signals of a valid set for this (single-threaded) process.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, set, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sigprocmask");
    }
    Ok(())
}

fn ignored(sig: i32) -> bool {
    // SAFETY: reads the current action of `sig` into a local.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Whether signal `sig`'s default action ends a process (all but the ignored and stop ones).
pub fn kills_by_default(sig: i32) -> bool {
    ![
        libc::SIGCHLD,
        libc::SIGCONT,
        libc::SIGURG,
        libc::SIGWINCH,
        libc::SIGSTOP,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
    ]
    .contains(&sig)
}

impl From<&crate::procfs::Status> for Masks {
    fn from(s: &crate::procfs::Status) -> Masks {
        Masks { pending: s.sig_pending, blocked: s.sig_blocked, ignored: s.sig_ignored, caught: s.sig_caught }
    }
}

/// The signal masks of a process, from /proc/PID/status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Masks {
    /// Pending for the thread (SigPnd) or the process (ShdPnd).
    pub pending: u64,
    pub blocked: u64,
    pub ignored: u64,
    pub caught: u64,
}

impl Masks {
    pub fn of(pid: i32) -> Option<Masks> {
        Some(Masks::from(&crate::procfs::Status::of(pid)?))
    }

    /// Whether `sig`, delivered now, ends the process: its default action, not caught nor
    /// ignored (SIGKILL always).
    pub fn kills(&self, sig: i32) -> bool {
        let bit = 1u64 << (sig - 1);
        sig == libc::SIGKILL || (kills_by_default(sig) && (self.ignored | self.caught) & bit == 0)
    }

    /// Whether a signal that will end the process is pending and not blocked.
    pub fn dying(&self) -> bool {
        (1..=64).any(|s| {
            let bit = 1u64 << (s - 1);
            self.pending & bit != 0 && (s == libc::SIGKILL || self.blocked & bit == 0) && self.kills(s)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_tell_a_dying_process() {
        let status = "Name:\tx\nSigQ:\t0/1\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000002\n\
                      SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\nSigCgt:\t0000000000000000\n";
        let m = Masks::from(&crate::procfs::Status::parse(status));
        assert_eq!(m.pending, 2);
        assert!(m.dying(), "SIGINT pending, default action");
        assert!(!Masks { caught: 2, ..m }.dying(), "a handler for SIGINT");
        assert!(!Masks { ignored: 2, ..m }.dying(), "SIGINT ignored");
        assert!(!Masks { blocked: 2, ..m }.dying(), "SIGINT blocked");
        // SIGKILL cannot be blocked, caught or ignored.
        let kill = 1 << (libc::SIGKILL - 1);
        assert!(Masks { pending: kill, blocked: kill, caught: kill, ..m }.dying());
        // SIGCHLD's default is to ignore it.
        assert!(!Masks { pending: 1 << (libc::SIGCHLD - 1), ..m }.dying());
        assert!(!Masks::default().dying());
    }
}
