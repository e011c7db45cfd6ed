//! The model of one report, built once per report and handed to every output
//! (src/output/): the processes traced, each with its stacks (symbolized, with what they hold
//! now, what they allocated since tracing began, and how they grew since the previous report),
//! and what went untracked.
//!
//! Seams for work to come: a snapshot holds several processes (kernel mode: one, pid 0); a
//! stack entry may carry a reachability class (one entry per class of a stack), and a process
//! a leak summary. Outputs print what is there.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cli::SortKey;
use crate::collector::{Allocated, Collector, Losses, StackTotal};
use crate::symbolizer::{Frame, Symbolizer};

/// One report.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Wall-clock time of the report.
    pub time: SystemTime,
    /// How long tracing had run.
    pub elapsed: Duration,
    /// The last report of the run (after an exit, a stop signal, or the count of reports).
    pub is_final: bool,
    /// Kernel mode: one pseudo-process, pid 0, named "kernel".
    pub kernel: bool,
    /// -s N: about one allocation in N is recorded; every number here is as recorded.
    pub sample_rate: u32,
    /// --sample-bytes N (0: off): bytes and counts are estimates, each block weighed by the
    /// inverse of its chance to be sampled.
    pub sample_bytes: u64,
    /// By pid; each process's stacks in rank order (first: the largest by --sort).
    pub processes: Vec<ProcessSnapshot>,
    /// Processes that exited before this report, as their final reports left them: the text
    /// and JSON reports printed them then; the file outputs (pprof, folded, flame graph) hold
    /// the whole job, so they carry them on.
    pub retired: Vec<ProcessSnapshot>,
    /// Since the start, from the BPF counters: the same for every process.
    pub losses: Losses,
    /// What else the run could not see (processes it cannot trace), one line each.
    pub warnings: Vec<String>,
}

impl Snapshot {
    /// Every process of the job: those of this report, then those retired before it.
    pub fn whole_job(&self) -> impl Iterator<Item = &ProcessSnapshot> {
        self.processes.iter().chain(&self.retired)
    }
}

/// How a process ended, when it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Its exit status (128+N if signal N killed it): a -c command.
    Code(i32),
    /// Exited, status unknown (a -p process is not memleak's child).
    Exited,
}

#[derive(Debug, Clone)]
pub struct ProcessSnapshot {
    pub pid: u32,
    pub comm: String,
    pub exit: Option<Exit>,
    /// Every stack holding memory, and every stack that allocated since tracing began but
    /// holds nothing now (count 0: churn, for alloc_* in pprof and JSON); unless only the text
    /// report is printed: then the ones it shows (the totals still count them all).
    pub stacks: Vec<StackEntry>,
    pub totals: Totals,
    /// Reachability (issue 11): what a scan found, per class. None when not classified.
    pub summary: Option<LeakSummary>,
    /// Blocks left out for being younger than -o: (count, bytes). Not a loss: said, so that
    /// none seems missed.
    pub young: (u64, u64),
    /// What a reachability scan could not do, or why the report is not classified (src/scan/).
    pub warnings: Vec<String>,
    /// With --suppressions: what they left out, (bytes, count).
    pub suppressed: Option<(u64, u64)>,
}

/// A process's sums over all its stacks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub bytes: u64,
    pub count: u64,
    pub alloc_bytes: u64,
    pub alloc_count: u64,
    /// Stacks holding memory.
    pub stacks: u64,
}

/// Per-process leak summary of a reachability scan: (class, bytes, blocks) per class, in
/// valgrind's order (definitely, indirectly, possibly lost, still reachable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeakSummary {
    pub classes: Vec<(String, u64, u64)>,
    /// Of the still reachable ones, those reached only through one of valgrind's heuristics:
    /// (heuristic, bytes, blocks).
    pub heuristics: Vec<(String, u64, u64)>,
    /// What was scanned and how long the process was stopped, in words.
    pub scanned: String,
}

/// One stack of a process (or one class of it).
#[derive(Debug, Clone)]
pub struct StackEntry {
    /// 0: the stack could not be stored (stack map full).
    pub stack_id: u64,
    /// Outstanding now.
    pub bytes: u64,
    pub count: u64,
    /// Allocated from this stack since tracing began, freed or not (all processes sharing it).
    pub alloc_bytes: u64,
    pub alloc_count: u64,
    pub growth: Growth,
    /// Reachability class (issue 11), e.g. "definitely lost"; None: not classified.
    pub class: Option<String>,
    /// (address, size) of each block, with -a.
    pub blocks: Vec<(u64, u64)>,
    /// Innermost first; inlined functions are in each frame's `inlined`.
    pub frames: Arc<[Frame]>,
}

