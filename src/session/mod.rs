//! One event loop for a whole run: the processes traced (the registry), their ptrace stops
//! (exec, exit, the processes they start), the signals memleak gets, the BPF ring buffers, a
//! tick to keep symbols and unwind tables current and to find a cgroup's new members, and a
//! report every interval. Kernel mode is the same loop with no process.
mod lifecycle;
pub mod ptrace;
pub mod registry;

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use libbpf_rs::{Link, RingBuffer};

use crate::cli::Config;
use crate::output;
use crate::report::{Reporter, Subject};
use crate::signals::{self, Signals};
use crate::skel::types::{proc_event, proc_event_kind};
use crate::snapshot::Exit;
use ptrace::Change;
pub use registry::{Origin, Process, Registry};

/// How often stacks are read and their addresses normalized while the processes live.
const TICK: Duration = Duration::from_secs(1);
/// How long the processes have, after memleak got a stop signal, to show that they are
/// dying too (a terminal's Ctrl-C reaches the whole process group).
const GRACE: Duration = Duration::from_millis(300);
/// How long memleak waits for processes seen dying (a fatal signal pending or being
/// delivered, or in their exit stop) to be gone.
const DYING_WAIT: Duration = Duration::from_secs(10);

/// Where in its life a process is when its probes are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// Stopped at an exec: a new image, before its first instruction (its libraries are not
    /// mapped yet: they are found as its dynamic linker will find them).
    Exec,
    /// Stopped right after it was started by a traced process, whose mappings it has.
    Forked,
    /// Running (-p, a cgroup's member, an exec memleak learnt of afterwards).
    Running,
}

/// A process's probes, attached.
pub struct Attached {
    pub links: Vec<Link>,
    /// Its allocator is glibc's malloc.
    pub glibc: bool,
    /// Its image runs the in-process capture's library (src/preload/): the malloc family is
    /// recorded there, the probes are the rest.
    pub preload: bool,
}

/// What attaches a process's allocator probes (user mode; kernel mode has none).
pub trait Prober {
    /// Finds process `pid`'s allocator and attaches its probes. An error says why it cannot
    /// be traced.
    fn attach(&mut self, pid: i32, at: At) -> Result<Attached>;
    /// Marks the process traced, or not, on the BPF side (its exec ends its records).
    fn set_traced(&self, pid: i32, on: bool);
    /// Process `pid`'s link map changed (dlopen), `late` after the change (None: it waited
    /// for memleak): probes what it maps now that had no probes; the new links.
    fn linkmap(&mut self, _pid: i32, _late: Option<Duration>) -> Vec<Link> {
        Vec::new()
    }
    /// A SIGSTOP reached memleak's ptrace of thread `tid`: if the BPF side sent it (a link-map
    /// change), the process's new objects are probed now: its pid and the new links, and the
    /// signal is to be suppressed. None: a SIGSTOP of someone else's, delivered as usual.
    fn own_stop(&mut self, _tid: i32) -> Option<(i32, Vec<Link>)> {
        None
    }
    /// WARNING lines for process `pid`'s report (`exited`: its final one).
    fn warnings(&self, _pid: i32, _exited: bool) -> Vec<String> {
        Vec::new()
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Every traced process exited.
    Exited,
    /// A stop signal, or the count of reports.
    Stopped,
}

pub struct Session<'s, 'a, 'obj> {
    pub cfg: &'a Config,
    pub rep: Reporter<'a, 'obj>,
    pub reg: Registry,
    pub prober: Option<&'s mut dyn Prober>,
    pub signals: &'s Signals,
    /// The BPF ring buffers: -t lines, the unwinder's wake-ups, execs of traced processes.
    pub ring: Option<RingBuffer<'s>>,
    /// Execs the BPF side told of (processes memleak does not ptrace learn of theirs so).
    pub execs: Rc<RefCell<Vec<proc_event>>>,
    /// memleak follows the processes the traced ones start.
    pub follow: bool,
    /// Under sudo: the invoking user, the only one whose processes memleak traces when a
    /// traced process starts them (a set-user-ID program, `sudo -u other`: not traced).
    pub user: Option<(u32, u32)>,
    /// --cgroup: its members are traced, those that join it later too.
    pub cgroup: Option<PathBuf>,
}

