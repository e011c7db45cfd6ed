//! Stopping every thread of a running process for a scan, reading its registers, and letting
//! each thread go on exactly as it was: a thread in a group-stop (SIGSTOP, Ctrl-Z) stays
//! stopped, a signal that arrived meanwhile is delivered, a thread memleak traces anyway (the
//! -c command's main thread) stays traced.
//!
//! PTRACE_SEIZE + PTRACE_INTERRUPT, unlike PTRACE_ATTACH, sends no SIGSTOP: nothing the
//! process can see, except that a system call interrupted by the stop is restarted (or, for
//! the few that never restart, e.g. epoll_wait, returns EINTR, as after SIGSTOP/SIGCONT).
use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How long a thread may take to stop: one in a killable sleep in the kernel (a vfork parent
/// waiting for its child, some file systems) stops only when it leaves it.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// How a stopped thread is let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// Seized for the scan: detach, delivering `sig` if it was on its way (0: none).
    Detach(i32),
    /// Traced anyway: continue, delivering `sig`.
    Cont(i32),
    /// Traced anyway and in a group-stop: stays stopped, its tracer notified when that ends.
    Listen,
    /// Traced anyway and stopped for an event of its own (exit, exec): its wait status, left to
    /// the tracer's own handling.
    Foreign(i32),
}

pub struct Thread {
    pub tid: i32,
    pub regs: libc::user_regs_struct,
    resume: Resume,
}

/// Every thread of a process, stopped; let go by [`Stopped::resume`] (or when dropped).
pub struct Stopped {
    pub threads: Vec<Thread>,
    /// Seized threads that had not stopped after [`STOP_WAIT`]: they stop once they leave the
    /// kernel and are detached by the next scan or when memleak exits.
    pub stragglers: Vec<i32>,
    pub since: Instant,
    done: bool,
}

/// What resuming left to the caller.
pub struct Resumed {
    /// How long the process was stopped.
    pub stopped: Duration,
    /// (thread, wait status) of the traced threads' own events, which the caller handles as
    /// usual.
    pub foreign: Vec<(i32, i32)>,
}

/// Threads seized earlier that never stopped; retried at each stop and resume.
static STRAGGLERS: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

fn tids(pid: i32) -> Result<Vec<i32>> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| anyhow::anyhow!("cannot list the threads of process {pid}: {e}"))?;
    Ok(dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The pid tracing `tid`, 0 if none.
fn tracer_of(pid: i32, tid: i32) -> i32 {
    crate::procfs::Status::of_thread(pid, tid).map_or(0, |s| s.tracer)
}

/// The registers of a thread in a ptrace stop.
pub fn regs(tid: i32) -> Result<libc::user_regs_struct> {
    // SAFETY: user_regs_struct is plain data; PTRACE_GETREGS writes exactly one.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: a ptrace request on a tracee, writing to the local above.
    let r = unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut libc::user_regs_struct) };
    if r != 0 {
        bail!("cannot read the registers of thread {tid}: {}", std::io::Error::last_os_error());
    }
    Ok(regs)
}

/// Detaches the stragglers of earlier scans that have stopped since.
fn retry_stragglers() {
    let mut list = STRAGGLERS.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|&tid| {
        let mut status = 0;
        // SAFETY: waitpid on a thread we seized, writing to a local.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::WNOHANG | libc::__WALL) };
        if r == 0 {
            return true;
        }
        if r == tid && libc::WIFSTOPPED(status) {
            let sig = if (status >> 16) == 0 { libc::WSTOPSIG(status) } else { 0 };
            // SAFETY: detaching a thread we seized, now in a ptrace stop.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, sig as libc::c_ulong) };
        }
        false
    });
}

