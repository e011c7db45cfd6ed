//! The text report: memleak(8)'s form of a snapshot, the largest stack last. With several
//! processes, each one's stacks come under a `pid N (name):` line; with --growth each stack
//! line says how it changed since the last report.
use std::fmt::Write;

use crate::cli::{Config, SortKey};
use crate::collector::Losses;
use crate::loader::{MAX_COMBINED, MAX_STACKS};
use crate::snapshot::{CLASS_ORDER, LeakSummary, Snapshot, StackEntry, class_rank};

pub struct Text {
    pub opts: Options,
}

impl Text {
    pub fn new(cfg: &Config) -> Self {
        Text {
            opts: Options {
                top: cfg.top,
                show_allocs: cfg.show_allocs,
                max_allocs: cfg.max_allocs,
                sort: cfg.sort,
                growth: cfg.growth,
                min_age_ms: u64::try_from(cfg.min_age.as_millis()).unwrap_or(u64::MAX),
            },
        }
    }
}

impl super::Format for Text {
    fn name(&self) -> &'static str {
        "text"
    }

    fn needs_all_stacks(&self) -> bool {
        false
    }

    fn render(&mut self, snap: &Snapshot) -> anyhow::Result<Vec<u8>> {
        Ok(format(&super::hms(snap.time), &self.opts, snap).into_bytes())
    }
}

/// The stacks a report shows of one process: of those holding memory, the `top` first by
/// `sort`, in ascending order.
pub fn select(stacks: &[StackEntry], sort: SortKey, top: usize) -> Vec<&StackEntry> {
    select_among(stacks.iter().collect(), sort, top)
}

fn select_among(mut v: Vec<&StackEntry>, sort: SortKey, top: usize) -> Vec<&StackEntry> {
    v.retain(|s| s.count > 0);
    v.sort_by_key(|s| s.rank(sort));
    let skip = v.len().saturating_sub(top);
    v.drain(..skip);
    v
}

/// The lines saying what went untracked, one per cause; none when nothing was lost.
pub fn loss_lines(l: &Losses, max_allocs: u32) -> Vec<String> {
    let mut out = Vec::new();
    if l.allocs_map_full > 0 {
        out.push(format!(
            "{} allocations untracked: the allocation map is full ({max_allocs} entries, see --max-allocs)",
            l.allocs_map_full
        ));
    }
    if l.no_thread_state > 0 {
        out.push(format!("{} calls untracked: no per-thread state could be allocated", l.no_thread_state));
    }
    if l.combined_map_full > 0 {
        out.push(format!(
            "{} allocations missing from the totals: the combined map is full ({MAX_COMBINED} stacks)",
            l.combined_map_full
        ));
    }
    if l.stacks_map_full > 0 {
        out.push(format!(
            "{} allocations without a stack: the stack map is full ({MAX_STACKS} stacks)",
            l.stacks_map_full
        ));
    }
    if l.frees_missed > 0 || l.allocs_missed > 0 {
        out.push(format!(
            "{} frees and {} allocations missed: BPF recursion protection skipped them (another program was running on that CPU, e.g. interrupted); a missed free shows as a false leak",
            l.frees_missed, l.allocs_missed
        ));
    }
    if l.calls_missed > 0 {
        out.push(format!(
            "{} allocator calls missed: BPF recursion protection skipped them (another BPF program was running on that CPU); a missed free shows as a false leak",
            l.calls_missed
        ));
    }
    if l.frees_failed > 0 {
        out.push(format!(
            "{} frees untracked: the allocation map was busy; their blocks show as leaks",
            l.frees_failed
        ));
    }
    if l.returns_missed > 0 {
        out.push(format!(
            "{} allocation calls untracked: another allocation call began on their thread before their return was seen (a longjmp out of the allocator, or a signal handler that allocated)",
            l.returns_missed
        ));
    }
    if l.mappings_map_full > 0 {
        out.push(format!(
            "{} mappings or pieces of mappings untracked: the mapping map is full ({} entries)",
            l.mappings_map_full,
            crate::skel::types::limits::MAX_MAPPINGS.0
        ));
    }
    if l.range_overflows > 0 {
        out.push(format!(
            "{} munmap or mprotect calls overlapped more than {} mappings: the rest of their range was left as it was",
            l.range_overflows,
            crate::skel::types::limits::RANGE_MAX_RECORDS.0
        ));
    }
    if l.truncated_stacks > 0 {
        out.push(format!("{} stacks truncated at {} frames", l.truncated_stacks, crate::MAX_STACK_DEPTH));
    }
    if let Some(line) = unwind_line(l) {
        out.push(line);
    }
    if l.trace_events_lost > 0 {
        out.push(format!("{} -t lines lost: the trace ring buffer was full", l.trace_events_lost));
    }
    out
}

