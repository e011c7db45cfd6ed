//! The processes a run traces: how each came to be traced, how memleak learns of its execs and
//! its exit, and the probes attached to it. One entry per process (thread group), by pid.
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use libbpf_rs::Link;

use crate::snapshot::Exit;

/// How a process came to be traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The -c command.
    Command,
    /// Given with -p.
    Pid,
    /// Started by a traced process (fork, vfork, clone of a new process).
    Child { parent: i32 },
    /// A member of the --cgroup.
    Cgroup,
}

pub struct Process {
    pub pid: i32,
    pub comm: String,
    pub origin: Origin,
    /// memleak is its ptrace tracer (seized): it stops at its execs and its exit, and, when
    /// memleak follows, at the processes it starts.
    pub ptraced: bool,
    /// Its allocator probes (uprobe links of this pid); dropped at its exit.
    pub links: Vec<Link>,
    /// How its exit is seen when memleak does not ptrace it.
    pub pidfd: Option<OwnedFd>,
    /// Born by fork and not started yet: it waits in its first stop until its probes are on.
    pub starting: bool,
    /// Stopped at its exit (ptrace), or seen dying.
    pub dying: bool,
    /// Its allocator is glibc's malloc (what a reachability scan needs to know).
    pub glibc: bool,
}

impl Process {
    pub fn new(pid: i32, origin: Origin) -> Process {
        Process {
            pid,
            comm: crate::snapshot::comm_of(pid as u32).unwrap_or_default(),
            origin,
            ptraced: false,
            links: Vec::new(),
            pidfd: None,
            starting: false,
            dying: false,
            glibc: false,
        }
    }

    /// Its name again (it changes at exec), while it lives.
    pub fn refresh_comm(&mut self) {
        if let Some(c) = crate::snapshot::comm_of(self.pid as u32) {
            self.comm = c;
        }
    }
}

#[derive(Default)]
pub struct Registry {
    procs: BTreeMap<i32, Process>,
    /// The -c command's pid, whose exit status memleak exits with.
    pub command: Option<i32>,
    /// The command's exit status, once it exited.
    pub command_exit: Option<Exit>,
    /// Threads of traced processes that memleak ptraces (followed processes: their threads
    /// are seized too, to see the processes they start): thread id → process.
    pub threads: BTreeMap<i32, i32>,
}

impl Registry {
    pub fn insert(&mut self, p: Process) {
        self.procs.insert(p.pid, p);
    }

    pub fn get(&self, pid: i32) -> Option<&Process> {
        self.procs.get(&pid)
    }

    pub fn get_mut(&mut self, pid: i32) -> Option<&mut Process> {
        self.procs.get_mut(&pid)
    }

    pub fn remove(&mut self, pid: i32) -> Option<Process> {
        self.threads.retain(|_, p| *p != pid);
        self.procs.remove(&pid)
    }

    pub fn contains(&self, pid: i32) -> bool {
        self.procs.contains_key(&pid)
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn pids(&self) -> Vec<i32> {
        self.procs.keys().copied().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Process> {
        self.procs.values()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Process> {
        self.procs.values_mut()
    }

    /// The process a thread (or process) id belongs to, if it is traced.
    pub fn process_of(&self, tid: i32) -> Option<i32> {
        if self.procs.contains_key(&tid) {
            return Some(tid);
        }
        self.threads.get(&tid).copied()
    }
}
