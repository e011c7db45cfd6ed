//! Classified reports: each stack's blocks split by class (one entry per class of a stack),
//! valgrind's leak summary, suppressions, and the verdict --error-exitcode goes by. Reached from
//! run.rs's `print_report`, on the process it collected, before the snapshot every output
//! reads is built (src/snapshot.rs carries the classes and the summary).
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context as _, Result};
use libbpf_rs::MapCore;

use super::options::Mode;
use super::{Block, Class, Heuristic, Outcome, Stats, Target};
use crate::collector::{Collector, Losses, MoreRecords, RecordMaps, StackTotal, monotonic_ns, read_pod};
use crate::report::Reporter;
use crate::skel::types::{alloc_key, map_info};
use crate::snapshot::{LeakSummary, ProcessInput};

/// What a scan needs to know of a process, from the session.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    /// The threads memleak traces anyway (a followed process's: all of them).
    pub traced: Vec<i32>,
    /// Traced from its first instruction (-c and the processes it starts): every block it
    /// holds is known.
    pub from_start: bool,
    /// Its allocator is glibc's malloc (libc, no -O or -S).
    pub glibc: bool,
}

/// The reachability side of a run.
#[derive(Default)]
pub struct Session {
    /// The scans at processes' exit stops, or why there was none, by pid.
    exits: HashMap<u32, std::result::Result<Outcome, String>>,
    /// For --error-exitcode: the final reports' leaks of the kinds that count, or why one was
    /// not classified.
    verdict: Option<std::result::Result<u64, String>>,
    /// (thread, wait status) a scan met for traced threads (their own events), for their
    /// tracer.
    pub foreign: Vec<(i32, i32)>,
    /// The last report's scan, for -v: (blocks, what it did).
    last_stats: Option<(usize, Stats)>,
}

impl Session {
    /// -v: how the last report's scan went.
    pub fn verbose(&self) {
        if let Some((blocks, s)) = &self.last_stats {
            errln!(
                "memleak: scan: {blocks} blocks, {} root words, {} bytes read, {} untouched; stopped {:.1} ms (read map {:.1} ms, copy {:.1} ms), marked in {:.1} ms",
                s.root_words,
                s.scanned - s.untouched,
                s.untouched,
                s.pause.as_secs_f64() * 1e3,
                s.map.as_secs_f64() * 1e3,
                s.copy.as_secs_f64() * 1e3,
                s.mark.as_secs_f64() * 1e3
            );
        }
    }

    /// What memleak exits with under --error-exitcode: its status when a final report has
    /// leaks of the kinds that count, or could not be classified; None: the run's own status.
    pub fn gate(&self, cfg: &crate::cli::Config) -> Option<i32> {
        let n = cfg.scan.error_exitcode?;
        match &self.verdict {
            Some(Ok(0)) => None,
            Some(Ok(_)) => Some(n),
            Some(Err(why)) => {
                errln!("memleak: --error-exitcode: a final report is not classified ({why}): exiting with {n}");
                Some(n)
            }
            None => {
                errln!("memleak: --error-exitcode: no final report was classified: exiting with {n}");
                Some(n)
            }
        }
    }

    /// Adds a final report's verdict (or why it has none) to the run's.
    fn add_verdict(&mut self, v: std::result::Result<u64, String>) {
        self.verdict = Some(match (self.verdict.take(), v) {
            (Some(Err(e)), _) | (_, Err(e)) => Err(e),
            (Some(Ok(a)), Ok(b)) => Ok(a + b),
            (None, Ok(b)) => Ok(b),
        });
    }
}

