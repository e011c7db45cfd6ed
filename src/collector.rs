//! Collector: reads the BPF maps and aggregates the outstanding allocations by stack.
use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use anyhow::{Context, Result};

use libbpf_rs::MapCore;

use crate::batch;
use crate::records::RecordTable;
use crate::skel::types::{alloc_key, combined_info, counter, map_info, stack};
use crate::symbolizer::RawFrame;

/// One stack's outstanding allocations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StackTotal {
    /// 0: the stack could not be stored (stack map full).
    pub stack_id: u64,
    pub bytes: u64,
    pub count: u64,
    /// (address, size) of each block, when -a asks for them.
    pub blocks: Vec<(u64, u64)>,
}

/// What went untracked since the start, from the BPF counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Losses {
    pub allocs_map_full: u64,
    pub stacks_map_full: u64,
    pub no_thread_state: u64,
    pub trace_events_lost: u64,
    pub combined_map_full: u64,
    pub truncated_stacks: u64,
    /// Kernel mode: records that could not be deleted (map busy): they show as leaks.
    pub frees_failed: u64,
    /// Program runs the kernel skipped (BPF recursion protection): kernel mode's, by kind;
    /// user mode's program records both, so its skipped runs are calls of either kind.
    pub allocs_missed: u64,
    pub frees_missed: u64,
    pub calls_missed: u64,
    /// Stacks unwound from the tables, and how many of them stopped early, by reason.
    pub unwinds: u64,
    pub unwind_stops: UnwindStops,
    /// User mode: allocation calls whose return was never seen (their blocks untracked).
    pub returns_missed: u64,
    /// User mode: mappings (or pieces) the mapping map had no room for.
    pub mappings_map_full: u64,
    /// User mode: unmaps or mprotects that overlapped more mappings than one call handles.
    pub range_overflows: u64,
}

/// Why table unwinds stopped before the outermost frame (src/bpf/unwind.bpf.h).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnwindStops {
    pub not_mapped: u64,
    pub no_table: u64,
    pub no_cfi: u64,
    pub unsupported: u64,
    pub bad_cfa: u64,
    pub unreadable: u64,
    pub vma_busy: u64,
}

impl UnwindStops {
    pub fn total(&self) -> u64 {
        self.not_mapped
            + self.no_table
            + self.no_cfi
            + self.unsupported
            + self.bad_cfa
            + self.unreadable
            + self.vma_busy
    }
}

/// What was allocated from a stack since tracing began (BPF counts it in `struct stack`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocated {
    pub count: u64,
    pub bytes: u64,
}

pub struct Collector {
    /// Frames of every stack seen, by id; a stack never changes once stored.
    /// The process each stack is of (0: kernel mode's, shared) and its frames.
    stacks: HashMap<u64, (u32, Vec<RawFrame>)>,
    /// Allocations from each stack since tracing began, as last read.
    allocated: HashMap<u64, Allocated>,
    /// The same, as the in-process capture counts them (src/preload/): a stack may be both
    /// the library's (malloc) and the BPF side's (mmap).
    allocated_extra: HashMap<u64, Allocated>,
}

impl Collector {
    pub fn new() -> Self {
        Collector { stacks: HashMap::new(), allocated: HashMap::new(), allocated_extra: HashMap::new() }
    }

