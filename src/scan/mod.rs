//! Reachability: is an outstanding block a leak, or can the program still reach it? valgrind's
//! classification (definitely, indirectly, possibly lost, still reachable) for an unmodified
//! process, running or at its exit, from memleak's list of live blocks and a scan of the
//! process's memory for pointers to them (docs/reachability.md).
//!
//! - `ptrace`: stop every thread, read its registers, let it go exactly as it was;
//! - `memory`: the mappings, and reading them in large batches (process_vm_readv);
//! - `glibc`: memory the allocator owns outside the blocks (not a root);
//! - `index`: which block an address points into;
//! - `mark`: valgrind's marking and cliques;
//! - `report`, `suppress`, `options`: classified reports, LeakSanitizer suppressions, the flags.
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;

mod contents;
mod glibc;
mod index;
mod mark;
mod memory;
pub mod options;
mod ptrace;
pub mod report;
pub mod suppress;

use index::Index;
use mark::{Lookups, Marker};
use memory::{PAGE, Reader, Region};

/// valgrind's leak kinds, in the order its summary gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    DefinitelyLost,
    IndirectlyLost,
    PossiblyLost,
    StillReachable,
}

impl Class {
    pub const ALL: [Class; 4] =
        [Class::DefinitelyLost, Class::IndirectlyLost, Class::PossiblyLost, Class::StillReachable];

    /// valgrind's words, as reports print them.
    pub fn words(self) -> &'static str {
        match self {
            Class::DefinitelyLost => "definitely lost",
            Class::IndirectlyLost => "indirectly lost",
            Class::PossiblyLost => "possibly lost",
            Class::StillReachable => "still reachable",
        }
    }

    /// valgrind's name of the kind (--errors-for-leak-kinds); also what structured outputs carry.
    pub fn kind(self) -> &'static str {
        match self {
            Class::DefinitelyLost => "definite",
            Class::IndirectlyLost => "indirect",
            Class::PossiblyLost => "possible",
            Class::StillReachable => "reachable",
        }
    }
}

/// valgrind's heuristics: interior pointers taken as pointers to the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Heuristic {
    StdString,
    Length64,
    NewArray,
    MultipleInheritance,
    /// memleak's own: a thread's stack (a mapped block right above a guard page), which glibc's
    /// lists point into.
    ThreadStack,
}

impl Heuristic {
    pub fn name(self) -> &'static str {
        match self {
            Heuristic::StdString => "stdstring",
            Heuristic::Length64 => "length64",
            Heuristic::NewArray => "newarray",
            Heuristic::MultipleInheritance => "multipleinheritance",
            Heuristic::ThreadStack => "threadstack",
        }
    }
}

/// An outstanding block, as the allocation map records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub addr: u64,
    pub size: u64,
    pub stack_id: u64,
    pub timestamp_ns: u64,
}

/// What is known of the process being scanned.
pub struct Target {
    pub pid: i32,
    /// The threads memleak traces anyway (a followed process's), interrupted rather than
    /// seized.
    pub traced: Vec<i32>,
    /// Every live block is known (traced from the first instruction, nothing sampled out or
    /// lost): memory the allocator owns outside them holds no live data and is not a root.
    pub complete: bool,
    /// The allocator is glibc's malloc.
    pub glibc: bool,
    /// Inodes of shared memory that is memleak's, not the program's (the in-process capture's
    /// regions hold every block's address): not a root.
    pub not_roots: Vec<u64>,
}

/// How a scan went: what it read, what it could not, how long the process was stopped.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// How long the process was stopped (for the exit scan: how long its exit was held).
    pub pause: Duration,
    /// Classifying after the process went on.
    pub mark: Duration,
    pub threads: usize,
    /// Threads that did not stop in time: their registers were not scanned.
    pub stragglers: Vec<i32>,
    /// Bytes covered: read, or known to be zero (never-touched pages, not read).
    pub scanned: u64,
    pub untouched: u64,
    pub unreadable: u64,
    pub unreadable_ranges: u64,
    pub unreadable_examples: Vec<(u64, u64)>,
    /// Bytes of blocks without access rights (guard pages), not read.
    pub noaccess: u64,
    /// Device mappings left alone: (count, bytes).
    pub devices: (u64, u64),
    pub at_exit: bool,
    /// Words of roots looked at (memory outside the blocks, and registers).
    pub root_words: u64,
    /// Reading the allocation map, inside the pause.
    pub map: Duration,
    /// Reading the blocks and scanning the roots, inside the pause.
    pub copy: Duration,
}

