//! A user-mode run set up: the targets checked (-p pids, the -c command forked and held
//! before its exec, a cgroup's members), the BPF object loaded, then the session
//! (src/session/) traces them until they exit, the count is reached, or Ctrl-C/SIGTERM/SIGHUP.
use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use libbpf_rs::RingBufferBuilder;

use crate::cli::{Config, Target};
use crate::collector::{Collector, RecordMaps, read_pod};
use crate::features::Features;
use crate::output::Outputs;
use crate::report::Reporter;
use crate::session::{Origin, Registry, Session, ptrace};
use crate::signals::Signals;
use crate::skel::types::proc_event;
use crate::snapshot;
use crate::symbolizer::Symbolizer;
use crate::unwind::{UnwindTables, Unwinder};
use crate::{allocator, ldso, loader, probes, target};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// Fails with what is needed when this process cannot load and attach BPF programs.
/// `process`: a process is traced, whose files memleak opens through /proc/PID/map_files,
/// which takes CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE.
fn check_privileges(process: bool) -> Result<()> {
    let own = crate::procfs::Status::own();
    let has = |c: u32| own.has_cap(c);
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON) && (!process || has(CAP_CHECKPOINT_RESTORE))) {
        return Ok(());
    }
    bail!(
        "memleak needs root, or the capabilities CAP_BPF and CAP_PERFMON (and CAP_CHECKPOINT_RESTORE to trace a process: its files are read through /proc/PID/map_files; plus CAP_SYS_PTRACE for other users' processes)"
    )
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

/// What a run traces, checked before anything is attached.
enum Targets {
    Pids(Vec<i32>),
    Command(target::HeldChild),
    Cgroup(PathBuf),
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
    // Where a probe may sit: on multi-byte nops too where the kernel emulates them.
    crate::placement::set_multibyte_nops(features.uprobe_nop_optimize);
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
    // The allocator each process uses: every object that defines allocator functions.
    let mut allocators =
        allocator::Allocators::new(&allocator::Options { obj: cfg.obj.clone(), prefix: cfg.symbols_prefix.clone() });
    // -c's in-process capture: the library and the socket its processes connect to, made before
    // the command is forked (its environment names them).
    let prepared = if cfg.preload { Some(crate::preload::Prepared::new()?) } else { None };
    let targets = match &cfg.target {
        Target::Kernel => unreachable!("kernel mode returned above"),
        Target::Pids(pids) => {
            for &pid in pids {
                target::check_pid(pid)?;
                target::check_access(pid)?;
            }
            Targets::Pids(pids.clone())
        }
        Target::Command(argv) => {
            let prog = target::resolve_program(&argv[0])?;
            // What it will load, found without running anything of its choosing: a command
            // without an allocator memleak can probe is refused before it runs.
            let launch = ldso::Launch::command(target::command_credentials())?;
            let order = ldso::load_order(&prog, &launch)?;
            target::report_load_order(&order, cfg.verbose);
            allocators.check_command(&order)?;
            let held = match &prepared {
                Some(p) => target::HeldChild::spawn_with(&prog, argv, &p.child_env(), &p.child_fds())?,
                None => target::HeldChild::spawn(&prog, argv)?,
            };
            // Seized before it execs: its probes go on at its exec stop, before its first
            // instruction, and it stops at its exit while its memory map still exists.
            ptrace::seize(held.pid, ptrace::options(cfg.follow))
                .map_err(|e| anyhow::anyhow!("cannot trace the command (ptrace): {e}"))?;
            Targets::Command(held)
        }
        Target::Cgroup(dir) => {
            let dir = crate::cgroup::resolve(dir)?;
            Targets::Cgroup(dir)
        }
    };
    // After the command is forked: it keeps the limits it was given.
    crate::objects::raise_fd_limit();

