//! The report side of a run, for either BPF object (user mode's or kernel mode's): reads the
//! record maps, builds each report's snapshot (symbolized once per stack) and hands it to the
//! outputs; and forgets a process once it is gone and reported.
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapMut};

use crate::cli::Config;
use crate::collector::{Collector, Programs, RecordMaps};
use crate::output::Outputs;
use crate::snapshot::{self, Exit, ProcessInput, ProcessSnapshot};
use crate::symbolizer::Symbolizer;
use crate::unwind::Unwinder;

/// A process a report is about.
#[derive(Debug, Clone)]
pub struct Subject {
    pub pid: u32,
    pub comm: String,
    /// Set in the report that follows its exit: everything it never freed, whatever its age.
    pub exit: Option<Exit>,
    /// WARNING lines about it (no allocation call seen from it: src/allocator).
    pub warnings: Vec<String>,
    /// What a reachability scan needs to know of it.
    pub scan: crate::scan::report::Subject,
}

pub struct Reporter<'a, 'obj> {
    pub cfg: &'a Config,
    pub maps: RecordMaps<'a, MapMut<'obj>>,
    pub stacks: &'a MapMut<'obj>,
    /// Kernel mode: one pseudo-process, pid 0.
    pub kernel: bool,
    pub collector: Collector,
    pub symbolizer: Symbolizer,
    /// The attached programs, whose runs the kernel skipped are reported.
    pub programs: Option<Programs<'a>>,
    /// User mode without --frame-pointers: the unwind tables.
    pub unwind: Option<Unwinder<'a, 'obj>>,
    /// Where reports go, opened (and checked) at start-up.
    pub outputs: Outputs,
    /// Builds each report's snapshot; remembers the last one's bytes per stack.
    pub snapshots: snapshot::Builder,
    /// What the run cannot see (processes it cannot trace): a WARNING line in every report.
    pub warnings: Vec<String>,
    /// The final reports of processes gone, for the outputs that hold the whole job.
    pub retired: Vec<ProcessSnapshot>,
    /// Reachability: classified reports, exit scans, suppressions, the gate (src/scan/).
    pub scan: crate::scan::report::Session,
    /// -c's in-process capture (src/preload/): the regions its processes record into.
    pub preload: Option<crate::preload::Capture<'a, 'obj>>,
}

impl Reporter<'_, '_> {
    /// Reads the stacks stored since last time and, while their processes live, records where
    /// their addresses live, so that they stay symbolizable after the processes exit.
    pub fn prepare_symbols(&mut self) -> Result<()> {
        let mut new = self.collector.refresh_stacks(self.stacks)?;
        if let Some(p) = self.preload.as_mut() {
            new.extend(p.refresh_stacks(&mut self.collector));
        }
        for id in new {
            let pid = self.collector.pid_of(id).unwrap_or(0) as i32;
            let frames: Vec<_> = self.collector.frames(id).unwrap_or_default().to_vec();
            self.symbolizer.normalize(pid, frames);
        }
        Ok(())
    }

