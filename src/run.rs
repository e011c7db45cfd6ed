//! The run: set the target up, attach, then report every interval until the target exits,
//! the count is reached, or Ctrl-C/SIGTERM/SIGHUP.
use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use libbpf_rs::{MapMut, RingBufferBuilder};

use crate::cli::{Config, Target};
use crate::collector::{Collector, RecordMaps, read_pod};
use crate::features::Features;
use crate::output::Outputs;
pub use crate::output::write_out;
use crate::signals::{self, Signals};
use crate::skel::types::{event_kind, trace_event};
use crate::snapshot::{self, Exit, ProcessInput};
use crate::symbolizer::Symbolizer;
use crate::unwind::{UnwindTables, Unwinder};
use crate::{ldso, loader, output, probes, target};

/// How often stacks are read and their addresses normalized while the process lives.
const TICK: Duration = Duration::from_secs(1);

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// Fails with what is needed when this process cannot load and attach BPF programs.
/// `process`: a process is traced, whose files memleak opens through /proc/PID/map_files,
/// which takes CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE.
fn check_privileges(process: bool) -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| eff & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON) && (!process || has(CAP_CHECKPOINT_RESTORE))) {
        return Ok(());
    }
    bail!(
        "memleak needs root, or the capabilities CAP_BPF and CAP_PERFMON (and CAP_CHECKPOINT_RESTORE to trace a process: its files are read through /proc/PID/map_files; plus CAP_SYS_PTRACE for other users' processes)"
    )
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    // SAFETY: a non-negative return is a descriptor we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What ended the loop.
pub enum End {
    /// The traced command exited with this code (128+N if killed by signal N).
    CommandExited(i32),
    /// The -p process exited.
    ProcessExited,
    /// Ctrl-C, SIGTERM, SIGHUP, or the count of reports was reached.
    Stopped,
    /// --error-exitcode: the final report has leaks; exit with this status.
    Leaks(i32),
}

/// The report side of a run, for either BPF object: user mode's or kernel mode's.
pub struct Tracer<'a, 'obj> {
    pub cfg: &'a Config,
    pub maps: RecordMaps<'a, MapMut<'obj>>,
    pub stacks: &'a MapMut<'obj>,
    /// The traced process; None in kernel mode.
    pub pid: Option<i32>,
    pub collector: Collector,
    pub symbolizer: Symbolizer,
    /// The attached programs, whose runs the kernel skipped are reported.
    pub programs: Option<crate::collector::Programs<'a>>,
    /// User mode without --frame-pointers: the unwind tables.
    pub unwind: Option<Unwinder<'a, 'obj>>,
    /// Where reports go, opened (and checked) at start-up.
    pub outputs: Outputs,
    /// Builds each report's snapshot; remembers the last one's bytes per stack.
    pub snapshots: snapshot::Builder,
    /// The traced process's name, as last read while it lived.
    pub comm: Option<String>,
    /// Reachability: classified reports, the exit scan, suppressions (src/scan/).
    pub scan: crate::scan::report::Session,
}

impl Tracer<'_, '_> {
    /// Reads the stacks stored since last time and, while the process lives, records where
    /// their addresses live, so that they stay symbolizable after it exits.
    fn prepare_symbols(&mut self) -> Result<()> {
        let new = self.collector.refresh_stacks(self.stacks)?;
        let frames: Vec<_> = new.iter().filter_map(|id| self.collector.frames(*id)).flatten().copied().collect();
        self.symbolizer.normalize(frames);
        Ok(())
    }