/// Each block's class.
pub struct Outcome {
    /// Sorted by address.
    pub blocks: Vec<Block>,
    pub class: Vec<Class>,
    pub heuristic: Vec<Option<Heuristic>>,
    pub stats: Stats,
    /// (thread, wait status) of the traced threads' own events met while stopping them (exit,
    /// exec), for their tracer to handle.
    pub foreign: Vec<(i32, i32)>,
}

/// Scans a running process: every thread stopped for the copy, let go before the marking.
pub fn live(t: &Target, read_blocks: impl FnOnce() -> Result<Vec<Block>>) -> Result<Outcome> {
    let stopped = ptrace::stop_all(t.pid, &t.traced)?;
    let threads: Vec<libc::user_regs_struct> = stopped.threads.iter().map(|th| th.regs).collect();
    let stragglers = stopped.stragglers.clone();
    let map_start = Instant::now();
    let blocks = read_blocks();
    let map = map_start.elapsed();
    let copy = match blocks.and_then(|blocks| copy(t, &threads, blocks)) {
        Ok(c) => c,
        Err(e) => {
            drop(stopped.resume());
            return Err(e);
        }
    };
    let resumed = stopped.resume();
    let mut out = copy.finish(resumed.stopped);
    out.stats.stragglers = stragglers;
    out.stats.map = map;
    out.foreign = resumed.foreign;
    Ok(out)
}

/// Scans a process whose thread `tid` is in its exit stop (PTRACE_EVENT_EXIT of the whole
/// process): that thread's registers, everything mapped. The other threads are ending
/// already: neither their registers nor their stack pointers are known.
pub fn at_exit(t: &Target, tid: i32, read_blocks: impl FnOnce() -> Result<Vec<Block>>) -> Result<Outcome> {
    let since = Instant::now();
    let regs = ptrace::regs(tid)?;
    let blocks = read_blocks()?;
    let map = since.elapsed();
    let c = copy(t, &[regs], blocks)?;
    let mut out = c.finish(Duration::ZERO);
    // The exit is held until the marking is done too.
    out.stats.pause = since.elapsed();
    out.stats.at_exit = true;
    out.stats.map = map;
    Ok(out)
}

/// True if `tid`, in its exit stop, ends only itself (pthread_exit: the exit system call,
/// not exit_group, nor a fatal signal): the process goes on.
pub fn thread_exit_only(tid: i32) -> bool {
    ptrace::regs(tid).is_ok_and(|r| r.orig_rax == libc::SYS_exit as u64)
}

/// Everything read while the process was stopped, the roots marked, ready to classify.
struct Copy {
    blocks: Vec<Block>,
    marker: Marker,
    look: Memory,
    stats: Stats,
}

/// Block contents and the process's mappings, for the marker.
struct Memory {
    buf: contents::Buffer,
    /// Per block: its words in `buf`.
    words: Vec<(usize, usize)>,
    regions: Vec<Region>,
    reader: Reader,
    vtables: RefCell<HashMap<u64, bool>>,
}

impl Lookups for Memory {
    fn words(&self, i: usize) -> &[u64] {
        let (o, n) = self.words[i];
        &self.buf[o..o + n]
    }

    fn prefetch(&self, i: usize) {
        // The first cache lines: most blocks are small.
        for w in self.words(i).iter().step_by(8).take(4) {
            index::prefetch(w);
        }
    }

    /// valgrind's test: in a readable file mapping, up to 20 words of which the first two
    /// non-null ones point into executable file mappings, with nothing else before them.
    fn is_vtable(&self, addr: u64) -> bool {
        if let Some(&v) = self.vtables.borrow().get(&addr) {
            return v;
        }
        let verdict = (|| {
            let r = memory::find(&self.regions, addr).filter(|r| r.is_file() && r.read)?;
            let last = (addr + 20 * 8).min(r.end.checked_sub(8)?);
            let mut fns = 0;
            let mut a = addr;
            while a <= last {
                let f = self.reader.word(a)?;
                a += 8;
                if f == 0 {
                    continue;
                }
                memory::find(&self.regions, f).filter(|r| r.is_file() && r.exec)?;
                fns += 1;
                if fns == 2 {
                    return Some(());
                }
            }
            None
        })()
        .is_some();
        self.vtables.borrow_mut().insert(addr, verdict);
        verdict
    }
}