    /// Every stack that allocated since tracing began, with what it allocated.
    pub fn allocated_stacks(&self) -> impl Iterator<Item = (u64, Allocated)> + '_ {
        let ids: std::collections::HashSet<u64> =
            self.allocated.keys().chain(self.allocated_extra.keys()).copied().collect();
        ids.into_iter().map(|id| (id, self.allocated(id))).filter(|(_, a)| a.count > 0)
    }

    /// What was allocated from a stack since tracing began, as of the last
    /// [`Collector::refresh_stacks`].
    pub fn allocated(&self, stack_id: u64) -> Allocated {
        let a = self.allocated.get(&stack_id).copied().unwrap_or_default();
        let b = self.allocated_extra.get(&stack_id).copied().unwrap_or_default();
        Allocated { count: a.count.saturating_add(b.count), bytes: a.bytes.saturating_add(b.bytes) }
    }

    /// A stack read elsewhere (the in-process capture): its frames the first time (None after),
    /// and what was allocated from it since tracing began. True if its id is new.
    pub fn add_stack(&mut self, id: u64, pid: u32, frames: Option<Vec<RawFrame>>, count: u64, bytes: u64) -> bool {
        self.allocated_extra.insert(id, Allocated { count, bytes });
        match (self.stacks.entry(id), frames) {
            (std::collections::hash_map::Entry::Vacant(e), Some(f)) => {
                e.insert((pid, f));
                true
            }
            _ => false,
        }
    }

    /// The frames of a stack read by [`Collector::refresh_stacks`].
    pub fn frames(&self, stack_id: u64) -> Option<&[RawFrame]> {
        self.stacks.get(&stack_id).map(|(_, f)| f.as_slice())
    }

    /// The process a stack read by [`Collector::refresh_stacks`] is of (0 in kernel mode).
    pub fn pid_of(&self, stack_id: u64) -> Option<u32> {
        self.stacks.get(&stack_id).map(|&(pid, _)| pid)
    }

    /// Forgets the stacks of processes gone (their stacks are deleted from the map too).
    pub fn forget(&mut self, ids: &[u64]) {
        for id in ids {
            self.stacks.remove(id);
            self.allocated.remove(id);
            self.allocated_extra.remove(id);
        }
    }

    /// The ids of the stacks of process `pid`.
    pub fn stacks_of(&self, pid: u32) -> Vec<u64> {
        self.stacks.iter().filter(|(_, (p, _))| *p == pid).map(|(&id, _)| id).collect()
    }

    /// Reads the stacks stored since the last call, and every stack's allocation counts;
    /// returns the ids that are new.
    pub fn refresh_stacks(&mut self, stacks_map: &impl MapCore) -> Result<Vec<u64>> {
        let mut new = Vec::new();
        let (stacks, allocated) = (&mut self.stacks, &mut self.allocated);
        batch::for_each(stacks_map, |k, v| {
            let id: u64 = read_pod(k);
            let st: stack = read_pod(v);
            allocated.insert(id, Allocated { count: st.alloc_count, bytes: st.alloc_bytes });
            if let std::collections::hash_map::Entry::Vacant(e) = stacks.entry(id) {
                let depth = (st.depth as usize).min(st.ips.len());
                e.insert((
                    st.pid,
                    st.ips[..depth].iter().zip(&st.locs).map(|(&ip, &loc)| RawFrame { ip, loc }).collect(),
                ));
                new.push(id);
            }
        })
        .context("reading the stack map")?;
        Ok(new)
    }

    /// Outstanding allocations by process, then by stack, of the processes in `pids` (every
    /// process: None), from the BPF maps and `more` (the in-process capture's regions). Records are keyed by {pid, addr} in BPF, so one read serves them all;
    /// kernel mode's are pid 0's. `min_age`: blocks younger are left out, and counted (not in
    /// combined mode, which keeps no per-allocation times). --combined-only keeps totals by
    /// stack only, without the process: they all go to the first pid asked for (or 0).
    /// `sample_bytes` (--sample-bytes, 0: off): each block counts as the inverse of its chance
    /// to have been sampled, an estimate of what it stands for.
    #[allow(clippy::too_many_arguments)]
    pub fn collect_by_pid(
        &self,
        maps: &RecordMaps<impl MapCore>,
        pids: Option<&[u32]>,
        min_age: Duration,
        blocks: bool,
        combined: bool,
        sample_bytes: u64,
        more: Option<&dyn MoreRecords>,
    ) -> Result<(HashMap<u32, ProcessRecords>, Losses)> {
        let mut losses = read_losses(maps.counters);
        if let Some(m) = more {
            m.add_losses(&mut losses);
        }
        if combined {
            let pid = pids.and_then(|p| p.first()).copied().unwrap_or(0);
            let stacks = Self::read_combined(maps.combined)?;
            let mut out = HashMap::from([(pid, ProcessRecords { stacks, young: (0, 0) })]);
            if let Some(m) = more {
                for &p in pids.unwrap_or_default() {
                    let r = out.entry(p).or_default();
                    for (stack_id, bytes, count) in m.combined(p) {
                        r.stacks.push(StackTotal { stack_id, bytes, count, blocks: Vec::new() });
                    }
                }
            }
            return Ok((out, losses));
        }
        let mut by = ByStack {
            pids,
            now: monotonic_ns(),
            // An age past u64 nanoseconds (585 years) hides every block, as it should.
            min_age: u64::try_from(min_age.as_nanos()).unwrap_or(u64::MAX),
            blocks,
            sample_bytes,
            ..Default::default()
        };
        maps.allocs.for_each(|r| by.add(r.pid, r.addr, r.size, r.timestamp_ns, r.stack_id));
        if let Some(mappings) = maps.mappings {
            batch::for_each(mappings, |k, v| {
                let (key, info): (alloc_key, map_info) = (read_pod(k), read_pod(v));
                // PROT_NONE pages are address space, not memory.
                if info.reserved == 0 {
                    by.add(key.pid, key.addr, info.size, info.timestamp_ns, info.stack_id);
                }
            })
            .context("reading the mapping map")?;
        }
        if let Some(m) = more {
            let all;
            let list = match pids {
                Some(p) => p,
                None => {
                    all = m.pids();
                    &all
                }
            };
            for &pid in list {
                m.for_each_block(pid, &mut |addr, size, ts, stack| by.add(pid, addr, size, ts, stack));
            }
        }
        let mut out: HashMap<u32, ProcessRecords> = HashMap::new();
        for (key, (bytes, n)) in std::mem::take(&mut by.estimates) {
            if let Some(t) = by.totals.get_mut(&key) {
                (t.bytes, t.count) = (bytes.round() as u64, n.round() as u64);
            }
        }
        for ((pid, _), t) in by.totals {
            out.entry(pid).or_default().stacks.push(t);
        }
        for (pid, young) in by.young {
            out.entry(pid).or_default().young = young;
        }
        // Every process asked for is there, with no stacks if it holds nothing.
        for p in pids.unwrap_or_default() {
            out.entry(*p).or_default();
        }
        Ok((out, losses))
    }

    /// What went untracked since the start, from an object's counters.
    pub fn losses(counters: &[u64]) -> Losses {
        read_losses(counters)
    }

    fn read_combined(combined: &impl MapCore) -> Result<Vec<StackTotal>> {
        let mut out = Vec::new();
        batch::for_each(combined, |k, v| {
            let c: combined_info = read_pod(v);
            if c.count > 0 {
                out.push(StackTotal { stack_id: read_pod(k), bytes: c.total_size, count: c.count, blocks: Vec::new() });
            }
        })
        .context("reading the combined map")?;
        Ok(out)
    }
}