    let mut storage = MaybeUninit::uninit();
    let loaded = loader::load(&mut storage, cfg, plan.mode, features.find_vma, prepared.is_some())?;
    let skel = &loaded.skel;
    let preload_ids = prepared.as_ref().map(|p| (p.library_id(), p.socket_name().to_string()));
    let capture = prepared.map(|p| crate::preload::Capture::new(p, cfg, skel)).transpose()?;
    let unwind = if cfg.frame_pointers {
        None
    } else {
        let mut tables = UnwindTables::new(skel, cfg.verbose)?;
        // The in-process capture walks the same tables, mirrored into its shared memory.
        if let Some(c) = &capture {
            tables.set_mirror(c.mirror());
        }
        Some(Unwinder { skel, tables, met: Rc::new(RefCell::new(Vec::new())) })
    };
    let _exec_link = skel.progs.memleak_exec.attach().context("cannot attach to sched_process_exec")?;
    let bss = skel.maps.bss_data.as_deref().context("BPF object without .bss")?;
    let table = crate::records::RecordTable::map(&skel.maps.allocs)?;
    let rep = Reporter {
        cfg,
        maps: RecordMaps {
            allocs: &table,
            live: &bss.live_records,
            mappings: Some(&skel.maps.mappings),
            combined: &skel.maps.combined,
            counters: &bss.counters,
        },
        stacks: &skel.maps.stacks,
        kernel: false,
        collector: Collector::new(),
        symbolizer: Symbolizer::new(),
        programs: Some(user_programs(&skel.progs, loaded.mode)),
        unwind,
        outputs,
        snapshots: snapshot::Builder::new(),
        warnings: Vec::new(),
        retired: Vec::new(),
        scan: Default::default(),
        preload: capture,
    };
    let execs: Rc<RefCell<Vec<proc_event>>> = Default::default();
    let mut b = RingBufferBuilder::new();
    if cfg.trace {
        b.add(&skel.maps.events, crate::session::trace_event)?;
    }
    if let Some(u) = &rep.unwind {
        let met = u.met.clone();
        b.add(&skel.maps.unwind_wakeup, move |data: &[u8]| {
            met.borrow_mut().push(read_pod(data));
            0
        })?;
    }
    let queue = execs.clone();
    b.add(&skel.maps.proc_events, move |data: &[u8]| {
        queue.borrow_mut().push(read_pod(data));
        0
    })?;
    let ring = b.build()?;
    let mut prober = allocator::live::AllocProber::new(allocators, skel, loaded.mode, cfg.verbose);
    if let Some((library, socket)) = preload_ids {
        prober = prober.with_preload(library, socket);
    }
    // Tracing starts: from here a stop signal ends the run with a report (signals.rs).
    signals.arm()?;
    let mut session = Session {
        cfg,
        rep,
        reg: Registry::default(),
        prober: Some(&mut prober),
        signals: &signals,
        ring: Some(ring),
        execs,
        follow: cfg.follow,
        user: target::command_credentials().map(|c| (c.uid, c.gid)),
        cgroup: None,
    };
    let held = match targets {
        Targets::Pids(pids) => {
            for &pid in &pids {
                session.add_running(pid, Origin::Pid)?;
            }
            let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
            let what = if pids.len() == 1 { "pid" } else { "pids" };
            session.rep.outputs.status(&format!("Attaching to {what} {}, Ctrl+C to quit.", list.join(", ")))?;
            None
        }
        Targets::Cgroup(dir) => {
            session.join_cgroup_members(&dir);
            let pids: Vec<String> = session.reg.pids().iter().map(|p| p.to_string()).collect();
            session.rep.outputs.status(&format!(
                "Attaching to cgroup {} (pids {}), Ctrl+C to quit.",
                dir.display(),
                if pids.is_empty() { "none yet".into() } else { pids.join(", ") }
            ))?;
            session.cgroup = Some(dir);
            None
        }
        Targets::Command(held) => {
            session.add_command(held.pid);
            session.rep.outputs.status(&format!("Attaching to pid {}, Ctrl+C to quit.", held.pid))?;
            Some(held)
        }
    };
    if let Some(held) = held {
        held.release()?;
    }
    session.run()?;
    let code = session.exit_code();
    drop(session);
    prober.finish();
    Ok(code)
}