/// Stops every thread of `pid`. `traced`: the threads memleak already traces (they are
/// interrupted, not seized). Threads created meanwhile are found by listing the threads again
/// until the list holds no new one.
pub fn stop_all(pid: i32, traced: &[i32]) -> Result<Stopped> {
    retry_stragglers();
    let mut st = Stopped { threads: Vec::new(), stragglers: Vec::new(), since: Instant::now(), done: false };
    let mut seen = HashSet::new();
    let mut refused = None;
    loop {
        let mut waiting: Vec<(i32, bool)> = Vec::new();
        for tid in tids(pid)? {
            if refused.is_some() || !seen.insert(tid) {
                continue;
            }
            let ours = traced.contains(&tid);
            // SAFETY: ptrace requests with no memory arguments.
            let ok = unsafe {
                (ours || libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) == 0)
                    && libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) == 0
            };
            if ok {
                waiting.push((tid, ours));
                continue;
            }
            let other = tracer_of(pid, tid);
            if errno() == libc::EPERM && other != 0 && !ours {
                refused = Some(format!("cannot stop thread {tid} of process {pid}: process {other} traces it"));
            }
            // Otherwise gone, or exiting (a thread in its exit cannot be seized): nothing to
            // scan there.
        }
        let new = !waiting.is_empty();
        // Wait for this round's threads before listing again: a stopped thread creates none.
        let deadline = Instant::now() + STOP_WAIT;
        for (tid, ours) in waiting {
            match wait_stop(tid, ours, deadline) {
                Waited::Stopped(resume) => match regs(tid) {
                    Ok(regs) => st.threads.push(Thread { tid, regs, resume }),
                    // Stopped but its registers unreadable (should not happen): let it go.
                    Err(_) => resume_thread(tid, resume, &mut Vec::new()),
                },
                Waited::Gone => {}
                Waited::Late => {
                    st.stragglers.push(tid);
                    STRAGGLERS.lock().unwrap_or_else(|e| e.into_inner()).push(tid);
                }
            }
        }
        if let Some(why) = refused {
            // Every thread seized so far goes on (dropping `st` resumes them).
            drop(st);
            bail!(why);
        }
        if !new {
            return Ok(st);
        }
    }
}

enum Waited {
    Stopped(Resume),
    Gone,
    Late,
}

/// Waits for `tid`'s stop after PTRACE_INTERRUPT and decides how it will be let go.
fn wait_stop(tid: i32, ours: bool, deadline: Instant) -> Waited {
    let mut pause = Duration::from_micros(20);
    loop {
        let mut status = 0;
        // SAFETY: waitpid on a tracee, writing to a local.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::WNOHANG | libc::__WALL) };
        if r < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Waited::Gone;
        }
        if r == 0 {
            if Instant::now() >= deadline {
                return Waited::Late;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
            continue;
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Waited::Gone;
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let event = status >> 16;
        let sig = libc::WSTOPSIG(status);
        let resume = if event == libc::PTRACE_EVENT_STOP {
            // A group-stop reports its stop signal; the interrupt reports SIGTRAP.
            let group = matches!(sig, libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU);
            match (ours, group) {
                (false, _) => Resume::Detach(0),
                (true, true) => Resume::Listen,
                (true, false) => Resume::Cont(0),
            }
        } else if event == 0 {
            // A signal on its way: delivered when the thread goes on. The interrupt is still
            // pending: a seized thread drops it on detach, a traced one reports it later (as a
            // SIGTRAP event stop, which its tracer continues).
            if ours { Resume::Cont(sig) } else { Resume::Detach(sig) }
        } else if ours {
            Resume::Foreign(status)
        } else {
            Resume::Detach(0)
        };
        return Waited::Stopped(resume);
    }
}

fn resume_thread(tid: i32, resume: Resume, foreign: &mut Vec<(i32, i32)>) {
    // SAFETY: ptrace requests on a thread in a ptrace stop; no memory arguments.
    unsafe {
        match resume {
            Resume::Detach(sig) => {
                libc::ptrace(libc::PTRACE_DETACH, tid, 0, sig as libc::c_ulong);
            }
            Resume::Cont(sig) => {
                libc::ptrace(libc::PTRACE_CONT, tid, 0, sig as libc::c_ulong);
            }
            Resume::Listen => {
                libc::ptrace(libc::PTRACE_LISTEN, tid, 0, 0);
            }
            Resume::Foreign(status) => foreign.push((tid, status)),
        }
    }
}

impl Stopped {
    /// Lets every thread go as it was.
    pub fn resume(mut self) -> Resumed {
        self.done = true;
        let mut foreign = Vec::new();
        for t in &self.threads {
            resume_thread(t.tid, t.resume, &mut foreign);
        }
        let stopped = self.since.elapsed();
        retry_stragglers();
        Resumed { stopped, foreign }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.done {
            for t in &self.threads {
                // On an error path nobody handles a traced thread's own event: it goes on.
                let mut foreign = Vec::new();
                resume_thread(t.tid, t.resume, &mut foreign);
                if !foreign.is_empty() {
                    // SAFETY: continuing our own tracee, stopped at an event.
                    unsafe { libc::ptrace(libc::PTRACE_CONT, t.tid, 0, 0) };
                }
            }
        }
    }
}