/// Records kept outside the BPF maps (the in-process capture's regions, src/preload/), read
/// with them.
pub trait MoreRecords {
    /// The processes with records there.
    fn pids(&self) -> Vec<u32>;
    /// Each outstanding block of process `pid`: f(addr, size, timestamp_ns, stack_id).
    fn for_each_block(&self, pid: u32, f: &mut dyn FnMut(u64, u64, u64, u64));
    /// --combined-only: process `pid`'s totals by stack: (stack id, bytes, blocks).
    fn combined(&self, pid: u32) -> Vec<(u64, u64, u64)>;
    /// Adds what went untracked there to `l`.
    fn add_losses(&self, l: &mut Losses);
}

/// What a read of the record maps found for one process.
#[derive(Debug, Default)]
pub struct ProcessRecords {
    pub stacks: Vec<StackTotal>,
    /// Blocks left out for being younger than -o: (count, bytes).
    pub young: (u64, u64),
}

/// Outstanding blocks summed by process and stack as the maps are read.
#[derive(Default)]
struct ByStack<'p> {
    pids: Option<&'p [u32]>,
    now: u64,
    min_age: u64,
    blocks: bool,
    sample_bytes: u64,
    totals: HashMap<(u32, u64), StackTotal>,
    /// With --sample-bytes: the estimated (bytes, count) of each total.
    estimates: HashMap<(u32, u64), (f64, f64)>,
    young: HashMap<u32, (u64, u64)>,
}

