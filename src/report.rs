//! Report: memleak(8)'s text form of a snapshot, the largest stack last.
use std::fmt::Write;

use crate::cli::SortKey;
use crate::collector::{Losses, StackTotal};
use crate::loader::{MAX_COMBINED, MAX_STACKS};

/// A stack ready to print: its totals and frames.
pub struct StackReport<'a> {
    pub total: &'a StackTotal,
    pub frames: Vec<String>,
    /// In a classified report (src/scan/), the class of these blocks.
    pub class: Option<crate::scan::Class>,
}

/// The stacks a report shows: the `top` largest by `sort`, in ascending order.
pub fn select(mut stacks: Vec<StackTotal>, sort: SortKey, top: usize) -> Vec<StackTotal> {
    let key = |s: &StackTotal| match sort {
        SortKey::Size => (s.bytes, s.count, s.stack_id),
        SortKey::Count => (s.count, s.bytes, s.stack_id),
    };
    stacks.sort_by_key(key);
    let skip = stacks.len().saturating_sub(top);
    stacks.drain(..skip);
    stacks
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
    /// Blocks left out for being younger than -o: (count, bytes, -o in ms).
    pub young: (u64, u64, u64),
}

/// Formats one snapshot.
pub fn format(time: &str, opts: &Options, stacks: &[StackReport], losses: &Losses) -> String {
    format_with(time, opts, stacks, losses, &[])
}

/// Formats one snapshot with more WARNING lines (a scan's) after the losses'.
pub fn format_with(time: &str, opts: &Options, stacks: &[StackReport], losses: &Losses, more: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "[{time}] Top {} stacks with outstanding allocations:", opts.top);
    for line in loss_lines(losses, opts.max_allocs).iter().chain(more) {
        let _ = writeln!(out, "\tWARNING: {line}");
    }
    // Not a loss, but blocks the report does not show: said, so that none seems missed.
    let (n, bytes, ms) = opts.young;
    if n > 0 {
        let _ = writeln!(out, "\tNOTE: {n} allocations ({bytes} bytes) younger than {ms} ms not shown (-o)");
    }
    for s in stacks {
        if opts.show_allocs {
            let mut blocks = s.total.blocks.clone();
            blocks.sort();
            for (addr, size) in blocks {
                let _ = writeln!(out, "\taddr = {addr:x} size = {size}");
            }
        }
        let class = s.class.map(|c| format!(" ({})", c.words())).unwrap_or_default();
        let _ = writeln!(out, "\t{} bytes in {} allocations from stack{class}", s.total.bytes, s.total.count);
        if s.frames.is_empty() {
            let what = if s.total.stack_id == 0 { "[stack not stored: the stack map was full]" } else { "[no frames]" };
            let _ = writeln!(out, "\t\t{what}");
        }
        for f in &s.frames {
            let _ = writeln!(out, "\t\t{f}");
        }
    }
    out
}