impl Session<'_, '_, '_> {
    /// Starts tracing a process that runs (-p, a cgroup's member): probes, tables, symbols;
    /// seized when memleak follows it. Its exit is seen through ptrace or a pidfd.
    pub fn add_running(&mut self, pid: i32, origin: Origin) -> Result<()> {
        let mut p = Process::new(pid, origin);
        // Its objects' tables before its probes: the first calls' walks find every table of
        // what it maps now (a window of truncated stacks otherwise, tests/targets.rs' demo).
        if let Some(u) = self.rep.unwind.as_mut() {
            u.sync(&mut self.rep.symbolizer.objects, &[pid]);
        }
        if let Some(prober) = self.prober.as_deref_mut() {
            prober.set_traced(pid, true);
            let a = prober.attach(pid, At::Running)?;
            (p.links, p.glibc) = (a.links, a.glibc);
        }
        // The maps of the running process, read before it can exit, kept in case it exits
        // before its stacks are read.
        self.rep.symbolizer.reread_maps(pid);
        if self.follow {
            let threads = ptrace::seize_process(pid, ptrace::options(true))
                .with_context(|| format!("cannot follow pid {pid} (ptrace)"))?;
            for tid in threads.into_iter().filter(|&t| t != pid) {
                self.reg.threads.insert(tid, pid);
            }
            p.ptraced = true;
        } else if self.cfg.scan.mode == crate::scan::options::Mode::Every {
            // --scan: its exit is classified too, at its exit stop: its main thread is seized.
            match ptrace::seize(pid, ptrace::options(false)) {
                Ok(()) => p.ptraced = true,
                Err(e) => {
                    errln!(
                        "memleak: note: cannot trace process {pid} to its exit ({e}): its report after it exits will not be classified"
                    );
                    p.pidfd = pidfd_open(pid);
                }
            }
        } else {
            p.pidfd = pidfd_open(pid);
        }
        self.reg.insert(p);
        Ok(())
    }

    /// Registers the -c command, forked and seized by the caller, before it execs: its probes
    /// come at its exec stop.
    pub fn add_command(&mut self, pid: i32) {
        let mut p = Process::new(pid, Origin::Command);
        p.ptraced = true;
        if let Some(prober) = self.prober.as_deref() {
            prober.set_traced(pid, true);
        }
        self.reg.command = Some(pid);
        self.reg.insert(p);
    }

    /// Runs until every traced process has exited, a stop signal, or the count of reports.
    pub fn run(&mut self) -> Result<End> {
        let end = self.event_loop()?;
        // Processes that go on untraced: their libraries stop recording.
        if let Some(p) = self.rep.preload.as_mut() {
            p.stop_all();
        }
        if let Some(r) = &self.ring {
            let _ = r.consume();
        }
        if self.cfg.verbose
            && let Some(u) = &self.rep.unwind
        {
            let mut l = crate::collector::Collector::losses(self.rep.maps.counters);
            // The in-process capture's walks too (the same tables, the same counters).
            if let Some(p) = &self.rep.preload {
                p.add_losses(&mut l);
            }
            errln!(
                "memleak: unwind: {} objects, {} rows built in {:.3} s; {} stacks unwound, {} ended early",
                u.tables.built,
                u.tables.rows_total,
                u.tables.build_secs,
                l.unwinds,
                l.unwind_stops.total()
            );
        }
        if self.cfg.verbose {
            let peak = crate::procfs::Status::own().vm_hwm.unwrap_or_else(|| "?".into());
            errln!("memleak: peak memory (VmHWM) {peak}");
        }
        Ok(end)
    }

    /// The exit code of the run: the command's, if it exited (128+N if signal N killed it).
    pub fn exit_code(&self) -> i32 {
        let own = match self.reg.command_exit {
            Some(Exit::Code(c)) => c,
            _ => 0,
        };
        // --error-exitcode: leaks of the kinds that count in the final reports.
        self.rep.scan.gate(self.cfg).unwrap_or(own)
    }

    /// What a report and a scan need to know of process `p`.
    fn subject(&self, p: &Process, exit: Option<Exit>) -> Subject {
        let mut traced: Vec<i32> = Vec::new();
        if p.ptraced {
            traced.push(p.pid);
            traced.extend(self.reg.threads.iter().filter(|&(_, &owner)| owner == p.pid).map(|(&t, _)| t));
        }
        Subject {
            pid: p.pid as u32,
            comm: p.comm.clone(),
            exit,
            warnings: self.warnings(p.pid, exit.is_some()),
            scan: crate::scan::report::Subject {
                traced,
                from_start: matches!(p.origin, Origin::Command | Origin::Child { .. }),
                glibc: p.glibc,
            },
        }
    }

    /// WARNING lines for process `pid`'s report (`exited`: its final one): no allocation call
    /// seen (by the probes, nor by the in-process capture), a library that never reported.
    fn warnings(&self, pid: i32, exited: bool) -> Vec<String> {
        let preload = self.rep.preload.as_ref();
        let mut w = Vec::new();
        if !preload.is_some_and(|p| p.seen(pid))
            && let Some(pr) = self.prober.as_deref()
        {
            w.extend(pr.warnings(pid, exited));
        }
        w.extend(preload.and_then(|p| p.warning(pid, exited)));
        w
    }

    /// Stops a scan met for traced threads (their own events): handled as usual.
    fn handle_foreign(&mut self) -> Result<()> {
        for (tid, status) in std::mem::take(&mut self.rep.scan.foreign) {
            self.handle(tid, ptrace::decode(status))?;
        }
        Ok(())
    }

    fn event_loop(&mut self) -> Result<End> {
        let start = Instant::now();
        let mut next_report = start.checked_add(self.cfg.interval);
        // Kernel mode has nothing to normalize: its stacks are read when a report needs them.
        let mut next_tick = if self.rep.kernel { None } else { start.checked_add(TICK) };
        let mut reports = 0u64;
        loop {
            if !self.rep.kernel && self.reg.is_empty() && self.cgroup.is_none() {
                return Ok(End::Exited);
            }
            let wake = match (next_report, next_tick) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let mut timeout = poll_timeout(wake, Instant::now());
            let mut fds = vec![libc::pollfd { fd: self.signals.raw_fd(), events: libc::POLLIN, revents: 0 }];
            if let Some(r) = &self.ring {
                fds.push(libc::pollfd { fd: r.epoll_fd(), events: libc::POLLIN, revents: 0 });
            }
            // The in-process capture: processes connecting, asking for their mappings; -t lines
            // waiting in their regions are read often.
            let capture: Vec<i32> = self.rep.preload.as_ref().map(|p| p.poll_fds()).unwrap_or_default();
            for &fd in &capture {
                fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
            }
            if self.rep.preload.as_ref().is_some_and(|p| p.tracing()) {
                timeout = if timeout < 0 { 100 } else { timeout.min(100) };
            }
            let first_capture = fds.len() - capture.len();
            let pidfds: Vec<i32> = self.reg.iter().filter(|p| p.pidfd.is_some()).map(|p| p.pid).collect();
            for &pid in &pidfds {
                let fd = self.reg.get(pid).and_then(|p| p.pidfd.as_ref()).map_or(-1, |f| f.as_raw_fd());
                fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
            }
            // SAFETY: fds is a live array of fds.len() pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(std::io::Error::last_os_error()).context("poll");
            }
            let ready: Vec<i32> = fds[first_capture..first_capture + capture.len()]
                .iter()
                .filter(|f| f.revents != 0)
                .map(|f| f.fd)
                .collect();
            self.service_capture(&ready)?;
            self.drain_rings()?;
            if fds[0].revents & libc::POLLIN != 0 {
                for sig in self.signals.read() {
                    if signals::STOP.contains(&sig) {
                        return self.stop();
                    }
                    if sig == libc::SIGCHLD {
                        self.handle_changes()?;
                    }
                }
            }
            let first_pidfd = fds.len() - pidfds.len();
            for (i, pid) in pidfds.iter().enumerate() {
                if fds[first_pidfd + i].revents & libc::POLLIN != 0 {
                    self.exited(*pid, Exit::Exited)?;
                }
            }
            let now = Instant::now();
            if let Some(tick) = next_tick
                && now >= tick
            {
                self.tick()?;
                next_tick = now.checked_add(TICK);
            }
            if let Some(due) = next_report
                && now >= due
            {
                reports += 1;
                let last = self.cfg.count.is_some_and(|c| reports >= c);
                self.report(last)?;
                if last {
                    let running: Vec<String> = self.reg.pids().iter().map(|p| p.to_string()).collect();
                    if !running.is_empty() && self.reg.command.is_some() {
                        errln!(
                            "memleak: {reports} reports printed; the command goes on running, untraced (pid {})",
                            running.join(", ")
                        );
                    }
                    return Ok(End::Stopped);
                }
                next_report = next_after(due, self.cfg.interval, now);
            }
        }
    }

    /// The in-process capture's connections (`ready`: those poll found readable) and -t lines.
    fn service_capture(&mut self, ready: &[i32]) -> Result<()> {
        let rep = &mut self.rep;
        let Some(p) = rep.preload.as_mut() else { return Ok(()) };
        if !ready.is_empty() {
            p.service(ready, rep.unwind.as_mut(), &mut rep.symbolizer.objects);
        }
        if self.cfg.trace {
            let lines = p.trace_lines();
            if !lines.is_empty() {
                output::write_out(&lines)?;
            }
        }
        Ok(())
    }

    /// A periodic report: every process traced now.
    fn report(&mut self, last: bool) -> Result<()> {
        let subjects: Vec<Subject> = if self.rep.kernel {
            vec![Subject { pid: 0, comm: "kernel".into(), exit: None, warnings: Vec::new(), scan: Default::default() }]
        } else {
            for p in self.reg.iter_mut() {
                p.refresh_comm();
            }
            self.reg.iter().filter(|p| !p.starting).map(|p| self.subject(p, None)).collect()
        };
        self.rep.report(&subjects, last)?;
        self.handle_foreign()
    }

    /// Reads the ring buffers and acts on what they said.
    fn drain_rings(&mut self) -> Result<()> {
        if let Some(r) = &self.ring {
            r.consume().context("reading the BPF ring buffers")?;
        }
        let execs = std::mem::take(&mut *self.execs.borrow_mut());
        let now = crate::allocator::monotonic_ns();
        for e in execs {
            let pid = e.pid as i32;
            if e.kind == proc_event_kind::PEV_LINKMAP.0 {
                // A dlopen: what it mapped may define allocator functions of its own.
                let late = Duration::from_nanos(now.saturating_sub(e.time_ns));
                if let Some(prober) = self.prober.as_deref_mut()
                    && let Some(p) = self.reg.get_mut(pid)
                {
                    p.links.extend(prober.linkmap(pid, Some(late)));
                }
                continue;
            }
            // A ptraced process's exec is handled at its exec stop. Another may be anywhere in
            // its new image's start-up: its libraries are found as for an exec stop, whether
            // its dynamic linker has mapped them yet or not.
            if self.reg.get(pid).is_some_and(|p| !p.ptraced) {
                if let Some(u) = self.rep.unwind.as_mut() {
                    u.load_exec(&mut self.rep.symbolizer.objects, pid);
                }
                self.reattach(pid, At::Exec);
            }
        }
        if let Some(u) = self.rep.unwind.as_mut()
            && u.woken()
        {
            // A file not opened yet is in use (dlopen, exec): open it now, while it is mapped
            // (it may be unloaded by the next tick), and load its table.
            let pids = self.reg.pids();
            u.sync(&mut self.rep.symbolizer.objects, &pids);
            self.rep.prepare_symbols()?;
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        let pids = self.reg.pids();
        if let Some(u) = self.rep.unwind.as_mut() {
            u.tick(&mut self.rep.symbolizer.objects, &pids);
        }
        if let Some(p) = self.rep.preload.as_mut() {
            p.tick(self.rep.unwind.as_mut(), &mut self.rep.symbolizer.objects);
        }
        self.rep.prepare_symbols()?;
        if let Some(cg) = self.cgroup.clone() {
            self.join_cgroup_members(&cg);
        }
        Ok(())
    }

    /// The members of the cgroup not traced yet: started from outside (or before memleak
    /// could follow their parent), they are traced from now on.
    pub fn join_cgroup_members(&mut self, cgroup: &std::path::Path) {
        for pid in crate::cgroup::members(cgroup) {
            if self.reg.contains(pid) || self.reg.threads.contains_key(&pid) || pid == std::process::id() as i32 {
                continue;
            }
            if let Err(e) = crate::target::check_pid(pid)
                .and_then(|_| crate::target::check_access(pid))
                .and_then(|_| self.add_running(pid, Origin::Cgroup))
            {
                // It may be gone already; if not, say so once.
                if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    self.not_traced(pid, &format!("{e:#}"));
                }
            }
        }
    }

    /// Says, in every report from now on, that process `pid` is not traced, and why.
    fn not_traced(&mut self, pid: i32, why: &str) {
        let comm = crate::snapshot::comm_of(pid as u32).unwrap_or_default();
        let line = format!("pid {pid} ({comm}) is not traced: {why}");
        errln!("memleak: WARNING: {line}");
        self.rep.warnings.push(line);
    }

    /// Attaches process `pid`'s probes again (a new image); drops the old ones.
    fn reattach(&mut self, pid: i32, at: At) {
        let Some(prober) = self.prober.as_deref_mut() else { return };
        match prober.attach(pid, at) {
            Ok(a) => {
                if a.preload
                    && let Some(c) = self.rep.preload.as_mut()
                {
                    c.expect(pid, None);
                } else if self.cfg.verbose && self.cfg.preload {
                    errln!("memleak: capture: uprobes for pid {pid}");
                }
                if let Some(p) = self.reg.get_mut(pid) {
                    let old = std::mem::replace(&mut p.links, a.links);
                    drop_links(old);
                    p.glibc = a.glibc;
                    p.refresh_comm();
                }
            }
            Err(e) => {
                let links = self.reg.get_mut(pid).map(|p| std::mem::take(&mut p.links)).unwrap_or_default();
                drop_links(links);
                self.not_traced(pid, &format!("{e:#}"));
            }
        }
    }

    /// A stop signal: the processes have a moment to show that they are dying too (a group
    /// Ctrl-C); those that exit get their final reports, then the rest their last one.
    fn stop(&mut self) -> Result<End> {
        let start = Instant::now();
        loop {
            self.handle_changes()?;
            // A process seen through its pidfd that exited before the stop signal came (in
            // the same poll, or while it was read) gets its own exit and report, as it would
            // a moment earlier.
            self.reap_pidfds()?;
            if self.reg.is_empty() && !self.rep.kernel {
                return Ok(End::Exited);
            }
            let dying = self.reg.iter().any(|p| p.dying || signals::Masks::of(p.pid).is_some_and(|m| m.dying()));
            let limit = if dying { DYING_WAIT } else { GRACE };
            let now = Instant::now();
            if self.rep.kernel || self.reg.iter().all(|p| !p.ptraced) || now >= start + limit {
                break;
            }
            self.signals.wait(poll_timeout(Some(start + limit), now));
            // Another stop signal changes nothing; SIGCHLD is handled at the top.
            let _ = self.signals.read();
        }
        self.report(true)?;
        Ok(End::Stopped)
    }
}