impl ByStack<'_> {
    fn add(&mut self, pid: u32, addr: u64, size: u64, timestamp_ns: u64, stack_id: u64) {
        if self.pids.is_some_and(|p| !p.contains(&pid)) {
            return;
        }
        if self.now.saturating_sub(timestamp_ns) < self.min_age {
            let y = self.young.entry(pid).or_default();
            y.0 += 1;
            y.1 = y.1.saturating_add(size);
            return;
        }
        let t = self.totals.entry((pid, stack_id)).or_insert_with(|| StackTotal { stack_id, ..Default::default() });
        t.bytes = t.bytes.saturating_add(size);
        t.count += 1;
        if self.blocks {
            t.blocks.push((addr, size));
        }
        if self.sample_bytes > 0 {
            let w = sample_weight(size, self.sample_bytes);
            let e = self.estimates.entry((pid, stack_id)).or_default();
            e.0 += size as f64 * w;
            e.1 += w;
        }
    }
}

/// What a block sampled by --sample-bytes N stands for: the inverse of its chance to be
/// sampled, 1 - exp(-size / N) (records.bpf.h).
pub fn sample_weight(size: u64, n: u64) -> f64 {
    let p = -(-(size as f64) / n as f64).exp_m1();
    if p > 0.0 { 1.0 / p } else { 1.0 }
}

/// What an attached program records: its skipped runs count as missed allocations, frees, or
/// calls of either kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Alloc,
    Free,
    Both,
}

/// The attached programs, for the runs the kernel skipped (`recursion_misses`).
pub struct Programs<'a> {
    pub progs: Vec<(BorrowedFd<'a>, Role)>,
}

impl Programs<'_> {
    /// Adds the skipped runs to `l`.
    pub fn add_losses(&self, l: &mut Losses) {
        for (fd, role) in &self.progs {
            let n = recursion_misses(*fd);
            match role {
                Role::Alloc => l.allocs_missed += n,
                Role::Free => l.frees_missed += n,
                Role::Both => l.calls_missed += n,
            }
        }
    }
}

fn recursion_misses(fd: BorrowedFd) -> u64 {
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = std::mem::size_of_val(&info) as u32;
    // SAFETY: info is a bpf_prog_info of `len` bytes with no buffers requested.
    let r = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    if r == 0 { info.recursion_misses } else { 0 }
}

/// The maps of either BPF object (user mode's or kernel mode's) that a snapshot reads.
pub struct RecordMaps<'a, M: MapCore> {
    /// The allocation table, mapped.
    pub allocs: &'a RecordTable,
    /// The BPF side's count of records in it (`live_records` in the mmapped .bss).
    pub live: &'a u64,
    /// User mode's mapping records (mmap, mremap, mprotect); kernel mode has none.
    pub mappings: Option<&'a M>,
    pub combined: &'a M,
    /// The object's `counters` array (enum counter) in its mmapped .bss.
    pub counters: &'a [u64],
}