    /// Prints a report. `last`: the run ends after it; `exit`: the process has exited.
    fn print_report(&mut self, last: bool, exit: Option<Exit>) -> Result<()> {
        // After an exit too: stacks stored since the last tick are still in the map, and their
        // addresses resolve against the last maps read (a -p process is gone by now).
        self.prepare_symbols()?;
        // After the process exited nothing can be freed any more: every block counts.
        let min_age = if exit.is_some() { Duration::ZERO } else { self.cfg.min_age };
        let started = Instant::now();
        // Kernel mode's records are pid 0's.
        let pid = self.pid.map_or(0, |p| p as u32);
        let (mut by_pid, losses) = self.collector.collect_by_pid(
            &self.maps,
            Some(&[pid]),
            min_age,
            self.cfg.show_allocs,
            self.cfg.combined_only,
        )?;
        let records = by_pid.remove(&pid).unwrap_or_default();
        let comm = if self.pid.is_some() {
            if exit.is_none()
                && let Some(c) = snapshot::comm_of(pid)
            {
                self.comm = Some(c);
            }
            self.comm.clone().unwrap_or_default()
        } else {
            "kernel".into()
        };
        let mut losses = losses;
        if let Some(k) = &self.programs {
            k.add_losses(&mut losses);
        }
        let exit = exit.filter(|_| self.pid.is_some());
        let mut process = ProcessInput::new(pid, comm, exit, records.stacks, records.young);
        // Classified (its blocks' stacks one per class) and suppressions applied (src/scan/).
        self.scan_report(&mut process, exit.is_some(), min_age, &losses)?;
        let read = started.elapsed();
        let (allocs, nstacks) = (process.stacks.iter().map(|s| s.count).sum::<u64>(), process.stacks.len());
        let snap = self.snapshots.build(
            vec![process],
            losses,
            last,
            self.pid.is_none(),
            self.cfg.sample_rate,
            self.cfg.sort,
            self.outputs.keep(),
            &self.collector,
            &mut self.symbolizer,
        );
        let built = started.elapsed();
        let costs = self.outputs.write(&snap)?;
        if self.cfg.verbose {
            errln!(
                "memleak: report: {allocs} allocations in {nstacks} stacks, read in {:.1} ms, symbolized in {:.1} ms, written in {:.1} ms",
                read.as_secs_f64() * 1e3,
                (built - read).as_secs_f64() * 1e3,
                (started.elapsed() - built).as_secs_f64() * 1e3
            );
            let each: Vec<String> = costs
                .iter()
                .map(|c| format!("{} {} bytes in {:.1} ms", c.name, c.bytes, c.time.as_secs_f64() * 1e3))
                .collect();
            errln!("memleak: outputs: {}", each.join(", "));
            self.scan.verbose();
            errln!(
                "memleak: kernel memory: allocation map {} bytes, stack map {} bytes",
                map_memory(self.maps.allocs).map_or("?".into(), |b| b.to_string()),
                map_memory(self.stacks).map_or("?".into(), |b| b.to_string())
            );
        }
        Ok(())
    }
}

/// The kernel memory a BPF map uses, as the kernel reports it in the map fd's fdinfo.
fn map_memory(map: &impl libbpf_rs::MapCore) -> Option<u64> {
    let fd = map.as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok())
}

/// The uprobe programs of `mode`: each records allocations and frees alike.
fn user_programs<'a>(progs: &'a crate::skel::MemleakProgs, mode: probes::AttachMode) -> crate::collector::Programs<'a> {
    use crate::collector::Role::Both;
    use probes::AttachMode::*;
    let attached = match mode {
        Session => vec![&progs.memleak_session],
        Multi => vec![&progs.memleak_multi_entry, &progs.memleak_multi_return],
        Classic => vec![&progs.memleak_entry, &progs.memleak_return],
    };
    crate::collector::Programs { progs: attached.into_iter().map(|p| (p.as_fd(), Both)).collect() }
}

fn trace_line(e: &trace_event) -> String {
    if e.kind == event_kind::EV_ALLOC.0 {
        format!("alloc exited, size = {}, result = {:x}", e.size, e.addr)
    } else {
        format!("free entered, address = {:x}, size = {}", e.addr, e.size)
    }
}