/// The share of table unwinds that stopped before the outermost frame, with the reasons.
fn unwind_line(l: &Losses) -> Option<String> {
    let s = &l.unwind_stops;
    let early = s.total();
    if early == 0 || l.unwinds == 0 {
        return None;
    }
    let reasons: Vec<String> = [
        (s.not_mapped, "at an address in no executable mapping"),
        (s.no_table, "in an object without an unwind table yet"),
        (s.no_cfi, "in code without CFI nor frame pointer"),
        (s.unsupported, "at a CFA rule outside the table's model"),
        (s.bad_cfa, "at a CFA that did not rise"),
        (s.unreadable, "at unreadable stack memory"),
        (s.vma_busy, "at a new address while another thread held the mmap lock"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, why)| format!("{n} {why}"))
    .collect();
    Some(format!(
        "{early} of {} stacks ({:.2}%) end early: {}",
        l.unwinds,
        early as f64 * 100.0 / l.unwinds as f64,
        reasons.join(", ")
    ))
}

pub struct Options {
    pub top: usize,
    pub show_allocs: bool,
    pub max_allocs: u32,
    pub sort: SortKey,
    /// Each stack line says how it grew since the last report.
    pub growth: bool,
    /// -o in milliseconds, for the line on blocks it leaves out.
    pub min_age_ms: u64,
}

/// Formats one snapshot.
pub fn format(time: &str, opts: &Options, snap: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "[{time}] Top {} stacks with outstanding allocations:", opts.top);
    let scans = snap.processes.iter().flat_map(|p| p.warnings.iter().cloned());
    for line in loss_lines(&snap.losses, opts.max_allocs).into_iter().chain(snap.warnings.iter().cloned()).chain(scans)
    {
        let _ = writeln!(out, "\tWARNING: {line}");
    }
    // Not a loss, but blocks the report does not show: said, so that none seems missed.
    let (n, bytes) = snap.processes.iter().fold((0u64, 0u64), |a, p| (a.0 + p.young.0, a.1.saturating_add(p.young.1)));
    if n > 0 {
        let _ =
            writeln!(out, "\tNOTE: {n} allocations ({bytes} bytes) younger than {} ms not shown (-o)", opts.min_age_ms);
    }
    if snap.sample_bytes > 0 {
        let _ = writeln!(
            out,
            "\tNOTE: sampled, one sample per {} bytes allocated on average (--sample-bytes): bytes and counts are estimates",
            snap.sample_bytes
        );
    }
    let several = snap.processes.len() > 1;
    for p in &snap.processes {
        if several {
            let _ = writeln!(out, "pid {} ({}):", p.pid, p.comm);
        }
        for s in select_by_class(&p.stacks, opts.sort, opts.top) {
            stack(&mut out, opts, s);
        }
        if p.summary.is_none()
            && let Some((bytes, n)) = p.suppressed
        {
            let _ = writeln!(out, "\tsuppressed: {bytes} bytes in {n} allocations");
        }
    }
    for p in &snap.processes {
        if let Some(sum) = &p.summary {
            leak_summary(&mut out, time, p, sum);
        }
    }
    out
}

/// Of a classified process, each class's `top` first, the classes in valgrind's order; of one
/// that is not, [`select`]'s.
pub fn select_by_class(stacks: &[StackEntry], sort: SortKey, top: usize) -> Vec<&StackEntry> {
    if stacks.iter().all(|s| s.class.is_none()) {
        return select(stacks, sort, top);
    }
    let mut by_class: Vec<Vec<&StackEntry>> = vec![Vec::new(); CLASS_ORDER.len() + 1];
    for s in stacks {
        by_class[class_rank(s.class.as_deref())].push(s);
    }
    by_class.into_iter().flat_map(|group| select_among(group, sort, top)).collect()
}