/// The blocks of `pid`: the allocation map's, and the mapping map's (mmap'd pages; those
/// without access, PROT_NONE, are address space, not blocks), and those `more` holds (the
/// in-process capture's).
fn read_blocks<M: MapCore>(maps: &RecordMaps<M>, more: Option<&dyn MoreRecords>, pid: u32) -> Result<Vec<Block>> {
    let mut out = Vec::new();
    if let Some(m) = more {
        m.for_each_block(pid, &mut |addr, size, timestamp_ns, stack_id| {
            out.push(Block { addr, size, stack_id, timestamp_ns })
        });
    }
    maps.allocs.for_each(|r| {
        if r.pid == pid {
            out.push(Block { addr: r.addr, size: r.size, stack_id: r.stack_id, timestamp_ns: r.timestamp_ns });
        }
    });
    if let Some(mappings) = maps.mappings {
        crate::batch::for_each(mappings, |k, v| {
            let key: alloc_key = read_pod(k);
            let info: map_info = read_pod(v);
            if key.pid == pid && info.reserved == 0 {
                out.push(Block {
                    addr: key.addr,
                    size: info.size,
                    stack_id: info.stack_id,
                    timestamp_ns: info.timestamp_ns,
                });
            }
        })
        .context("reading the mapping map")?;
    }
    Ok(out)
}

impl Reporter<'_, '_> {
    fn target(&self, pid: i32, who: &Subject, losses: &Losses) -> Target {
        let c = self.cfg;
        let unfiltered = c.sample_rate == 1 && c.sample_bytes == 0 && c.min_size == 0 && c.max_size == u64::MAX;
        let nothing_lost = losses.allocs_map_full == 0
            && losses.no_thread_state == 0
            && losses.allocs_missed == 0
            && losses.calls_missed == 0;
        Target {
            pid,
            traced: who.traced.clone(),
            complete: who.from_start && unfiltered && nothing_lost,
            glibc: who.glibc,
            not_roots: self
                .preload
                .as_ref()
                .map(|p| p.region_ids().into_iter().map(|(_, ino)| ino).collect())
                .unwrap_or_default(),
        }
    }

    /// At the traced thread's exit stop, where the process's memory still exists: classifies
    /// its blocks for the final report. The caller lets the thread go on afterwards.
    pub fn scan_at_exit(&mut self, pid: i32, tid: i32, who: &Subject) {
        if self.cfg.scan.mode == Mode::Off {
            return;
        }
        if super::thread_exit_only(tid) {
            self.scan.exits.insert(
                pid as u32,
                Err(format!(
                    "thread {tid} ended before the process (pthread_exit), which memleak does not trace to its end"
                )),
            );
            return;
        }
        let mut losses = Collector::losses(self.maps.counters);
        if let Some(k) = &self.programs {
            k.add_losses(&mut losses);
        }
        if let Some(p) = &self.preload {
            p.add_losses(&mut losses);
        }
        let target = self.target(pid, who, &losses);
        let maps = &self.maps;
        let more = self.preload.as_ref().map(|p| p as &dyn MoreRecords);
        let r = super::at_exit(&target, tid, || read_blocks(maps, more, pid as u32));
        self.scan.exits.insert(pid as u32, r.map_err(|e| format!("{e:#}")));
    }