pub fn run(cfg: &Config) -> Result<i32> {
    check_privileges(!matches!(cfg.target, Target::Kernel))?;
    for note in &cfg.scan.notes {
        errln!("memleak: note: {note}");
    }
    // Before anything is traced: a file that cannot be written fails now, not after an hour.
    let outputs = Outputs::open(cfg)?;
    // SIGCHLD is read before the command is forked, so that its exit cannot be missed; the
    // stop signals end memleak at once until tracing starts (signals.rs).
    let mut signals = Signals::new()?;
    loader::note_map_memory(cfg.max_allocs);
    let probed = Instant::now();
    let features = Features::probe();
    if cfg.verbose {
        errln!("memleak: kernel features ({:.1} ms): {features:?}", probed.elapsed().as_secs_f64() * 1e3);
    }
    if cfg.target == Target::Kernel {
        features.require_kernel_mode()?;
        return crate::kernel::run(cfg, &mut signals, outputs);
    }
    // How to attach and walk stacks on this kernel; a fallback says why.
    let plan = features.plan(cfg.attach, cfg.frame_pointers)?;
    for note in &plan.notes {
        errln!("memleak: note: {note}");
    }
    if cfg.verbose {
        for line in &plan.verbose {
            errln!("memleak: {line}");
        }
    }
    let cfg = &Config { frame_pointers: plan.frame_pointers, ..cfg.clone() };
    let (pid, obj, held, order) = match &cfg.target {
        Target::Kernel => return crate::kernel::run(cfg, &mut signals, outputs),
        Target::Pid(pid) => {
            target::check_pid(*pid)?;
            target::check_access(*pid)?;
            let obj = target::allocator_object(*pid, cfg.obj.as_deref(), &cfg.symbols_prefix)?;
            (*pid, obj, None, None)
        }
        Target::Command(argv) => {
            let prog = target::resolve_program(&argv[0])?;
            // What it will load, found without running anything of its choosing.
            let launch = ldso::Launch::command(target::command_credentials())?;
            let order = ldso::load_order(&prog, &launch)?;
            target::report_load_order(&order, cfg.verbose);
            let obj = target::allocator_object_for_command(&order, cfg.obj.as_deref(), &cfg.symbols_prefix)?;
            let held = target::HeldChild::spawn(&prog, argv)?;
            (held.pid, obj, Some(held), Some(order))
        }
    };
    // After the command is forked: it keeps the limits it was given.
    crate::objects::raise_fd_limit();
    let is_command = held.is_some();
    let mut traced = None;
    if is_command {
        // Stop the command at its exit while its memory map still exists: the last stacks
        // are normalized there. Without ptrace the run goes on, only less exact at the end.
        // SAFETY: PTRACE_SEIZE on our own child, with an options word as data.
        // With unwind tables it also stops at each exec, until the new image's tables are in.
        let exec = if cfg.frame_pointers { 0 } else { libc::PTRACE_O_TRACEEXEC };
        let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, (libc::PTRACE_O_TRACEEXIT | exec) as libc::c_ulong) };
        if r != 0 && cfg.verbose {
            errln!("memleak: cannot stop the command at its exit: {}", std::io::Error::last_os_error());
        }
        traced = (r == 0).then_some(pid);
    } else if cfg.scan.mode == crate::scan::options::Mode::Every {
        // --scan: the process's exit is classified too, at its exit stop.
        // SAFETY: PTRACE_SEIZE with an options word as data.
        let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, libc::PTRACE_O_TRACEEXIT as libc::c_ulong) };
        if r != 0 {
            errln!(
                "memleak: note: cannot trace process {pid} to its exit ({}): its report after it exits will not be classified",
                std::io::Error::last_os_error()
            );
        }
        traced = (r == 0).then_some(pid);
    }

    let (entries, missing) = probes::resolve(&obj.path, &cfg.symbols_prefix)?;
    if entries.is_empty() {
        bail!(
            "{} defines none of the allocator functions ({}malloc, {}free, ...)",
            obj.shown.display(),
            cfg.symbols_prefix,
            cfg.symbols_prefix
        );
    }
    if !missing.is_empty() {
        errln!("memleak: note: {} has no {}: not traced", obj.shown.display(), missing.join(", "));
    }

    let mut storage = MaybeUninit::uninit();
    let loaded = loader::load(&mut storage, cfg, pid as u32, is_command, plan.mode)?;
    let skel = &loaded.skel;
    let mut symbolizer = Symbolizer::new(Some(pid));
    let unwind = if cfg.frame_pointers {
        None
    } else {
        let tables = UnwindTables::new(skel, cfg.verbose)?;
        let mut u = Unwinder { skel, tables, met: Rc::new(RefCell::new(Vec::new())), pid };
        match &order {
            // Before it runs: the tables of what it maps at start are there for its first call.
            Some(order) => u.preload(&mut symbolizer.objects, order),
            None => {
                u.tables.sync_process(skel, &mut symbolizer.objects, pid);
            }
        }
        u.report_failures();
        Some(u)
    };
    let _links = probes::attach(&skel.progs, loaded.mode, pid, &obj.path, &entries)?;
    let _exec_link = skel.progs.memleak_exec.attach().context("cannot attach to sched_process_exec")?;
    if cfg.verbose {
        errln!("memleak: attached to {} ({:?} mode):", obj.shown.display(), loaded.mode);
        for e in &entries {
            let p = &e.placement;
            errln!(
                "memleak:   {:<28} entry {:#x} probe {:#x} (+{}: {}){}",
                e.names,
                e.entry_offset,
                e.file_offset,
                p.delta,
                p.insn,
                p.note.as_deref().map(|n| format!(", single-stepped: {n}")).unwrap_or_default()
            );
        }
    }
    if !is_command {
        // The maps of the running process, read before it can exit (the line below tells
        // scripts the probes are in place), kept in case it exits before its stacks are read.
        symbolizer.reread_maps();
    }
    // Before the line below: a process that exits as soon as it is told memleak is attached
    // would otherwise be gone before its pidfd exists, and its exit never seen.
    let pidfd = if is_command { None } else { pidfd_open(pid) };
    signals.arm()?;
    outputs.status(&format!("Attaching to pid {pid}, Ctrl+C to quit."))?;
    if let Some(held) = held {
        held.release()?;
    }

    let bss = skel.maps.bss_data.as_deref().context("BPF object without .bss")?;
    let tracer = Tracer {
        cfg,
        maps: RecordMaps {
            allocs: &skel.maps.allocs,
            mappings: Some(&skel.maps.mappings),
            combined: &skel.maps.combined,
            counters: &bss.counters,
        },
        stacks: &skel.maps.stacks,
        pid: Some(pid),
        collector: Collector::new(),
        symbolizer,
        programs: Some(user_programs(&skel.progs, loaded.mode)),
        unwind,
        outputs,
        snapshots: snapshot::Builder::new(),
        comm: snapshot::comm_of(pid as u32),
        scan: crate::scan::report::Session::new(is_command, traced, &obj.shown, &cfg.symbols_prefix),
    };
    match follow(tracer, &signals, &skel.maps.events, pidfd.as_ref(), is_command)? {
        End::CommandExited(code) | End::Leaks(code) => Ok(code),
        End::ProcessExited | End::Stopped => Ok(0),
    }
}