/// valgrind's LEAK SUMMARY, in memleak's words for blocks.
fn leak_summary(out: &mut String, time: &str, p: &crate::snapshot::ProcessSnapshot, sum: &LeakSummary) {
    let _ = writeln!(out, "[{time}] Leak summary for pid {} ({}):", p.pid, p.comm);
    for (class, bytes, n) in &sum.classes {
        let _ = writeln!(out, "\t{class:>15}: {bytes} bytes in {n} allocations");
        if class == "still reachable" && !sum.heuristics.is_empty() {
            let _ = writeln!(out, "\t{:>15}  of which reachable via heuristic:", "");
            for (h, bytes, n) in &sum.heuristics {
                let _ = writeln!(out, "\t{:>15}    {h}: {bytes} bytes in {n} allocations", "");
            }
        }
    }
    if let Some((bytes, n)) = p.suppressed {
        let _ = writeln!(out, "\t{:>15}: {bytes} bytes in {n} allocations", "suppressed");
    }
    let _ = writeln!(out, "\t{}", sum.scanned);
}

fn stack(out: &mut String, opts: &Options, s: &StackEntry) {
    if opts.show_allocs {
        let mut blocks = s.blocks.clone();
        blocks.sort();
        for (addr, size) in blocks {
            let _ = writeln!(out, "\taddr = {addr:x} size = {size}");
        }
    }
    let _ = write!(out, "\t{} bytes in {} allocations from stack", s.bytes, s.count);
    if let Some(class) = &s.class {
        let _ = write!(out, " ({class})");
    }
    if opts.growth {
        let _ = write!(out, " ({:+} bytes since the last report)", s.growth.delta);
        if s.growth.growing {
            let _ = write!(out, " growing");
        }
    }
    out.push('\n');
    if s.frames.is_empty() {
        let what = if s.stack_id == 0 { "[stack not stored: the stack map was full]" } else { "[no frames]" };
        let _ = writeln!(out, "\t\t{what}");
    }
    for f in s.frames.iter().flat_map(|f| f.lines()) {
        let _ = writeln!(out, "\t\t{f}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::sample;
    use crate::snapshot::{Growth, ProcessSnapshot};
    use crate::symbolizer::Frame;
    use std::sync::Arc;

    fn st(id: u64, bytes: u64, count: u64) -> StackEntry {
        let mut s = sample(&[(id, bytes, count, &[])]).processes.remove(0).stacks.remove(0);
        s.growth = Growth::default();
        s
    }

    fn opts(top: usize) -> Options {
        Options { top, show_allocs: false, max_allocs: 1 << 20, sort: SortKey::Size, growth: false, min_age_ms: 500 }
    }

    /// A snapshot of one process (pid 7) with these stacks.
    fn snap(stacks: Vec<StackEntry>, losses: Losses) -> Snapshot {
        let mut s = sample(&[]);
        s.processes[0].stacks = stacks;
        s.losses = losses;
        s
    }

    #[test]
    fn top_stacks_largest_last() {
        let all = vec![st(1, 100, 1), st(2, 50, 10), st(3, 300, 2), st(4, 10, 1)];
        let ids = |v: Vec<&StackEntry>| v.iter().map(|s| s.stack_id).collect::<Vec<_>>();
        assert_eq!(ids(select(&all, SortKey::Size, 3)), [2, 1, 3]);
        assert_eq!(ids(select(&all, SortKey::Count, 2)), [3, 2]);
        assert_eq!(select(&all, SortKey::Size, 10).len(), 4);
        // --sort growth: the stack that grew most is last, over a larger stable one.
        let mut grew = st(5, 40, 4);
        grew.growth.delta = 40;
        let mut stable = st(6, 1000, 1);
        stable.growth.delta = 0;
        assert_eq!(ids(select(&[grew, stable], SortKey::Growth, 1)), [5]);
    }

    #[test]
    fn formats_like_memleak8() {
        let mut t = st(9, 80, 5);
        t.blocks = vec![(0x20, 16), (0x10, 16)];
        t.frames = Arc::from(vec![
            Frame {
                addr: 0x400862,
                symbol: Some(("main".into(), 0x6d)),
                module: Some("/home/vagrant/allocs".into()),
                ..Frame::default()
            },
            Frame {
                addr: 0x7fd460ac2790,
                symbol: Some(("__libc_start_main".into(), 0xf0)),
                module: Some("/usr/lib64/libc-2.21.so".into()),
                ..Frame::default()
            },
        ]);
        let s = snap(vec![t], Losses::default());
        let text = format("12:34:56", &opts(10), &s);
        assert_eq!(
            text,
            "[12:34:56] Top 10 stacks with outstanding allocations:\n\
             \t80 bytes in 5 allocations from stack\n\
             \t\tmain+0x6d [/home/vagrant/allocs] (400862)\n\
             \t\t__libc_start_main+0xf0 [/usr/lib64/libc-2.21.so] (7fd460ac2790)\n"
        );
        let with_allocs = format("12:34:56", &Options { show_allocs: true, ..opts(10) }, &s);
        assert!(with_allocs.contains("\taddr = 10 size = 16\n\taddr = 20 size = 16\n\t80 bytes"), "{with_allocs}");
    }

    #[test]
    fn addresses_precede_their_own_stack() {
        let mut a = st(1, 16, 1);
        a.blocks = vec![(0xa0, 16)];
        a.frames = Arc::from(vec![Frame {
            addr: 1,
            symbol: Some(("f".into(), 1)),
            module: Some("/x".into()),
            ..Frame::default()
        }]);
        let mut b = st(2, 64, 2);
        b.blocks = vec![(0xc0, 32), (0xb0, 32)];
        let s = snap(vec![b, a], Losses::default());
        let text = format("01:02:03", &Options { show_allocs: true, ..opts(3) }, &s);
        assert_eq!(
            text,
            "[01:02:03] Top 3 stacks with outstanding allocations:\n\
             \taddr = a0 size = 16\n\
             \t16 bytes in 1 allocations from stack\n\
             \t\tf+0x1 [/x] (1)\n\
             \taddr = b0 size = 32\n\
             \taddr = c0 size = 32\n\
             \t64 bytes in 2 allocations from stack\n\
             \t\t[no frames]\n"
        );
    }

    #[test]
    fn several_processes_each_under_its_line_and_growth_when_asked() {
        let mut s = snap(vec![st(1, 16, 1), st(2, 32, 1)], Losses::default());
        s.processes[0].stacks[1].growth = Growth { prev_bytes: 0, delta: 32, growing: true };
        s.processes[0].stacks[0].growth = Growth { prev_bytes: 20, delta: -4, growing: false };
        let other =
            ProcessSnapshot { pid: 50, comm: "other".into(), stacks: vec![st(3, 8, 1)], ..s.processes[0].clone() };
        s.processes.push(other);
        let text = format("00:00:00", &Options { top: 1, growth: true, ..opts(1) }, &s);
        assert_eq!(
            text,
            "[00:00:00] Top 1 stacks with outstanding allocations:\n\
             pid 42 (prog):\n\
             \t32 bytes in 1 allocations from stack (+32 bytes since the last report) growing\n\
             \t\t[no frames]\n\
             pid 50 (other):\n\
             \t8 bytes in 1 allocations from stack (+0 bytes since the last report)\n\
             \t\t[no frames]\n"
        );
        let text = format("00:00:00", &Options { top: 2, growth: true, ..opts(2) }, &s);
        assert!(text.contains("\t16 bytes in 1 allocations from stack (-4 bytes since the last report)\n"), "{text}");
    }

    #[test]
    fn losses_are_never_silent() {
        let l = Losses { allocs_map_full: 3, stacks_map_full: 2, trace_events_lost: 1, ..Default::default() };
        let opts = Options { max_allocs: 1000, ..opts(10) };
        let text = format("00:00:00", &opts, &snap(vec![], l));
        assert!(text.contains("WARNING: 3 allocations untracked: the allocation map is full (1000 entries"), "{text}");
        assert!(text.contains("WARNING: 2 allocations without a stack"), "{text}");
        assert!(text.contains("WARNING: 1 -t lines lost"), "{text}");
        assert_eq!(loss_lines(&Losses::default(), 1).len(), 0);
        let k = Losses { frees_missed: 4, allocs_missed: 1, frees_failed: 2, ..Default::default() };
        let text = format("00:00:00", &opts, &snap(vec![], k));
        assert!(text.contains("\tWARNING: 4 frees and 1 allocations missed: BPF recursion protection"), "{text}");
        assert!(text.contains("\tWARNING: 2 frees untracked"), "{text}");
        let text = format("00:00:00", &opts, &snap(vec![], Losses { calls_missed: 5, ..Default::default() }));
        assert!(text.contains("\tWARNING: 5 allocator calls missed: BPF recursion protection"), "{text}");
        let u = Losses {
            unwinds: 400,
            unwind_stops: crate::collector::UnwindStops { no_table: 3, unreadable: 1, ..Default::default() },
            ..Default::default()
        };
        assert_eq!(
            loss_lines(&u, 1),
            [
                "4 of 400 stacks (1.00%) end early: 3 in an object without an unwind table yet, 1 at unreadable stack memory"
            ]
        );
        let lost = st(0, 8, 1);
        let text = format("00:00:00", &opts, &snap(vec![lost], l));
        assert!(text.contains("\t8 bytes in 1 allocations from stack\n\t\t[stack not stored"), "{text}");
        let r = Losses { returns_missed: 2, mappings_map_full: 3, range_overflows: 1, ..Default::default() };
        let text = format("00:00:00", &opts, &snap(vec![], r));
        assert!(text.contains("\tWARNING: 2 allocation calls untracked: another allocation call began"), "{text}");
        assert!(
            text.contains("\tWARNING: 3 mappings or pieces of mappings untracked: the mapping map is full"),
            "{text}"
        );
        assert!(text.contains("\tWARNING: 1 munmap or mprotect calls overlapped more than 64 mappings"), "{text}");
    }

    #[test]
    fn blocks_younger_than_o_are_said() {
        let mut s = snap(vec![], Losses::default());
        s.processes[0].young = (100, 10_000_000);
        assert_eq!(
            format("00:00:00", &opts(10), &s),
            "[00:00:00] Top 10 stacks with outstanding allocations:\n\
             \tNOTE: 100 allocations (10000000 bytes) younger than 500 ms not shown (-o)\n"
        );
    }

    /// A classified report: each entry's class, -T of each class in valgrind's order, the scan's
    /// warnings under the header, then the leak summary.
    #[test]
    fn classified_stacks_by_class_then_the_leak_summary() {
        let mut big = st(1, 4096, 1);
        big.class = Some("still reachable".into());
        let mut lost = st(2, 24, 1);
        lost.class = Some("definitely lost".into());
        let mut lost2 = st(3, 40, 2);
        lost2.class = Some("definitely lost".into());
        let mut s = snap(vec![big, lost, lost2], Losses::default());
        let p = &mut s.processes[0];
        p.warnings = vec!["8192 bytes in 1 ranges could not be read".into()];
        p.suppressed = Some((7, 1));
        p.summary = Some(LeakSummary {
            classes: vec![
                ("definitely lost".into(), 64, 3),
                ("indirectly lost".into(), 0, 0),
                ("possibly lost".into(), 0, 0),
                ("still reachable".into(), 4096, 1),
            ],
            heuristics: vec![("newarray".into(), 56, 1)],
            scanned: "scanned 1.0 MiB of memory and the registers of 1 thread; the process was stopped 2.0 ms".into(),
        });
        // -T 1: the largest of each class, the small leak kept beside the larger cache.
        let text = format("00:00:00", &opts(1), &s);
        assert_eq!(
            text,
            "[00:00:00] Top 1 stacks with outstanding allocations:\n\
             \tWARNING: 8192 bytes in 1 ranges could not be read\n\
             \t40 bytes in 2 allocations from stack (definitely lost)\n\
             \t\t[no frames]\n\
             \t4096 bytes in 1 allocations from stack (still reachable)\n\
             \t\t[no frames]\n\
             [00:00:00] Leak summary for pid 42 (prog):\n\
             \tdefinitely lost: 64 bytes in 3 allocations\n\
             \tindirectly lost: 0 bytes in 0 allocations\n\
             \t  possibly lost: 0 bytes in 0 allocations\n\
             \tstill reachable: 4096 bytes in 1 allocations\n\
             \t                 of which reachable via heuristic:\n\
             \t                   newarray: 56 bytes in 1 allocations\n\
             \t     suppressed: 7 bytes in 1 allocations\n\
             \tscanned 1.0 MiB of memory and the registers of 1 thread; the process was stopped 2.0 ms\n"
        );
        // Not classified, suppressions applied: the count as the report's last line.
        s.processes[0].summary = None;
        let text = format("00:00:00", &opts(10), &s);
        assert!(text.ends_with("\tsuppressed: 7 bytes in 1 allocations\n"), "{text}");
    }
}