    /// Prints a report of `subjects` (kernel mode: pid 0). `last`: the run ends after it. When
    /// every subject has exited, it is their final report: every block, whatever -o says.
    /// Returns the snapshot of each subject.
    pub fn report(&mut self, subjects: &[Subject], last: bool) -> Result<Vec<ProcessSnapshot>> {
        // After an exit too: stacks stored since the last tick are still in the map, and their
        // addresses resolve against the last maps read (a -p process is gone by now).
        self.prepare_symbols()?;
        let exited = !subjects.is_empty() && subjects.iter().all(|s| s.exit.is_some());
        // After a process exited nothing can be freed any more: every block counts.
        let min_age = if exited { Duration::ZERO } else { self.cfg.min_age };
        let started = Instant::now();
        let pids: Vec<u32> = subjects.iter().map(|s| s.pid).collect();
        let (mut by_pid, mut losses) = self.collector.collect_by_pid(
            &self.maps,
            Some(&pids),
            min_age,
            self.cfg.show_allocs,
            self.cfg.combined_only,
            self.cfg.sample_bytes,
            self.preload.as_ref().map(|p| p as &dyn crate::collector::MoreRecords),
        )?;
        let read = started.elapsed();
        if let Some(k) = &self.programs {
            k.add_losses(&mut losses);
        }
        let mut inputs: Vec<ProcessInput> = Vec::with_capacity(subjects.len());
        for s in subjects {
            let records = by_pid.remove(&s.pid).unwrap_or_default();
            let mut p = ProcessInput::new(s.pid, s.comm.clone(), s.exit, records.stacks, records.young);
            p.warnings.extend(s.warnings.iter().cloned());
            // After the read: what it met out of bounds in the process's region.
            p.warnings.extend(self.preload.as_ref().and_then(|c| c.scribbled(s.pid)));
            // Classified (its blocks' stacks one per class) and suppressions applied.
            self.scan_report(&mut p, &s.scan, s.exit.is_some(), last, min_age, &losses)?;
            inputs.push(p);
        }
        let (allocs, nstacks) =
            inputs.iter().flat_map(|p| &p.stacks).fold((0u64, 0usize), |(a, n), s| (a + s.count, n + 1));
        let mut snap = self.snapshots.build(
            inputs,
            losses,
            last,
            self.kernel,
            self.cfg.sample_rate,
            self.cfg.sort,
            self.outputs.keep(),
            &self.collector,
            &mut self.symbolizer,
        );
        snap.retired = self.retired.clone();
        snap.sample_bytes = self.cfg.sample_bytes;
        snap.warnings = self.warnings.clone();
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
                self.maps.allocs.bytes(),
                map_memory(self.stacks).map_or("?".into(), |b| b.to_string())
            );
        }
        Ok(snap.processes)
    }

    /// Forgets process `pid`, gone and given its final report `last`: its records and stacks
    /// leave the BPF maps (room for the processes that remain), what memleak kept of its maps
    /// goes, and `last` is kept for the outputs that hold the whole job.
    pub fn retire(&mut self, pid: u32, last: Option<ProcessSnapshot>) {
        if let Err(e) = self.remove_records(pid) {
            errln!("memleak: cannot remove the records of pid {pid}: {e:#}");
        }
        let ids = self.collector.stacks_of(pid);
        for id in &ids {
            let _ = self.stacks.delete(&id.to_ne_bytes());
        }
        self.collector.forget(&ids);
        self.symbolizer.forget(pid as i32);
        if let Some(u) = self.unwind.as_mut() {
            u.forget(pid as i32);
        }
        if let Some(p) = self.preload.as_mut() {
            p.forget(pid as i32);
        }
        if let Some(mut p) = last {
            // Its -a addresses are of no use any more, and can be many.
            for s in &mut p.stacks {
                s.blocks = Vec::new();
            }
            self.retired.push(p);
        }
    }

    /// Deletes every record of process `pid` from the allocation table and the mapping map.
    fn remove_records(&self, pid: u32) -> Result<()> {
        // SAFETY: live_records is an aligned u64 in the mmapped .bss, which the BPF side only
        // changes atomically; user space does the same.
        let live = unsafe { std::sync::atomic::AtomicU64::from_ptr(std::ptr::from_ref(self.maps.live).cast_mut()) };
        self.maps.allocs.remove_pid(pid, live);
        if let Some(map) = self.maps.mappings {
            let mut keys: Vec<Vec<u8>> = Vec::new();
            crate::batch::for_each(map, |k, _| {
                // struct alloc_key starts with the pid.
                if k.len() >= 4 && u32::from_ne_bytes([k[0], k[1], k[2], k[3]]) == pid {
                    keys.push(k.to_vec());
                }
            })
            .context("reading a record map")?;
            for k in keys {
                let _ = map.delete(&k);
            }
        }
        if self.cfg.combined_only {
            // Per-stack totals have no pid: its stacks' totals are dropped with them.
            for id in self.collector.stacks_of(pid) {
                let _ = self.maps.combined.delete(&id.to_ne_bytes());
            }
        }
        Ok(())
    }

    /// Marks process `pid` in the BPF `traced` map (user mode), so that its exec ends its
    /// records.
    pub fn set_traced(traced: &MapMut, pid: u32, on: bool) {
        let key = pid.to_ne_bytes();
        if on {
            let _ = traced.update(&key, &0u32.to_ne_bytes(), MapFlags::ANY);
        } else {
            let _ = traced.delete(&key);
        }
    }
}

/// The kernel memory a BPF map uses, as the kernel reports it in the map fd's fdinfo.
pub fn map_memory(map: &impl MapCore) -> Option<u64> {
    let fd = map.as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok())
}