/// Reports until the end of the run (and, when the process exited, a final report); prints
/// the -t lines from `events` as they come.
pub fn follow(
    mut tracer: Tracer,
    signals: &Signals,
    events: &MapMut,
    pidfd: Option<&OwnedFd>,
    is_command: bool,
) -> Result<End> {
    let ring = if tracer.cfg.trace || tracer.unwind.is_some() {
        let mut b = RingBufferBuilder::new();
        if tracer.cfg.trace {
            b.add(events, |data: &[u8]| {
                let e: trace_event = read_pod(data);
                let _ = write_out(&format!("{}\n", trace_line(&e)));
                0
            })?;
        }
        if let Some(u) = &tracer.unwind {
            let met = u.met.clone();
            b.add(&u.skel.maps.unwind_wakeup, move |data: &[u8]| {
                met.borrow_mut().push(read_pod(data));
                0
            })?;
        }
        Some(b.build()?)
    } else {
        None
    };

    let end = event_loop(&mut tracer, signals, pidfd, ring.as_ref(), is_command)?;
    if let Some(r) = &ring {
        let _ = r.consume();
    }
    let pid = tracer.pid.unwrap_or(0);
    match end {
        End::CommandExited(code) => {
            tracer.outputs.status(&format!("[{}] Process {pid} exited with status {code}.", output::now_hms()))?;
            tracer.print_report(true, Some(Exit::Code(code)))?;
        }
        End::ProcessExited => {
            tracer.outputs.status(&format!("[{}] Process {pid} exited.", output::now_hms()))?;
            tracer.print_report(true, Some(Exit::Exited))?;
        }
        End::Stopped | End::Leaks(_) => {}
    }
    let end = tracer.scan.gate(tracer.cfg, end);
    if tracer.cfg.verbose
        && let Some(u) = &tracer.unwind
    {
        let l = Collector::losses(tracer.maps.counters);
        errln!(
            "memleak: unwind: {} objects, {} rows built in {:.3} s; {} stacks unwound, {} ended early",
            u.tables.built,
            u.tables.rows_total,
            u.tables.build_secs,
            l.unwinds,
            l.unwind_stops.total()
        );
    }
    if tracer.cfg.verbose {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let peak = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap_or("?").trim();
        errln!("memleak: peak memory (VmHWM) {peak}");
    }
    Ok(end)
}