/// Local wall-clock time as HH:MM:SS.
pub fn now_hms() -> String {
    // SAFETY: time and localtime_r write only into the locals passed.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(id: u64, bytes: u64, count: u64) -> StackTotal {
        StackTotal { stack_id: id, bytes, count, blocks: vec![] }
    }

    #[test]
    fn top_stacks_largest_last() {
        let all = vec![st(1, 100, 1), st(2, 50, 10), st(3, 300, 2), st(4, 10, 1)];
        let by_size: Vec<u64> = select(all.clone(), SortKey::Size, 3).iter().map(|s| s.stack_id).collect();
        assert_eq!(by_size, [2, 1, 3]);
        let by_count: Vec<u64> = select(all.clone(), SortKey::Count, 2).iter().map(|s| s.stack_id).collect();
        assert_eq!(by_count, [3, 2]);
        assert_eq!(select(all, SortKey::Size, 10).len(), 4);
    }

    #[test]
    fn formats_like_memleak8() {
        let t = StackTotal { stack_id: 9, bytes: 80, count: 5, blocks: vec![(0x20, 16), (0x10, 16)] };
        let frames = vec![
            "main+0x6d [/home/vagrant/allocs] (400862)".to_string(),
            "__libc_start_main+0xf0 [/usr/lib64/libc-2.21.so] (7fd460ac2790)".to_string(),
        ];
        let stacks = [StackReport { total: &t, frames, class: None }];
        let opts = Options { top: 10, show_allocs: false, max_allocs: 1 << 20, young: (0, 0, 0) };
        let text = format("12:34:56", &opts, &stacks, &Losses::default());
        assert_eq!(
            text,
            "[12:34:56] Top 10 stacks with outstanding allocations:\n\
             \t80 bytes in 5 allocations from stack\n\
             \t\tmain+0x6d [/home/vagrant/allocs] (400862)\n\
             \t\t__libc_start_main+0xf0 [/usr/lib64/libc-2.21.so] (7fd460ac2790)\n"
        );
        let with_allocs = format("12:34:56", &Options { show_allocs: true, ..opts }, &stacks, &Losses::default());
        assert!(with_allocs.contains("\taddr = 10 size = 16\n\taddr = 20 size = 16\n\t80 bytes"), "{with_allocs}");
    }

    #[test]
    fn addresses_precede_their_own_stack() {
        let a = StackTotal { stack_id: 1, bytes: 16, count: 1, blocks: vec![(0xa0, 16)] };
        let b = StackTotal { stack_id: 2, bytes: 64, count: 2, blocks: vec![(0xc0, 32), (0xb0, 32)] };
        let stacks = [
            StackReport { total: &a, frames: vec!["f+0x1 [/x] (1)".into()], class: None },
            StackReport { total: &b, frames: vec![], class: Some(crate::scan::Class::PossiblyLost) },
        ];
        let opts = Options { top: 3, show_allocs: true, max_allocs: 1 << 20, young: (0, 0, 0) };
        let text = format("01:02:03", &opts, &stacks, &Losses::default());
        assert_eq!(
            text,
            "[01:02:03] Top 3 stacks with outstanding allocations:\n\
             \taddr = a0 size = 16\n\
             \t16 bytes in 1 allocations from stack\n\
             \t\tf+0x1 [/x] (1)\n\
             \taddr = b0 size = 32\n\
             \taddr = c0 size = 32\n\
             \t64 bytes in 2 allocations from stack (possibly lost)\n\
             \t\t[no frames]\n"
        );
    }

    #[test]
    fn losses_are_never_silent() {
        let l = Losses { allocs_map_full: 3, stacks_map_full: 2, trace_events_lost: 1, ..Default::default() };
        let opts = Options { top: 10, show_allocs: false, max_allocs: 1000, young: (0, 0, 0) };
        let text = format("00:00:00", &opts, &[], &l);
        assert!(text.contains("WARNING: 3 allocations untracked: the allocation map is full (1000 entries"), "{text}");
        assert!(text.contains("WARNING: 2 allocations without a stack"), "{text}");
        assert!(text.contains("WARNING: 1 -t lines lost"), "{text}");
        assert_eq!(loss_lines(&Losses::default(), 1).len(), 0);
        let k = Losses { frees_missed: 4, allocs_missed: 1, frees_failed: 2, ..Default::default() };
        let text = format("00:00:00", &opts, &[], &k);
        assert!(text.contains("\tWARNING: 4 frees and 1 allocations missed: BPF recursion protection"), "{text}");
        assert!(text.contains("\tWARNING: 2 frees untracked"), "{text}");
        let text = format("00:00:00", &opts, &[], &Losses { calls_missed: 5, ..Default::default() });
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
        let r = Losses { returns_missed: 2, mappings_map_full: 3, range_overflows: 1, ..Default::default() };
        let text = format("00:00:00", &opts, &[], &r);
        assert!(text.contains("\tWARNING: 2 allocation calls untracked: another allocation call began"), "{text}");
        assert!(
            text.contains("\tWARNING: 3 mappings or pieces of mappings untracked: the mapping map is full"),
            "{text}"
        );
        assert!(text.contains("\tWARNING: 1 munmap or mprotect calls overlapped more than 64 mappings"), "{text}");
        let young = Options { young: (100, 10_000_000, 500), ..opts };
        let text = format("00:00:00", &young, &[], &Losses::default());
        assert_eq!(
            text,
            "[00:00:00] Top 10 stacks with outstanding allocations:\n\
             \tNOTE: 100 allocations (10000000 bytes) younger than 500 ms not shown (-o)\n"
        );
        let lost = StackTotal { stack_id: 0, bytes: 8, count: 1, blocks: vec![] };
        let text = format("00:00:00", &opts, &[StackReport { total: &lost, frames: vec![], class: None }], &l);
        assert!(text.contains("\t8 bytes in 1 allocations from stack\n\t\t[stack not stored"), "{text}");
    }
}