/// How a stack's outstanding bytes changed since the previous report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Growth {
    /// Its bytes at the previous report (0 if it held none then, or at the first report).
    pub prev_bytes: u64,
    /// bytes - prev_bytes.
    pub delta: i64,
    /// It grew in each of the last [`GROWING_REPORTS`] reports.
    pub growing: bool,
}

/// Reports in a row a stack must have grown in to be marked growing.
pub const GROWING_REPORTS: u32 = 3;

impl StackEntry {
    /// The order of --sort: larger ranks first.
    pub fn rank(&self, sort: SortKey) -> (i128, u64, u64, u64) {
        match sort {
            SortKey::Size => (self.bytes as i128, self.count, 0, self.stack_id),
            SortKey::Count => (self.count as i128, self.bytes, 0, self.stack_id),
            SortKey::Growth => (self.growth.delta as i128, self.bytes, self.count, self.stack_id),
        }
    }
}

/// A frame as the outputs list them: the functions inlined at an address each get one, marked
/// `inlined`, before the function that holds the address (the order of the text report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameLine<'a> {
    pub function: Option<&'a str>,
    /// Offset of the address in `function` (not for inlined ones).
    pub offset: Option<u64>,
    pub module: Option<&'a str>,
    pub address: u64,
    pub file: Option<&'a str>,
    pub line: Option<u32>,
    pub inlined: bool,
    pub frame: &'a Frame,
}

/// `file` and line of a `file:line` string as the symbolizer writes them.
pub fn split_line(s: &str) -> (&str, Option<u32>) {
    match s.rsplit_once(':') {
        Some((file, line)) if line.parse::<u32>().is_ok() => (file, line.parse().ok()),
        _ => (s, None),
    }
}

/// The frames of a stack, inlined ones expanded, innermost first.
pub fn frame_lines(frames: &[Frame]) -> impl Iterator<Item = FrameLine<'_>> {
    frames.iter().flat_map(|f| {
        fn at(l: &Option<String>) -> (Option<&str>, Option<u32>) {
            match l.as_deref().map(split_line) {
                Some((file, line)) => (Some(file), line),
                None => (None, None),
            }
        }
        let module = f.module.as_deref();
        let inlined = f.inlined.iter().map(move |(name, line)| {
            let (file, line) = at(line);
            FrameLine {
                function: Some(name),
                offset: None,
                module,
                address: f.addr,
                file,
                line,
                inlined: true,
                frame: f,
            }
        });
        let (file, line) = at(&f.line);
        let own = FrameLine {
            function: f.symbol.as_ref().map(|(n, _)| n.as_str()),
            offset: f.symbol.as_ref().map(|(_, o)| *o),
            module,
            address: f.addr,
            file,
            line,
            inlined: false,
            frame: f,
        };
        inlined.chain(std::iter::once(own))
    })
}

/// What one process holds, as collected, for [`Builder::build`].
pub struct ProcessInput {
    pub pid: u32,
    pub comm: String,
    pub exit: Option<Exit>,
    pub stacks: Vec<StackTotal>,
    /// Blocks left out for being younger than -o: (count, bytes).
    pub young: (u64, u64),
    /// In a classified report, each stack's class (one entry per class of a stack); empty:
    /// not classified.
    pub classes: Vec<String>,
    pub summary: Option<LeakSummary>,
    pub warnings: Vec<String>,
    pub suppressed: Option<(u64, u64)>,
}

impl ProcessInput {
    /// A process as collected, not classified.
    pub fn new(pid: u32, comm: String, exit: Option<Exit>, stacks: Vec<StackTotal>, young: (u64, u64)) -> Self {
        ProcessInput {
            pid,
            comm,
            exit,
            stacks,
            young,
            classes: Vec::new(),
            summary: None,
            warnings: Vec::new(),
            suppressed: None,
        }
    }
}

/// The classes in valgrind's order, for reports that show classified stacks by class.
pub const CLASS_ORDER: [&str; 4] = ["definitely lost", "indirectly lost", "possibly lost", "still reachable"];