/// Registers that can hold pointers (valgrind's: the 16 general-purpose ones).
fn gprs(r: &libc::user_regs_struct) -> [u64; 16] {
    [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15]
}

/// Below a thread's stack pointer, past the red zone the ABI lets leaf functions use, a stack
/// holds only dead frames.
const RED_ZONE: u64 = 128;

/// Memory to scan: (start, end), sorted, disjoint.
type Ranges = Vec<(u64, u64)>;

/// `ranges` minus `holes` (both sorted; holes may overlap each other).
fn subtract(ranges: &[(u64, u64)], holes: &[(u64, u64)]) -> Ranges {
    let mut out = Vec::new();
    let mut h = 0;
    for &(mut s, e) in ranges {
        while h < holes.len() && holes[h].1 <= s {
            h += 1;
        }
        let mut k = h;
        while s < e {
            if k >= holes.len() || holes[k].0 >= e {
                out.push((s, e));
                break;
            }
            let (hs, he) = holes[k];
            if hs > s {
                out.push((s, hs));
            }
            s = s.max(he);
            k += 1;
        }
    }
    out
}

/// Rounds ranges inward to whole 8-byte words; drops empty ones.
fn words_only(ranges: Ranges) -> Ranges {
    ranges
        .into_iter()
        .filter_map(|(s, e)| {
            let (s, e) = (s.next_multiple_of(8), e & !7);
            (s < e).then_some((s, e))
        })
        .collect()
}

/// Splits large ranges of anonymous memory into the pages that hold anything.
fn populated(reader: &mut Reader, regions: &[Region], ranges: Ranges) -> Ranges {
    let mut out = Vec::new();
    for (s, e) in ranges {
        let anon = memory::find(regions, s).is_some_and(|r| r.is_anonymous());
        if anon && e - s >= 16 * PAGE {
            out.extend(reader.populated(s, e));
        } else {
            out.push((s, e));
        }
    }
    out
}

/// While the process is stopped: reads the blocks' contents and scans the roots.
fn copy(t: &Target, threads: &[libc::user_regs_struct], mut blocks: Vec<Block>) -> Result<Copy> {
    let started = Instant::now();
    blocks.sort_unstable_by_key(|b| b.addr);
    blocks.dedup_by_key(|b| b.addr);
    let spans: Vec<(u64, u64)> = blocks.iter().map(|b| (b.addr, b.size)).collect();
    let sizes: Vec<u64> = blocks.iter().map(|b| b.size).collect();
    let index = Index::new(&spans);
    let regions = memory::regions(t.pid)?;
    let mut reader = Reader::new(t.pid);
    let mut stats = Stats { threads: threads.len(), ..Stats::default() };

    let mut contents = contents::copy(&mut reader, &regions, &spans)?;
    stats.noaccess = contents.noaccess;
    stats.unreadable += contents.unmapped.0;
    stats.unreadable_ranges += contents.unmapped.1;

    // Roots: every readable, writable mapping, minus the blocks, minus the allocator's own
    // memory when every block is known, minus the dead part of each thread's stack.
    let mut holes: Ranges = spans.iter().map(|&(a, s)| (a, a.saturating_add(s))).collect();
    if t.complete && t.glibc {
        holes.extend(glibc::owned(&regions, &spans, &reader));
    }
    for r in threads {
        let sp = r.rsp;
        if let Some(i) = regions.iter().position(|g| sp >= g.start && sp < g.end)
            && is_stack(&regions, i)
        {
            holes.push((regions[i].start, sp.saturating_sub(RED_ZONE).max(regions[i].start)));
        }
    }
    // Sorted already but for the few ranges pushed last: the stable sort merges them in.
    holes.sort();
    let mut rw: Ranges = Vec::new();
    for r in &regions {
        if !(r.read && r.write) {
            continue;
        }
        if r.shared && t.not_roots.contains(&r.inode) && r.name.as_deref().is_some_and(|n| n.starts_with("/memfd:")) {
            continue;
        }
        if r.is_device() {
            stats.devices.0 += 1;
            stats.devices.1 += r.end - r.start;
            continue;
        }
        rw.push((r.start, r.end));
    }
    let mut roots = populated(&mut reader, &regions, words_only(subtract(&rw, &holes)));

    // A live thread whose stack is a block (mapped after memleak attached): its live part is a
    // root, and what lies below its stack pointer is not scanned even when the block is reached.
    let stacks = thread_stacks(&regions, &spans);
    for r in threads {
        let Some(i) = index.find(r.rsp).filter(|&i| stacks[i]) else { continue };
        let (start, end) = (spans[i].0, spans[i].0 + spans[i].1);
        let live = r.rsp.saturating_sub(RED_ZONE).max(start).next_multiple_of(8);
        let (o, n) = contents.words[i];
        let skip = (((live - start.next_multiple_of(8)) / 8) as usize).min(n);
        contents.words[i] = (o + skip, n - skip);
        if live < end & !7 {
            roots.push((live, end & !7));
        }
    }

    let mut look =
        Memory { buf: contents.buf, words: contents.words, regions, reader, vtables: RefCell::new(HashMap::new()) };
    let mut marker = Marker::new(index, sizes, t.glibc);
    marker.set_thread_stacks(stacks);
    for r in threads {
        for w in gprs(r) {
            marker.root_word(w, &look);
        }
    }
    scan_roots(&mut look, &roots, &mut marker);
    let r = &look.reader;
    stats.scanned += r.scanned;
    stats.untouched += r.skipped_untouched;
    stats.unreadable += r.unreadable;
    stats.unreadable_ranges += r.unreadable_ranges;
    stats.unreadable_examples = r.unreadable_examples.clone();
    stats.root_words = marker.root_words;
    stats.copy = started.elapsed();
    Ok(Copy { blocks, marker, look, stats })
}