impl Session<'_, '_, '_> {
    /// The exits of processes memleak does not ptrace whose pidfds say they are gone.
    fn reap_pidfds(&mut self) -> Result<()> {
        let pids: Vec<i32> = self.reg.iter().filter(|p| p.pidfd.is_some()).map(|p| p.pid).collect();
        for pid in pids {
            let fd = self.reg.get(pid).and_then(|p| p.pidfd.as_ref()).map_or(-1, |f| f.as_raw_fd());
            let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one live pollfd, no wait.
            if fd >= 0 && unsafe { libc::poll(&mut p, 1, 0) } > 0 && p.revents & libc::POLLIN != 0 {
                self.exited(pid, Exit::Exited)?;
            }
        }
        Ok(())
    }
}

/// A process id's pidfd, through which its exit is seen; None if it is gone.
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    // SAFETY: a non-negative return is a descriptor we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Detaching uprobe links takes tens of milliseconds each (the kernel waits for the programs
/// to be done with them): done on a thread beside the loop, so that no report, and no other
/// process's stop, waits for it. A link whose process is gone traces nothing meanwhile.
fn drop_links(links: Vec<Link>) {
    if links.is_empty() {
        return;
    }
    if std::thread::Builder::new().name("memleak-detach".into()).spawn(move || drop(links)).is_err() {
        // No thread to be had: detached here, the loop waits.
    }
}