/// A class's place in [`CLASS_ORDER`] (unknown ones last).
pub fn class_rank(class: Option<&str>) -> usize {
    class.and_then(|c| CLASS_ORDER.iter().position(|k| *k == c)).unwrap_or(CLASS_ORDER.len())
}

/// Builds snapshots; keeps what spans reports: each stack's bytes at the previous report and
/// how many reports in a row it grew, and the symbolized frames of each stack.
pub struct Builder {
    started: std::time::Instant,
    /// (pid, stack id, class) → (bytes, reports in a row it grew) at the previous report.
    last: HashMap<(u32, u64, Option<String>), (u64, u32)>,
    /// Symbolized stacks by id: a stack's frames never change once stored.
    frames: HashMap<u64, Arc<[Frame]>>,
}

impl Builder {
    pub fn new() -> Self {
        Builder { started: std::time::Instant::now(), last: HashMap::new(), frames: HashMap::new() }
    }

    /// The snapshot of `processes` now, each one's stacks ordered by `sort`. `keep`: only the
    /// first this many stacks of each process are kept (and symbolized), when no output needs
    /// them all (the text report alone).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        &mut self,
        processes: Vec<ProcessInput>,
        losses: Losses,
        is_final: bool,
        kernel: bool,
        sample_rate: u32,
        sort: SortKey,
        keep: Option<usize>,
        collector: &Collector,
        symbolizer: &mut Symbolizer,
    ) -> Snapshot {
        let mut last = HashMap::new();
        let mut out = Vec::with_capacity(processes.len());
        // Stacks that hold nothing now but allocated since tracing began (churn): BPF counts them
        // per stack, not per process, so they are listed only when there is one process.
        let churn = keep.is_none() && processes.len() == 1;
        for mut p in processes {
            // A class per stack, or none at all.
            debug_assert!(p.classes.is_empty() || p.classes.len() == p.stacks.len());
            if churn {
                let holding: std::collections::HashSet<u64> = p.stacks.iter().map(|s| s.stack_id).collect();
                p.stacks.extend(
                    collector
                        .allocated_stacks()
                        .filter(|(id, _)| !holding.contains(id))
                        .map(|(id, _)| StackTotal { stack_id: id, ..StackTotal::default() }),
                );
            }
            let mut totals = Totals::default();
            let mut classes = std::mem::take(&mut p.classes).into_iter();
            // A stack split by class counts what it allocated once, in its first entry.
            let mut allocated_said = std::collections::HashSet::new();
            let mut stacks: Vec<StackEntry> = p
                .stacks
                .into_iter()
                .map(|t| {
                    let class = classes.next();
                    let Allocated { count: alloc_count, bytes: alloc_bytes } = if allocated_said.insert(t.stack_id) {
                        collector.allocated(t.stack_id)
                    } else {
                        Allocated::default()
                    };
                    let key = (p.pid, t.stack_id, class.clone());
                    let (prev_bytes, streak) = self.last.get(&key).copied().unwrap_or((0, 0));
                    let delta = t.bytes as i128 - prev_bytes as i128;
                    let streak = if delta > 0 { streak + 1 } else { 0 };
                    last.insert(key, (t.bytes, streak));
                    totals.bytes = totals.bytes.saturating_add(t.bytes);
                    totals.count += t.count;
                    totals.alloc_bytes = totals.alloc_bytes.saturating_add(alloc_bytes);
                    totals.alloc_count += alloc_count;
                    totals.stacks += u64::from(t.count > 0);
                    StackEntry {
                        stack_id: t.stack_id,
                        bytes: t.bytes,
                        count: t.count,
                        alloc_bytes,
                        alloc_count,
                        growth: Growth {
                            prev_bytes,
                            delta: delta.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                            growing: streak >= GROWING_REPORTS,
                        },
                        class,
                        blocks: t.blocks,
                        frames: Arc::from([]),
                    }
                })
                .collect();
            stacks.sort_by_key(|s| std::cmp::Reverse(s.rank(sort)));
            if let Some(n) = keep {
                // Classified: the first of each class (a cache still reachable never hides a
                // leak); by class in valgrind's order, then rank.
                let mut kept = [0usize; CLASS_ORDER.len() + 1];
                stacks.retain(|s| {
                    let k = &mut kept[class_rank(s.class.as_deref())];
                    *k += 1;
                    *k <= n
                });
            }
            for s in &mut stacks {
                s.frames = self.frames_of(s.stack_id, collector, symbolizer);
            }
            out.push(ProcessSnapshot {
                pid: p.pid,
                comm: p.comm,
                exit: p.exit,
                stacks,
                totals,
                summary: p.summary,
                young: p.young,
                warnings: p.warnings,
                suppressed: p.suppressed,
            });
        }
        out.sort_by_key(|p| p.pid);
        self.last = last;
        Snapshot {
            time: SystemTime::now(),
            elapsed: self.started.elapsed(),
            is_final,
            kernel,
            sample_rate,
            sample_bytes: 0,
            processes: out,
            retired: Vec::new(),
            losses,
            warnings: Vec::new(),
        }
    }

    /// The symbolized frames of a stack, cached once nothing in them can resolve later (a
    /// frame of an object not known yet may be opened by the next tick).
    fn frames_of(&mut self, id: u64, collector: &Collector, symbolizer: &mut Symbolizer) -> Arc<[Frame]> {
        if let Some(f) = self.frames.get(&id) {
            return f.clone();
        }
        let pid = collector.pid_of(id).unwrap_or(0) as i32;
        let frames: Arc<[Frame]> = symbolizer.stack(pid, collector.frames(id).unwrap_or_default()).into();
        if !frames.iter().any(|f| f.unreadable.is_some() && f.module.is_none()) {
            self.frames.insert(id, frames.clone());
        }
        frames
    }
}