/// Streams the root ranges through a fixed buffer, word by word into the marker.
fn scan_roots(look: &mut Memory, roots: &[(u64, u64)], marker: &mut Marker) {
    const CHUNK: u64 = 8 << 20;
    let mut chunk = vec![0u64; (CHUNK / 8) as usize];
    let mut batch: Ranges = Vec::new();
    let mut filled = 0u64;
    let mut flush = |look: &mut Memory, batch: &mut Ranges, filled: &mut u64, marker: &mut Marker| {
        if batch.is_empty() {
            return;
        }
        // SAFETY: viewing the u64 buffer as bytes, same memory and lifetime.
        let bytes = unsafe { std::slice::from_raw_parts_mut(chunk.as_mut_ptr().cast::<u8>(), chunk.len() * 8) };
        look.reader.read(batch, &mut bytes[..*filled as usize]);
        let words = &chunk[..(*filled / 8) as usize];
        marker.root_words(words, look);
        batch.clear();
        *filled = 0;
    };
    for &(s, e) in roots {
        let mut a = s;
        while a < e {
            let take = (e - a).min(CHUNK - filled);
            batch.push((a, take));
            filled += take;
            a += take;
            if filled == CHUNK || batch.len() == 1024 {
                flush(look, &mut batch, &mut filled, marker);
            }
        }
    }
    flush(look, &mut batch, &mut filled, marker);
}

/// Blocks that are thread stacks: mapped memory right above a page no one can access (a guard
/// page; memleak does not count memory without access as part of a block).
fn thread_stacks(regions: &[Region], spans: &[(u64, u64)]) -> Vec<bool> {
    spans
        .iter()
        .map(|&(a, size)| {
            a % PAGE == 0
                && size >= PAGE
                && a >= PAGE
                && memory::find(regions, a - 1).is_some_and(|r| !r.read && !r.write && !r.exec && r.end == a)
        })
        .collect()
}

/// The region holding a thread's stack pointer is a stack of its own (so that below the
/// pointer is dead): the main thread's `[stack]`, or an anonymous mapping right above a guard
/// page (how glibc, and most runtimes, map a thread's stack). A stack inside something else
/// (a coroutine's stack in a heap block or in .bss) is scanned whole.
fn is_stack(regions: &[Region], i: usize) -> bool {
    let r = &regions[i];
    if r.name.as_deref() == Some("[stack]") {
        return true;
    }
    r.is_anonymous()
        && r.name.is_none()
        && i > 0
        && regions[i - 1].end == r.start
        && !regions[i - 1].read
        && !regions[i - 1].write
}

impl Copy {
    /// Classifies, after the process went on.
    fn finish(self, pause: Duration) -> Outcome {
        let Copy { blocks, marker, look, mut stats } = self;
        let started = Instant::now();
        let (class, heuristic) = marker.finish(&look);
        stats.pause = pause;
        stats.mark = started.elapsed();
        Outcome { blocks, class, heuristic, stats, foreign: Vec::new() }
    }
}