    /// Classifies this report's process when it should be (its stacks then one entry per
    /// class, with a leak summary), and applies the suppressions; says what could not be done.
    pub fn scan_report(
        &mut self,
        process: &mut ProcessInput,
        who: &Subject,
        after_exit: bool,
        last: bool,
        min_age: Duration,
        losses: &Losses,
    ) -> Result<()> {
        let cfg = self.cfg;
        self.scan.last_stats = None;
        let classify = !self.kernel
            && match cfg.scan.mode {
                Mode::Every => true,
                Mode::Final => after_exit,
                Mode::Off => false,
            };
        if !classify && cfg.scan.suppressions.is_none() {
            return Ok(());
        }
        // Why a report that should be classified is not.
        let mut unclassified: Option<String> = None;
        let pid = process.pid as i32;
        let outcome = match classify {
            false => None,
            true if after_exit => match self.scan.exits.remove(&process.pid) {
                Some(Ok(o)) => Some(o),
                Some(Err(why)) => {
                    unclassified = Some(why);
                    None
                }
                None => {
                    unclassified = Some(if who.from_start {
                        "the command's exit was not seen (killed by SIGKILL, or ended by a thread memleak does not trace)".into()
                    } else {
                        "the process had exited: its memory is gone".into()
                    });
                    None
                }
            },
            true => {
                let target = self.target(pid, who, losses);
                let maps = &self.maps;
                let more = self.preload.as_ref().map(|p| p as &dyn MoreRecords);
                match super::live(&target, || read_blocks(maps, more, pid as u32)) {
                    Ok(mut o) => {
                        self.scan.foreign.append(&mut o.foreign);
                        Some(o)
                    }
                    Err(e) => {
                        unclassified = Some(format!("{e:#}"));
                        None
                    }
                }
            }
        };
        if let Some(why) = &unclassified {
            process.warnings.push(format!("not classified: {why}"));
        }
        if let Some(o) = &outcome {
            process.warnings.extend(scan_warnings(&o.stats));
            // (Untracked blocks are said by the loss lines already.)
            if who.from_start
                && (cfg.sample_rate > 1 || cfg.sample_bytes > 0 || cfg.min_size > 0 || cfg.max_size < u64::MAX)
            {
                process.warnings.push(
                    "blocks sampled out or filtered by size are unknown to the scan: memory the allocator holds outside the known blocks was scanned as a root".into(),
                );
            }
            let (entries, young) = by_stack_and_class(o, min_age, cfg.show_allocs, cfg.sample_bytes);
            process.young = young;
            process.classes = entries.iter().map(|e| e.1.words().to_string()).collect();
            process.stacks = entries.into_iter().map(|e| e.0).collect();
        }

        // Suppressions: a stack whose frames match is left out, every class of it.
        let mut suppressed_stacks = HashSet::new();
        if let Some(supp) = &cfg.scan.suppressions {
            let mut suppressed = (0u64, 0u64);
            let mut verdicts: HashMap<u64, bool> = HashMap::new();
            let mut keep = Vec::with_capacity(process.stacks.len());
            for t in &process.stacks {
                let hit = *verdicts.entry(t.stack_id).or_insert_with(|| {
                    supp.matching(&self.symbolizer.stack(pid, self.collector.frames(t.stack_id).unwrap_or_default()))
                        .is_some()
                });
                if hit {
                    suppressed.0 += t.bytes;
                    suppressed.1 += t.count;
                    suppressed_stacks.insert(t.stack_id);
                }
                keep.push(!hit);
            }
            let mut k = keep.iter();
            process.stacks.retain(|_| *k.next().unwrap_or(&true));
            if !process.classes.is_empty() {
                let mut k = keep.iter();
                process.classes.retain(|_| *k.next().unwrap_or(&true));
            }
            process.suppressed = Some(suppressed);
        }

        if let Some(o) = &outcome {
            let mut sums: HashMap<&str, (u64, u64)> = HashMap::new();
            for (t, c) in process.stacks.iter().zip(&process.classes) {
                let s = sums.entry(c.as_str()).or_default();
                s.0 += t.bytes;
                s.1 += t.count;
            }
            let classes: Vec<(String, u64, u64)> = Class::ALL
                .iter()
                .map(|c| {
                    let (b, n) = sums.get(c.words()).copied().unwrap_or_default();
                    (c.words().to_string(), b, n)
                })
                .collect();
            // The gate goes by final reports: a process's after its exit, and the run's last.
            if after_exit || last {
                self.scan.add_verdict(Ok(cfg
                    .scan
                    .error_kinds
                    .iter()
                    .map(|k| sums.get(k.words()).map_or(0, |s| s.1))
                    .sum()));
            }
            let heuristics = heuristic_sums(o, min_age, &suppressed_stacks)
                .into_iter()
                .map(|(h, b, n)| (h.name().to_string(), b, n))
                .collect();
            process.summary = Some(LeakSummary { classes, heuristics, scanned: stats_line(&o.stats) });
            self.scan.last_stats = Some((o.blocks.len(), o.stats.clone()));
        } else if classify && (after_exit || last) {
            self.scan.add_verdict(Err(unclassified.unwrap_or_default()));
        }
        Ok(())
    }
}

/// A report's entries: a stack's blocks of one class.
type Entries = Vec<(StackTotal, Class)>;