/// The command name of a live process (/proc/PID/comm).
pub fn comm_of(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(s.trim_end_matches('\n').to_string())
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A snapshot of one process with stacks of (id, bytes, count, frames' function names).
    pub fn sample(stacks: &[(u64, u64, u64, &[&str])]) -> Snapshot {
        let stacks = stacks
            .iter()
            .map(|&(id, bytes, count, names)| StackEntry {
                stack_id: id,
                bytes,
                count,
                alloc_bytes: bytes * 2,
                alloc_count: count * 2,
                growth: Growth { prev_bytes: 0, delta: bytes as i64, growing: false },
                class: None,
                blocks: vec![],
                frames: names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| Frame {
                        addr: 0x401000 + 0x10 * i as u64 + id * 0x1000,
                        symbol: Some((n.to_string(), 0x10)),
                        module: Some("/bin/prog".into()),
                        line: Some(format!("/src/prog.c:{}", 10 + i)),
                        file_offset: Some(0x1000 + 0x10 * i as u64 + id * 0x1000),
                        build_id: Some("abcd".into()),
                        ..Frame::default()
                    })
                    .collect(),
            })
            .collect::<Vec<_>>();
        let totals = Totals {
            bytes: stacks.iter().map(|s| s.bytes).sum(),
            count: stacks.iter().map(|s| s.count).sum(),
            alloc_bytes: stacks.iter().map(|s| s.alloc_bytes).sum(),
            alloc_count: stacks.iter().map(|s| s.alloc_count).sum(),
            stacks: stacks.len() as u64,
        };
        Snapshot {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            elapsed: Duration::from_secs(5),
            is_final: false,
            kernel: false,
            sample_rate: 1,
            sample_bytes: 0,
            processes: vec![ProcessSnapshot {
                pid: 42,
                comm: "prog".into(),
                exit: None,
                stacks,
                totals,
                summary: None,
                young: (0, 0),
                warnings: vec![],
                suppressed: None,
            }],
            retired: Vec::new(),
            losses: Losses::default(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn file_and_line_split_at_the_last_colon() {
        assert_eq!(split_line("/a:b/c.c:12"), ("/a:b/c.c", Some(12)));
        assert_eq!(split_line("weird"), ("weird", None));
    }

    #[test]
    fn inlined_frames_come_first_as_in_the_text_report() {
        let f = Frame {
            addr: 0x10,
            symbol: Some(("main".into(), 4)),
            module: Some("/m".into()),
            line: Some("/s.c:3".into()),
            inlined: vec![("helper".into(), Some("/h.h:7".into()))],
            ..Frame::default()
        };
        let lines: Vec<_> = frame_lines(std::slice::from_ref(&f)).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].function, lines[0].inlined, lines[0].line), (Some("helper"), true, Some(7)));
        assert_eq!((lines[1].function, lines[1].offset, lines[1].file), (Some("main"), Some(4), Some("/s.c")));
    }
}