/// The next time a period of `every` falls due after `now`; None if that is past the end of
/// time (an interval of 2^64 seconds never comes round).
pub fn next_after(due: Instant, every: Duration, now: Instant) -> Option<Instant> {
    let next = due.checked_add(every)?;
    if next >= now { Some(next) } else { now.checked_add(every) }
}

/// Milliseconds for poll until `wake` (rounded up, so that it does not wake early and spin),
/// -1 for never.
pub fn poll_timeout(wake: Option<Instant>, now: Instant) -> i32 {
    let Some(wake) = wake else { return -1 };
    let left = wake.saturating_duration_since(now);
    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
}

/// Prints a -t line for a BPF trace event (a ring buffer callback).
pub fn trace_event(data: &[u8]) -> i32 {
    use crate::skel::types::{event_kind, trace_event};
    let e: trace_event = crate::collector::read_pod(data);
    let line = if e.kind == event_kind::EV_ALLOC.0 {
        format!("alloc exited, size = {}, result = {:x}\n", e.size, e.addr)
    } else {
        format!("free entered, address = {:x}, size = {}\n", e.addr, e.size)
    };
    let _ = output::write_out(&line);
    0
}

/// Prints `line` as the report's status lines are (stdout, or stderr with --format json).
pub fn status(rep: &Reporter, line: &str) -> Result<()> {
    rep.outputs.status(&format!("[{}] {line}", output::now_hms()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_saturate_at_the_end_of_time() {
        let now = Instant::now();
        let s = Duration::from_secs(1);
        assert_eq!(next_after(now, s, now), Some(now + s));
        // A late report: the next one is a period after now, not in the past.
        assert_eq!(next_after(now, s, now + 5 * s), Some(now + 6 * s));
        // memleak -c true 18446744073709551615: no report ever, no overflow.
        assert_eq!(next_after(now, Duration::from_secs(u64::MAX), now), None);
        assert_eq!(poll_timeout(None, now), -1);
        assert_eq!(poll_timeout(Some(now), now + s), 0);
        // Rounded up: poll never returns just before the due time and spins.
        assert_eq!(poll_timeout(Some(now + Duration::from_micros(1500)), now), 2);
        assert_eq!(poll_timeout(Some(now + Duration::from_secs(1 << 40)), now), i32::MAX);
    }
}