/// The next time a period of `every` falls due after `now`; None if that is past the end of
/// time (an interval of 2^64 seconds never comes round).
fn next_after(due: Instant, every: Duration, now: Instant) -> Option<Instant> {
    let next = due.checked_add(every)?;
    if next >= now { Some(next) } else { now.checked_add(every) }
}

/// Milliseconds for poll until `wake` (rounded up, so that it does not wake early and spin),
/// -1 for never.
fn poll_timeout(wake: Option<Instant>, now: Instant) -> i32 {
    let Some(wake) = wake else { return -1 };
    let left = wake.saturating_duration_since(now);
    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
}

fn event_loop(
    t: &mut Tracer,
    signals: &Signals,
    pidfd: Option<&OwnedFd>,
    ring: Option<&libbpf_rs::RingBuffer>,
    is_command: bool,
) -> Result<End> {
    let start = Instant::now();
    let mut next_report = start.checked_add(t.cfg.interval);
    // Kernel mode has nothing to normalize: its stacks are read when a report needs them.
    let mut next_tick = if t.pid.is_some() { start.checked_add(TICK) } else { None };
    let mut reports = 0u64;
    loop {
        let wake = match (next_report, next_tick) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let timeout = poll_timeout(wake, Instant::now());
        let mut fds = vec![libc::pollfd { fd: signals.raw_fd(), events: libc::POLLIN, revents: 0 }];
        if let Some(p) = pidfd {
            fds.push(libc::pollfd { fd: p.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        if let Some(r) = ring {
            fds.push(libc::pollfd { fd: r.epoll_fd(), events: libc::POLLIN, revents: 0 });
        }
        // SAFETY: fds is a live array of fds.len() pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(std::io::Error::last_os_error()).context("poll");
        }
        if let Some(r) = ring {
            r.consume().context("reading trace events")?;
        }
        if let Some(u) = t.unwind.as_mut()
            && u.woken()
        {
            // A file not opened yet is in use (dlopen, exec): open it now, while it is mapped
            // (it may be unloaded by the next tick), and load its table.
            u.sync(&mut t.symbolizer.objects);
            t.prepare_symbols()?;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            for sig in signals.read() {
                match sig {
                    s if signals::STOP.contains(&s) => {
                        if is_command && let Some(code) = grace(t, signals)? {
                            return Ok(End::CommandExited(code));
                        }
                        t.print_report(true, None)?;
                        handle_foreign(t)?;
                        return Ok(End::Stopped);
                    }
                    libc::SIGCHLD if is_command || t.scan.traced.is_some() => {
                        if let Child::Exited(code) = reap(t)? {
                            // -p: the exit is the pidfd's to tell.
                            if is_command {
                                return Ok(End::CommandExited(code));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if pidfd.is_some() && fds[1].revents & libc::POLLIN != 0 {
            return Ok(End::ProcessExited);
        }
        let now = Instant::now();
        if let Some(tick) = next_tick
            && now >= tick
        {
            if let Some(u) = t.unwind.as_mut() {
                u.tick(&mut t.symbolizer.objects);
            }
            t.prepare_symbols()?;
            next_tick = now.checked_add(TICK);
        }
        if let Some(due) = next_report
            && now >= due
        {
            reports += 1;
            t.print_report(t.cfg.count.is_some_and(|c| reports >= c), None)?;
            handle_foreign(t)?;
            if t.cfg.count.is_some_and(|c| reports >= c) {
                if is_command && let Some(pid) = t.pid {
                    errln!("memleak: {reports} reports printed; the command (pid {pid}) goes on running, untraced");
                }
                return Ok(End::Stopped);
            }
            next_report = next_after(due, t.cfg.interval, now);
        }
    }
}

/// How long a -c command has, after memleak got a stop signal, to show that it is dying too
/// (a terminal's Ctrl-C reaches the whole process group).
const GRACE: Duration = Duration::from_millis(300);
/// How long memleak waits for a command seen dying (a fatal signal pending or being
/// delivered, or in its exit stop) to be gone.
const DYING_WAIT: Duration = Duration::from_secs(10);

/// After a stop signal under -c: waits briefly for the command, reaping it as usual; its exit
/// code if it exited (then the run ends as when it exits by itself), None if it lives on.
fn grace(t: &mut Tracer, signals: &Signals) -> Result<Option<i32>> {
    let Some(pid) = t.pid else { return Ok(None) };
    let start = Instant::now();
    let mut dying = false;
    loop {
        match reap(t)? {
            Child::Exited(code) => return Ok(Some(code)),
            Child::Dying => dying = true,
            Child::Running => {}
        }
        dying = dying || signals::Masks::of(pid).is_some_and(|m| m.dying());
        let limit = if dying { DYING_WAIT } else { GRACE };
        let now = Instant::now();
        let end = start + limit;
        if now >= end {
            return Ok(None);
        }
        signals.wait(poll_timeout(Some(end), now));
        // Another stop signal changes nothing; SIGCHLD is handled by the reap above.
        let _ = signals.read();
    }
}

/// A -c command's state after its changes were handled.
#[derive(Debug, PartialEq, Eq)]
enum Child {
    Running,
    /// In its exit stop, or given a signal that ends it.
    Dying,
    /// Exited with this code (128+N if killed by signal N).
    Exited(i32),
}

/// Handles the command's state changes.
fn reap(t: &mut Tracer) -> Result<Child> {
    let Some(pid) = t.pid else { return Ok(Child::Running) };
    let mut state = Child::Running;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child, writing to a local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        if r <= 0 {
            return Ok(state);
        }
        if libc::WIFEXITED(status) {
            return Ok(Child::Exited(libc::WEXITSTATUS(status)));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(Child::Exited(128 + libc::WTERMSIG(status)));
        }
        if libc::WIFSTOPPED(status) && on_stop(t, pid, status)? {
            state = Child::Dying;
        }
    }
}

/// Handles a ptrace stop of the traced thread; true if it is dying (its exit stop, or a
/// signal on its way that ends it).
fn on_stop(t: &mut Tracer, pid: i32, status: i32) -> Result<bool> {
    let event = (status >> 16) & 0xff;
    let mut dying = false;
    // SAFETY: ptrace requests on our own tracee, in a ptrace stop.
    unsafe {
        if event == libc::PTRACE_EVENT_EXIT {
            dying = true;
            // Its memory still exists: classify its blocks, normalize the last stacks.
            t.scan_at_exit(pid);
            t.symbolizer.reread_maps();
            t.prepare_symbols()?;
            libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0);
        } else if event == libc::PTRACE_EVENT_EXEC {
            // A new image (an exec'ing wrapper): its tables before it runs.
            if let Some(u) = t.unwind.as_mut() {
                u.load_exec(&mut t.symbolizer.objects);
            }
            libc::ptrace(libc::PTRACE_CONT, pid, 0, 0);
        } else if event == libc::PTRACE_EVENT_STOP && libc::WSTOPSIG(status) != libc::SIGTRAP {
            // A group-stop: it stays stopped until SIGCONT.
            libc::ptrace(libc::PTRACE_LISTEN, pid, 0, 0);
        } else if event == libc::PTRACE_EVENT_STOP {
            // An interrupt (a scan's, reported after a signal that came first), or the end of
            // a group-stop: it goes on.
            libc::ptrace(libc::PTRACE_CONT, pid, 0, 0);
        } else {
            // A signal on its way to the command: delivered as it would be untraced.
            let sig = libc::WSTOPSIG(status);
            if signals::Masks::of(pid).is_some_and(|m| m.kills(sig)) {
                dying = true;
            }
            libc::ptrace(libc::PTRACE_CONT, pid, 0, sig as libc::c_ulong);
        }
    }
    Ok(dying)
}

/// Stops of the traced thread that a scan met while stopping it: handled as usual.
fn handle_foreign(t: &mut Tracer) -> Result<()> {
    let Some(pid) = t.pid else { return Ok(()) };
    for status in std::mem::take(&mut t.scan.foreign) {
        on_stop(t, pid, status)?;
    }
    Ok(())
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
