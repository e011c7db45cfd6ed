//! Report: memleak(8)'s text form of a snapshot, the largest stack last.
use std::fmt::Write;

use crate::cli::SortKey;
use crate::collector::{Losses, StackTotal};
use crate::loader::{MAX_ALLOCS, MAX_COMBINED, MAX_STACKS};

/// A stack ready to print: its totals and frames.
pub struct StackReport<'a> {
    pub total: &'a StackTotal,
    pub frames: Vec<String>,
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
pub fn loss_lines(l: &Losses) -> Vec<String> {
    let mut out = Vec::new();
    if l.allocs_map_full > 0 {
        out.push(format!(
            "{} allocations untracked: the allocation map is full ({MAX_ALLOCS} entries)",
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
    if l.truncated_stacks > 0 {
        out.push(format!("{} stacks truncated at {} frames", l.truncated_stacks, crate::MAX_STACK_DEPTH));
    }
    if l.trace_events_lost > 0 {
        out.push(format!("{} -t lines lost: the trace ring buffer was full", l.trace_events_lost));
    }
    out
}

/// Formats one snapshot.
pub fn format(time: &str, top: usize, stacks: &[StackReport], losses: &Losses, show_allocs: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "[{time}] Top {top} stacks with outstanding allocations:");
    for line in loss_lines(losses) {
        let _ = writeln!(out, "\tWARNING: {line}");
    }
    for s in stacks {
        if show_allocs {
            let mut blocks = s.total.blocks.clone();
            blocks.sort();
            for (addr, size) in blocks {
                let _ = writeln!(out, "\taddr = {addr:x} size = {size}");
            }
        }
        let _ = writeln!(out, "\t{} bytes in {} allocations from stack", s.total.bytes, s.total.count);
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
        let stacks = [StackReport { total: &t, frames }];
        let text = format("12:34:56", 10, &stacks, &Losses::default(), false);
        assert_eq!(
            text,
            "[12:34:56] Top 10 stacks with outstanding allocations:\n\
             \t80 bytes in 5 allocations from stack\n\
             \t\tmain+0x6d [/home/vagrant/allocs] (400862)\n\
             \t\t__libc_start_main+0xf0 [/usr/lib64/libc-2.21.so] (7fd460ac2790)\n"
        );
        let with_allocs = format("12:34:56", 10, &stacks, &Losses::default(), true);
        assert!(with_allocs.contains("\taddr = 10 size = 16\n\taddr = 20 size = 16\n\t80 bytes"), "{with_allocs}");
    }

    #[test]
    fn addresses_precede_their_own_stack() {
        let a = StackTotal { stack_id: 1, bytes: 16, count: 1, blocks: vec![(0xa0, 16)] };
        let b = StackTotal { stack_id: 2, bytes: 64, count: 2, blocks: vec![(0xc0, 32), (0xb0, 32)] };
        let stacks = [
            StackReport { total: &a, frames: vec!["f+0x1 [/x] (1)".into()] },
            StackReport { total: &b, frames: vec![] },
        ];
        let text = format("01:02:03", 3, &stacks, &Losses::default(), true);
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
    fn losses_are_never_silent() {
        let l = Losses { allocs_map_full: 3, stacks_map_full: 2, trace_events_lost: 1, ..Default::default() };
        let text = format("00:00:00", 10, &[], &l, false);
        assert!(text.contains("WARNING: 3 allocations untracked: the allocation map is full"), "{text}");
        assert!(text.contains("WARNING: 2 allocations without a stack"), "{text}");
        assert!(text.contains("WARNING: 1 -t lines lost"), "{text}");
        assert_eq!(loss_lines(&Losses::default()).len(), 0);
        let lost = StackTotal { stack_id: 0, bytes: 8, count: 1, blocks: vec![] };
        let text = format("00:00:00", 10, &[StackReport { total: &lost, frames: vec![] }], &l, false);
        assert!(text.contains("\t8 bytes in 1 allocations from stack\n\t\t[stack not stored"), "{text}");
    }
}
