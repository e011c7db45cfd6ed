//! Classified reports: each stack's blocks split by class (one entry per class), valgrind's
//! leak summary, suppressions, and the verdict --error-exitcode goes by. Reached from
//! run.rs's `print_report`, which prints the plain report when nothing here applies.
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use libbpf_rs::MapCore;

use super::options::Mode;
use super::{Block, Class, Heuristic, Outcome, Stats, Target};
use crate::collector::{Collector, Losses, RecordMaps, StackTotal, monotonic_ns, read_pod};
use crate::report::{self, StackReport};
use crate::run::{End, Tracer, write_out};
use crate::skel::types::{alloc_info, alloc_key, map_info};
use crate::symbolizer::Frame;

/// The reachability side of a run.
#[derive(Default)]
pub struct Session {
    /// The thread memleak traces (the -c command's; under -p with --scan, the process's
    /// main thread, so that its exit is seen), while it does.
    pub traced: Option<i32>,
    /// Traced from its first instruction (-c): every block it holds is known.
    pub from_start: bool,
    /// The allocator is glibc's malloc (libc, no -O or -S).
    pub glibc: bool,
    comm: Option<String>,
    /// The scan at the process's exit stop, or why there was none.
    exit: Option<std::result::Result<Outcome, String>>,
    /// For --error-exitcode: the last report's leaks of the kinds that count, or why it was
    /// not classified.
    verdict: Option<std::result::Result<u64, String>>,
    /// Wait statuses a scan met for the traced thread (its own events), for its tracer.
    pub foreign: Vec<i32>,
}

impl Session {
    /// `traced`: the thread memleak traces; `allocator`: the object whose malloc is traced.
    pub fn new(from_start: bool, traced: Option<i32>, allocator: &Path, prefix: &str) -> Session {
        let name = allocator.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let glibc = prefix.is_empty() && (name.starts_with("libc.so") || name.starts_with("libc-"));
        Session { from_start, traced, glibc, ..Session::default() }
    }

    /// What memleak exits with: --error-exitcode's status when the final report has leaks of
    /// the kinds that count, or could not be classified; `end`'s otherwise.
    pub fn gate(&self, cfg: &crate::cli::Config, end: End) -> End {
        let Some(n) = cfg.scan.error_exitcode else { return end };
        match &self.verdict {
            Some(Ok(0)) => end,
            Some(Ok(_)) => End::Leaks(n),
            Some(Err(why)) => {
                errln!("memleak: --error-exitcode: the final report is not classified ({why}): exiting with {n}");
                End::Leaks(n)
            }
            None => {
                errln!("memleak: --error-exitcode: no final report was classified: exiting with {n}");
                End::Leaks(n)
            }
        }
    }
}

/// The blocks of `pid`: the allocation map's, and the mapping map's (mmap'd pages; those
/// without access, PROT_NONE, are address space, not blocks).
fn read_blocks<M: MapCore>(maps: &RecordMaps<M>, pid: u32) -> Result<Vec<Block>> {
    let mut out = Vec::new();
    crate::batch::for_each(maps.allocs, |k, v| {
        let key: alloc_key = read_pod(k);
        if key.pid == pid {
            let info: alloc_info = read_pod(v);
            out.push(Block {
                addr: key.addr,
                size: info.size,
                stack_id: info.stack_id,
                timestamp_ns: info.timestamp_ns,
            });
        }
    })
    .context("reading the allocation map")?;
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

fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end().to_string())
}

impl Tracer<'_, '_> {
    fn target(&self, pid: i32, losses: &Losses) -> Target {
        let c = self.cfg;
        let unfiltered = c.sample_rate == 1 && c.min_size == 0 && c.max_size == u64::MAX;
        let nothing_lost = losses.allocs_map_full == 0
            && losses.no_thread_state == 0
            && losses.allocs_missed == 0
            && losses.calls_missed == 0;
        Target {
            pid,
            traced: self.scan.traced,
            complete: self.scan.from_start && unfiltered && nothing_lost,
            glibc: self.scan.glibc,
        }
    }

    /// At the traced thread's exit stop, where the process's memory still exists: classifies
    /// its blocks for the final report. The caller lets the thread go on afterwards.
    pub fn scan_at_exit(&mut self, tid: i32) {
        self.scan.traced = None;
        let Some(pid) = self.pid else { return };
        if self.cfg.scan.mode == Mode::Off {
            return;
        }
        if super::thread_exit_only(tid) {
            self.scan.exit = Some(Err(format!(
                "thread {tid} ended before the process (pthread_exit), which memleak does not trace to its end"
            )));
            return;
        }
        self.scan.comm = comm(pid).or(self.scan.comm.take());
        let mut losses = Collector::losses(self.maps.counters);
        if let Some(k) = &self.programs {
            k.add_losses(&mut losses);
        }
        let target = self.target(pid, &losses);
        let maps = &self.maps;
        let r = super::at_exit(&target, tid, || read_blocks(maps, pid as u32));
        self.scan.exit = Some(r.map_err(|e| format!("{e:#}")));
    }