/// Each stack's blocks older than `min_age`, one total per class; and the younger blocks left
/// out: (count, bytes).
/// With --sample-bytes (`sample_bytes` > 0) each block counts for what it stands for.
fn by_stack_and_class(o: &Outcome, min_age: Duration, addrs: bool, sample_bytes: u64) -> (Entries, (u64, u64)) {
    let now = monotonic_ns();
    let min_age = min_age.as_nanos() as u64;
    let mut by: HashMap<(u64, Class), StackTotal> = HashMap::new();
    let mut estimates: HashMap<(u64, Class), (f64, f64)> = HashMap::new();
    let mut young = (0u64, 0u64);
    for (b, c) in o.blocks.iter().zip(&o.class) {
        if now.saturating_sub(b.timestamp_ns) < min_age {
            young.0 += 1;
            young.1 = young.1.saturating_add(b.size);
            continue;
        }
        let t = by.entry((b.stack_id, *c)).or_insert_with(|| StackTotal { stack_id: b.stack_id, ..Default::default() });
        t.bytes += b.size;
        t.count += 1;
        if addrs {
            t.blocks.push((b.addr, b.size));
        }
        if sample_bytes > 0 {
            let w = crate::collector::sample_weight(b.size, sample_bytes);
            let e = estimates.entry((b.stack_id, *c)).or_default();
            e.0 += b.size as f64 * w;
            e.1 += w;
        }
    }
    for (key, (bytes, n)) in estimates {
        if let Some(t) = by.get_mut(&key) {
            (t.bytes, t.count) = (bytes.round() as u64, n.round() as u64);
        }
    }
    (by.into_iter().map(|((_, c), t)| (t, c)).collect(), young)
}

fn heuristic_sums(o: &Outcome, min_age: Duration, suppressed: &HashSet<u64>) -> Vec<(Heuristic, u64, u64)> {
    let now = monotonic_ns();
    let min_age = min_age.as_nanos() as u64;
    let mut v: Vec<(Heuristic, u64, u64)> = Vec::new();
    for (b, h) in o.blocks.iter().zip(&o.heuristic) {
        let Some(h) = h else { continue };
        if now.saturating_sub(b.timestamp_ns) < min_age || suppressed.contains(&b.stack_id) {
            continue;
        }
        match v.iter_mut().find(|e| e.0 == *h) {
            Some(e) => {
                e.1 += b.size;
                e.2 += 1;
            }
            None => v.push((*h, b.size, 1)),
        }
    }
    v.sort();
    v
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 10 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 10 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 10 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    }
}

/// How long the process was held, and what was scanned.
fn stats_line(s: &Stats) -> String {
    let threads = match s.threads {
        1 => "1 thread".to_string(),
        n => format!("{n} threads"),
    };
    let ms = s.pause.as_secs_f64() * 1e3;
    let noaccess = match s.noaccess {
        0 => String::new(),
        n => format!(" ({} of blocks without access rights not read)", human(n)),
    };
    if s.at_exit {
        format!(
            "scanned at its exit: {} of memory{noaccess}, the registers of {threads}; exit held {ms:.1} ms",
            human(s.scanned)
        )
    } else {
        format!(
            "scanned {} of memory{noaccess} and the registers of {threads}; the process was stopped {ms:.1} ms",
            human(s.scanned)
        )
    }
}

/// What a scan could not do, as WARNING lines.
fn scan_warnings(s: &Stats) -> Vec<String> {
    let mut w = Vec::new();
    if s.unreadable > 0 {
        let eg: Vec<String> = s.unreadable_examples.iter().map(|(a, b)| format!("{a:x}-{b:x}")).collect();
        let eg = if eg.is_empty() { String::new() } else { format!(" (at {})", eg.join(", ")) };
        w.push(format!(
            "{} bytes in {} ranges could not be read{eg}: pointers there were not seen",
            s.unreadable, s.unreadable_ranges
        ));
    }
    if s.devices.0 > 0 {
        w.push(format!(
            "{} bytes of {} device mappings not scanned (reading a device can have effects)",
            s.devices.1, s.devices.0
        ));
    }
    if !s.stragglers.is_empty() {
        let tids: Vec<String> = s.stragglers.iter().map(|t| t.to_string()).collect();
        w.push(format!(
            "{} threads did not stop within 1 s (blocked in the kernel): their registers were not scanned (tids {})",
            s.stragglers.len(),
            tids.join(" ")
        ));
    }
    w
}