fn read_losses(counters: &[u64]) -> Losses {
    // SAFETY: the counters live in the mmapped .bss; the kernel updates them atomically and an
    // aligned u64 read is never torn. Out-of-range slots read as 0.
    let get = |c: counter| counters.get(c.0 as usize).map_or(0, |v| unsafe { std::ptr::read_volatile(v) });
    Losses {
        allocs_map_full: get(counter::CNT_ALLOCS_FULL),
        stacks_map_full: get(counter::CNT_STACKS_FULL),
        no_thread_state: get(counter::CNT_STATE_FAILED),
        trace_events_lost: get(counter::CNT_EVENTS_LOST),
        combined_map_full: get(counter::CNT_COMBINED_FULL),
        truncated_stacks: get(counter::CNT_TRUNCATED),
        unwinds: get(counter::CNT_UNWINDS),
        unwind_stops: UnwindStops {
            not_mapped: get(counter::CNT_STOP_NOT_MAPPED),
            no_table: get(counter::CNT_STOP_NO_TABLE),
            no_cfi: get(counter::CNT_STOP_NO_CFI),
            unsupported: get(counter::CNT_STOP_UNSUPPORTED),
            bad_cfa: get(counter::CNT_STOP_BAD_CFA),
            unreadable: get(counter::CNT_STOP_READ),
            vma_busy: get(counter::CNT_STOP_VMA_BUSY),
        },
        frees_failed: get(counter::CNT_FREE_FAILED),
        returns_missed: get(counter::CNT_RETURN_MISSED),
        mappings_map_full: get(counter::CNT_MAPPINGS_FULL),
        range_overflows: get(counter::CNT_RANGE_OVERFLOW),
        ..Default::default()
    }
}

/// Reads a BPF map key or value as the plain C struct it is.
pub fn read_pod<T: Copy + Default>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= std::mem::size_of::<T>(), "map element smaller than its type");
    // SAFETY: T is a plain C struct (generated from the shared header) valid for any bytes,
    // and the length was checked.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns().
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use libbpf_rs::{MapHandle, MapType};

    fn hash<K, V>(entries: u32) -> MapHandle {
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            ..Default::default()
        };
        let (k, v) = (std::mem::size_of::<K>() as u32, std::mem::size_of::<V>() as u32);
        MapHandle::create(MapType::Hash, Some("test"), k, v, entries, &opts).expect("a BPF hash map (root)")
    }

    /// Records of three processes in one map: grouped by pid for the pids asked for, every
    /// process asked for present; the single-pid call as before.
    #[test]
    fn records_grouped_by_process() {
        let (_map, allocs) = crate::records::tests::table(64);
        let combined = hash::<u64, combined_info>(4);
        let old = monotonic_ns().saturating_sub(10_000_000_000);
        for (pid, addr, size, stack_id) in
            [(1, 0x10, 8, 7), (1, 0x20, 8, 7), (1, 0x30, 100, 9), (2, 0x10, 32, 7), (3, 0x40, 1, 7)]
        {
            assert!(allocs.insert(&crate::records::Record { pid, addr, size, timestamp_ns: old, stack_id }));
        }
        let counters = [0u64; 16];
        let live = 5u64;
        let maps =
            RecordMaps { allocs: &allocs, live: &live, mappings: None, combined: &combined, counters: &counters };
        let c = Collector::new();
        let (by_pid, _) = c.collect_by_pid(&maps, Some(&[1, 2, 5]), Duration::ZERO, false, false, 0, None).unwrap();
        let sorted = |p: u32| {
            let mut v: Vec<(u64, u64, u64)> =
                by_pid[&p].stacks.iter().map(|t| (t.stack_id, t.bytes, t.count)).collect();
            v.sort();
            v
        };
        assert_eq!(sorted(1), [(7, 16, 2), (9, 100, 1)]);
        assert_eq!(sorted(2), [(7, 32, 1)]);
        assert!(by_pid[&5].stacks.is_empty() && !by_pid.contains_key(&3));
        let (all, _) = c.collect_by_pid(&maps, None, Duration::ZERO, false, false, 0, None).unwrap();
        assert_eq!(all.len(), 3);
        let (mut one, _) = c.collect_by_pid(&maps, Some(&[2]), Duration::ZERO, true, false, 0, None).unwrap();
        assert_eq!(
            one.remove(&2).unwrap().stacks,
            [StackTotal { stack_id: 7, bytes: 32, count: 1, blocks: vec![(0x10, 32)] }]
        );
        // Younger than -o: hidden, and counted.
        let (young, _) = c.collect_by_pid(&maps, Some(&[1]), Duration::from_secs(60), false, false, 0, None).unwrap();
        assert!(young[&1].stacks.is_empty());
        assert_eq!(young[&1].young, (3, 116));
    }
}