    /// Prints this report classified (or with suppressions applied); false when neither
    /// applies, and the caller prints the plain report.
    pub fn print_scanned(&mut self, after_exit: bool) -> Result<bool> {
        let cfg = self.cfg;
        let classify = self.pid.is_some()
            && match cfg.scan.mode {
                Mode::Every => true,
                Mode::Final => after_exit,
                Mode::Off => false,
            };
        if !classify && cfg.scan.suppressions.is_none() {
            return Ok(false);
        }
        let started = Instant::now();
        let min_age = if after_exit { Duration::ZERO } else { cfg.min_age };
        let mut losses = Collector::losses(self.maps.counters);
        if let Some(k) = &self.programs {
            k.add_losses(&mut losses);
        }
        let mut warnings = Vec::new();
        // Why a report that should be classified is not.
        let mut unclassified: Option<String> = None;
        let outcome = match (classify, self.pid) {
            (false, _) | (_, None) => None,
            (true, Some(_)) if after_exit => match self.scan.exit.take() {
                Some(Ok(o)) => Some(o),
                Some(Err(why)) => {
                    unclassified = Some(why);
                    None
                }
                None => {
                    unclassified = Some(if self.scan.from_start {
                        "the command's exit was not seen (killed by SIGKILL, or ended by a thread memleak does not trace)".into()
                    } else {
                        "the process had exited: its memory is gone".into()
                    });
                    None
                }
            },
            (true, Some(pid)) => {
                self.scan.comm = comm(pid).or(self.scan.comm.take());
                let target = self.target(pid, &losses);
                let maps = &self.maps;
                match super::live(&target, || read_blocks(maps, pid as u32)) {
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
            warnings.push(format!("not classified: {why}"));
        }
        if let Some(o) = &outcome {
            warnings.extend(scan_warnings(&o.stats));
            // (Untracked blocks are said by the loss lines already.)
            if self.scan.from_start && (cfg.sample_rate > 1 || cfg.min_size > 0 || cfg.max_size < u64::MAX) {
                warnings.push(
                    "blocks sampled out or filtered by size are unknown to the scan: memory the allocator holds outside the known blocks was scanned as a root".into(),
                );
            }
        }
        let (entries, young): (Entries, (u64, u64)) = match &outcome {
            Some(o) => by_stack_and_class(o, min_age, cfg.show_allocs),
            None => {
                let snap = self.collector.collect(
                    &self.maps,
                    self.pid.map(|p| p as u32),
                    min_age,
                    cfg.show_allocs,
                    cfg.combined_only,
                )?;
                (snap.stacks.into_iter().map(|s| (s, None)).collect(), snap.young)
            }
        };

        // Symbolized once per stack: suppressions match frames, the report prints them.
        let mut frames: HashMap<u64, Vec<Frame>> = HashMap::new();
        let mut suppressed = (0u64, 0u64);
        let mut suppressed_stacks = std::collections::HashSet::new();
        let mut kept = Vec::with_capacity(entries.len());
        for (total, class) in entries {
            let f = frames
                .entry(total.stack_id)
                .or_insert_with(|| self.symbolizer.stack(self.collector.frames(total.stack_id).unwrap_or_default()));
            if cfg.scan.suppressions.as_ref().is_some_and(|s| s.matching(f).is_some()) {
                suppressed.0 += total.bytes;
                suppressed.1 += total.count;
                suppressed_stacks.insert(total.stack_id);
                continue;
            }
            kept.push((total, class));
        }

        let allocs: u64 = kept.iter().map(|(t, _)| t.count).sum::<u64>() + suppressed.1;
        // Totals by class over what the report covers.
        let mut sums: HashMap<Class, (u64, u64)> = HashMap::new();
        for (t, c) in &kept {
            if let Some(c) = c {
                let s = sums.entry(*c).or_default();
                s.0 += t.bytes;
                s.1 += t.count;
            }
        }
        if classify {
            self.scan.verdict = Some(match &outcome {
                Some(_) => Ok(cfg.scan.error_kinds.iter().map(|k| sums.get(k).map_or(0, |s| s.1)).sum()),
                None => Err(unclassified.clone().unwrap_or_default()),
            });
        }

        // Entries by class in valgrind's order, each class's largest last, -T of each.
        let mut groups: Vec<(Option<Class>, Vec<StackTotal>)> = Vec::new();
        for (t, c) in kept {
            match groups.iter_mut().find(|g| g.0 == c) {
                Some(g) => g.1.push(t),
                None => groups.push((c, vec![t])),
            }
        }
        groups.sort_by_key(|g| g.0);
        let selected: Vec<(Option<Class>, Vec<StackTotal>)> =
            groups.into_iter().map(|(c, v)| (c, report::select(v, cfg.sort, cfg.top))).collect();
        let stacks: Vec<StackReport> = selected
            .iter()
            .flat_map(|(c, v)| v.iter().map(move |t| (c, t)))
            .map(|(c, t)| StackReport {
                total: t,
                frames: frames.get(&t.stack_id).map(|f| f.iter().flat_map(|f| f.lines()).collect()).unwrap_or_default(),
                class: *c,
            })
            .collect();
        let opts = report::Options {
            top: cfg.top,
            show_allocs: cfg.show_allocs,
            max_allocs: cfg.max_allocs,
            young: (young.0, young.1, min_age.as_millis() as u64),
        };
        let now = report::now_hms();
        let mut text = report::format_with(&now, &opts, &stacks, &losses, &warnings);
        match &outcome {
            Some(o) => {
                let pid = self.pid.unwrap_or(0);
                let heur = heuristic_sums(o, min_age, &suppressed_stacks);
                text.push_str(&summary(&now, pid, self.scan.comm.as_deref(), &sums, &heur, suppressed, cfg));
                text.push_str(&stats_line(&o.stats));
            }
            None if cfg.scan.suppressions.is_some() => {
                let _ = writeln!(text, "\tsuppressed: {} bytes in {} allocations", suppressed.0, suppressed.1);
            }
            None => {}
        }
        write_out(&text)?;
        if cfg.verbose {
            if let Some(o) = &outcome {
                let s = &o.stats;
                errln!(
                    "memleak: scan: {} blocks, {} root words, {} bytes read, {} untouched; stopped {:.1} ms (read map {:.1} ms, copy {:.1} ms), marked in {:.1} ms",
                    o.blocks.len(),
                    s.root_words,
                    s.scanned - s.untouched,
                    s.untouched,
                    s.pause.as_secs_f64() * 1e3,
                    s.map.as_secs_f64() * 1e3,
                    s.copy.as_secs_f64() * 1e3,
                    s.mark.as_secs_f64() * 1e3
                );
            }
            errln!(
                "memleak: report: {} allocations in {} stacks, {} entries printed, in {:.1} ms",
                allocs,
                frames.len(),
                stacks.len(),
                started.elapsed().as_secs_f64() * 1e3
            );
            self.say_map_memory();
        }
        Ok(true)
    }
}

/// A report's entries: a stack's blocks of one class (None: not classified).
type Entries = Vec<(StackTotal, Option<Class>)>;

/// Each stack's blocks older than `min_age`, one total per class; and the younger blocks left
/// out: (count, bytes).
fn by_stack_and_class(o: &Outcome, min_age: Duration, addrs: bool) -> (Entries, (u64, u64)) {
    let now = monotonic_ns();
    let min_age = min_age.as_nanos() as u64;
    let mut by: HashMap<(u64, Class), StackTotal> = HashMap::new();
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
    }
    (by.into_iter().map(|((_, c), t)| (t, Some(c))).collect(), young)
}

fn heuristic_sums(
    o: &Outcome,
    min_age: Duration,
    suppressed: &std::collections::HashSet<u64>,
) -> Vec<(Heuristic, u64, u64)> {
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

/// valgrind's LEAK SUMMARY, in memleak's words for blocks.
fn summary(
    now: &str,
    pid: i32,
    comm: Option<&str>,
    sums: &HashMap<Class, (u64, u64)>,
    heur: &[(Heuristic, u64, u64)],
    suppressed: (u64, u64),
    cfg: &crate::cli::Config,
) -> String {
    let mut out = String::new();
    let name = comm.map(|c| format!(" ({c})")).unwrap_or_default();
    let _ = writeln!(out, "[{now}] Leak summary for pid {pid}{name}:");
    for c in Class::ALL {
        let (bytes, n) = sums.get(&c).copied().unwrap_or_default();
        let _ = writeln!(out, "\t{:>15}: {bytes} bytes in {n} allocations", c.words());
        if c == Class::StillReachable && !heur.is_empty() {
            let _ = writeln!(out, "\t{:>15}  of which reachable via heuristic:", "");
            for (h, bytes, n) in heur {
                let _ = writeln!(out, "\t{:>15}    {}: {bytes} bytes in {n} allocations", "", h.name());
            }
        }
    }
    if cfg.scan.suppressions.is_some() {
        let _ = writeln!(out, "\t{:>15}: {} bytes in {} allocations", "suppressed", suppressed.0, suppressed.1);
    }
    out
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
        n => format!(" ({} of blocks without access rights, e.g. guard pages, not read)", human(n)),
    };
    if s.at_exit {
        format!(
            "\tscanned at its exit: {} of memory{noaccess}, the registers of {threads}; exit held {ms:.1} ms\n",
            human(s.scanned)
        )
    } else {
        format!(
            "\tscanned {} of memory{noaccess} and the registers of {threads}; the process was stopped {ms:.1} ms\n",
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
