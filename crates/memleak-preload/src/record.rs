//! The records memleak reads: outstanding blocks in a shared open-addressing table (lock-free:
//! a slot is claimed by compare-and-swap on its key), stacks by hash with their allocation
//! counts, counters; -t events in a ring.
use core::sync::atomic::{AtomicU64, Ordering::*};

use crate::layout::*;
use crate::process::Info;
use crate::thread::Thread;

/// A record as the collector sees it.
#[derive(Clone, Copy)]
pub struct Rec {
    pub size: u64,
    pub timestamp_ns: u64,
    pub stack_id: u64,
}

#[inline]
pub fn count(p: &Info, c: usize) {
    if c < NR_COUNTERS {
        p.header().counters[c].fetch_add(1, Relaxed);
    }
}

#[inline]
fn key(p: &Info, i: u64) -> &AtomicU64 {
    // SAFETY: i is masked to the table's size, checked to lie inside the region.
    unsafe { &*p.alloc_keys.add((i & p.alloc_mask) as usize) }
}

#[inline]
fn block(p: &Info, i: u64) -> &BlockInfo {
    // SAFETY: i is masked to the table's size, checked to lie inside the region.
    unsafe { &*p.alloc_infos.add((i & p.alloc_mask) as usize) }
}

fn write_block(p: &Info, i: u64, key_before: u64, addr: u64, r: &Rec) {
    let b = block(p, i);
    b.size.store(r.size, Relaxed);
    b.timestamp_ns.store(r.timestamp_ns, Relaxed);
    b.stack_id.store(r.stack_id, Relaxed);
    key(p, i).store(addr | next_gen(key_before), Release);
}

fn read_block(p: &Info, i: u64) -> Rec {
    let b = block(p, i);
    Rec { size: b.size.load(Relaxed), timestamp_ns: b.timestamp_ns.load(Relaxed), stack_id: b.stack_id.load(Relaxed) }
}

#[inline]
fn gen_of(k: u64) -> u64 {
    k & !ADDR_MASK
}

#[inline]
fn next_gen(k: u64) -> u64 {
    gen_of(k).wrapping_add(1 << 48)
}

/// The -z/-Z bounds and -s or --sample-bytes sampling, decided before the stack walk.
#[inline]
pub fn sampled_in(p: &Info, t: &Thread, size: u64) -> bool {
    if size < p.settings.min_size || size > p.settings.max_size {
        return false;
    }
    if p.settings.sample_rate > 1 && !crate::thread::random(t).is_multiple_of(u64::from(p.settings.sample_rate)) {
        return false;
    }
    p.settings.sample_bytes == 0 || (crate::thread::random(t) >> 32) < sample_p32(size, p.settings.sample_bytes)
}

/// 2^32 times the probability that --sample-bytes `mean` samples a block of `size` bytes:
/// 1 - exp(-size / mean), records.bpf.h's sample_p32 (which uses a table for exp).
fn sample_p32(size: u64, mean: u64) -> u64 {
    if size >= mean.saturating_mul(32) {
        return 1 << 32;
    }
    let p = 1.0 - (-(size as f64) / mean as f64).exp();
    (p * 4_294_967_296.0) as u64
}

/// Takes one unit of --max-allocs; false (counted) when full.
fn reserve(p: &Info) -> bool {
    let h = p.header();
    if h.alloc_count.fetch_add(1, Relaxed) >= p.settings.max_allocs {
        h.alloc_count.fetch_sub(1, Relaxed);
        count(p, CNT_ALLOCS_FULL);
        return false;
    }
    true
}

fn unreserve(p: &Info) {
    p.header().alloc_count.fetch_sub(1, Relaxed);
}

/// Starts the record of a block (records.bpf.h's record_insert): a block already recorded at
/// that address is replaced.
pub fn insert(p: &Info, addr: u64, r: Rec) {
    if let Ok(old) = place(p, addr, &r) {
        if let Some(old) = old {
            combined_add(p, old.stack_id, old.size, false);
        }
        combined_add(p, r.stack_id, r.size, true);
        if p.settings.flags & FLAG_TRACE_ALL != 0 {
            emit(p, EV_ALLOC, r.size, addr);
        }
    }
}

/// Writes a block's record into the first free slot of its window, or over its own record met
/// before it. Ok(Some(old)) when it replaced one, Ok(None) when new; Err when full (counted).
fn place(p: &Info, addr: u64, r: &Rec) -> Result<Option<Rec>, ()> {
    let home = addr_hash(addr);
    'again: loop {
        for n in 0..WINDOW {
            let i = home.wrapping_add(n);
            let s = key(p, i);
            let k = s.load(Acquire);
            let a = k & ADDR_MASK;
            if a == addr {
                if s.compare_exchange(k, KEY_BUSY | gen_of(k), Acquire, Relaxed).is_err() {
                    continue 'again;
                }
                let old = read_block(p, i);
                write_block(p, i, k, addr, r);
                return Ok(Some(old));
            }
            if a == KEY_EMPTY {
                if !reserve(p) {
                    return Err(());
                }
                if s.compare_exchange(k, KEY_BUSY | gen_of(k), Acquire, Relaxed).is_err() {
                    unreserve(p);
                    continue 'again;
                }
                write_block(p, i, k, addr, r);
                return Ok(None);
            }
        }
        // Every slot of the window holds a block: at the table's size (twice --max-allocs) and
        // a window of 64, about 3 in a million inserts at the full --max-allocs.
        count(p, CNT_ALLOCS_FULL);
        return Err(());
    }
}

/// Removes the record of a block, if it is tracked; returns it. The whole window is searched:
/// a slot emptied before a block's does not hide it.
pub fn take(p: &Info, addr: u64) -> Option<Rec> {
    let home = addr_hash(addr);
    'again: loop {
        for n in 0..WINDOW {
            let i = home.wrapping_add(n);
            let s = key(p, i);
            let k = s.load(Acquire);
            if k & ADDR_MASK != addr {
                continue;
            }
            let r = read_block(p, i);
            if s.compare_exchange(k, KEY_EMPTY | next_gen(k), AcqRel, Relaxed).is_err() {
                continue 'again;
            }
            unreserve(p);
            return Some(r);
        }
        return None;
    }
}

/// Ends the record of a block (records.bpf.h's record_free).
pub fn free(p: &Info, addr: u64) {
    if let Some(r) = take(p, addr) {
        freed(p, addr, &r);
    }
}

/// What ending a record does besides removing it: totals and the -t line.
pub fn freed(p: &Info, addr: u64, r: &Rec) {
    combined_add(p, r.stack_id, r.size, false);
    if p.settings.flags & FLAG_TRACE_ALL != 0 {
        emit(p, EV_FREE, r.size, addr);
    }
}

/// Puts back a record taken by a call that failed (realloc returning NULL keeps the block).
pub fn restore(p: &Info, addr: u64, r: Rec) {
    let _ = place(p, addr, &r);
}

// ---- stacks, totals, events

/// The entry of a stored stack id, if it is one.
fn entry_of(p: &Info, stack_id: u64) -> Option<&StackEntry> {
    let e = slot_entry(p, stack_id)?;
    // SAFETY: e - 1 < max_stacks, checked by slot_entry.
    Some(unsafe { &*p.stacks.add(e as usize - 1) })
}

/// The index entry (index + 1) of a stack id.
fn slot_entry(p: &Info, stack_id: u64) -> Option<u64> {
    let mut i = stack_id;
    for _ in 0..=p.stack_mask {
        // SAFETY: masked into the index.
        let s = unsafe { &*p.stack_index.add((i & p.stack_mask) as usize) };
        let k = s.hash.load(Acquire);
        if k == stack_id {
            let e = s.entry.load(Acquire);
            return (e != 0 && e <= p.max_stacks).then_some(e);
        }
        if k == 0 {
            return None;
        }
        i = i.wrapping_add(1);
    }
    None
}

/// Stores a stack and counts an allocation of `size` bytes from it (records.bpf.h's
/// store_stack); returns its id, 0 when the stack table is full.
pub fn store_stack(p: &Info, ips: &[u64], locs: &[u64], truncated: bool, size: u64) -> u64 {
    if truncated {
        count(p, CNT_TRUNCATED);
    }
    let h = stack_hash(p.header().stack_pid, ips, locs);
    let mut i = h;
    for _ in 0..=p.stack_mask {
        // SAFETY: masked into the index.
        let s = unsafe { &*p.stack_index.add((i & p.stack_mask) as usize) };
        let k = s.hash.load(Acquire);
        if k == h {
            // Stored, or being stored by another thread: its entry comes before the hash is
            // published as complete; wait for it briefly.
            let mut e = s.entry.load(Acquire);
            let mut spins = 0;
            while e == 0 && spins < 1000 {
                core::hint::spin_loop();
                e = s.entry.load(Acquire);
                spins += 1;
            }
            if e == 0 || e > p.max_stacks {
                count(p, CNT_STACKS_FULL);
                return 0;
            }
            // SAFETY: e - 1 < max_stacks.
            let ent = unsafe { &*p.stacks.add(e as usize - 1) };
            ent.alloc_count.fetch_add(1, Relaxed);
            ent.alloc_bytes.fetch_add(size, Relaxed);
            return h;
        }
        if k == 0 {
            if s.hash.compare_exchange(0, h, AcqRel, Acquire).is_err() {
                continue; // taken meanwhile: look at it again
            }
            let idx = p.header().stack_count.fetch_add(1, Relaxed);
            if idx >= p.max_stacks {
                s.entry.store(u64::MAX, Release);
                count(p, CNT_STACKS_FULL);
                return 0;
            }
            // SAFETY: idx < max_stacks; this entry was handed to this thread alone.
            let e = unsafe { &mut *p.stacks.add(idx as usize) };
            let n = ips.len().min(MAX_DEPTH);
            e.depth = n as u32;
            e.truncated = u32::from(truncated);
            e.ips[..n].copy_from_slice(&ips[..n]);
            e.locs[..n].copy_from_slice(&locs[..n]);
            e.alloc_count.store(1, Relaxed);
            e.alloc_bytes.store(size, Relaxed);
            s.entry.store(idx + 1, Release);
            return h;
        }
        i = i.wrapping_add(1);
    }
    count(p, CNT_STACKS_FULL);
    0
}

/// An allocation counted by store_stack failed after all (records.bpf.h's uncount_alloc).
pub fn uncount_alloc(p: &Info, stack_id: u64, size: u64) {
    if stack_id == 0 {
        return;
    }
    if let Some(e) = entry_of(p, stack_id) {
        e.alloc_count.fetch_sub(1, Relaxed);
        e.alloc_bytes.fetch_sub(size, Relaxed);
    }
}

/// The totals of a stack id (--combined-only): its entry's, or the last slot for id 0.
fn combined_slot(p: &Info, stack_id: u64) -> Option<&Combined> {
    if stack_id == 0 {
        // SAFETY: the array has max_stacks + 1 slots.
        return Some(unsafe { &*p.combined.add(p.max_stacks as usize) });
    }
    let e = slot_entry(p, stack_id)?;
    // SAFETY: e - 1 < max_stacks.
    Some(unsafe { &*p.combined.add(e as usize - 1) })
}

fn combined_add(p: &Info, stack_id: u64, size: u64, add: bool) {
    if p.settings.flags & FLAG_COMBINED_ONLY == 0 {
        return;
    }
    match combined_slot(p, stack_id) {
        Some(c) if add => {
            c.bytes.fetch_add(size, Relaxed);
            c.count.fetch_add(1, Relaxed);
        }
        Some(c) => {
            c.bytes.fetch_sub(size, Relaxed);
            c.count.fetch_sub(1, Relaxed);
        }
        None if add => count(p, CNT_COMBINED_FULL),
        None => {}
    }
}

/// A -t line for memleak to print; counted as lost when the ring is full.
fn emit(p: &Info, kind: u32, size: u64, addr: u64) {
    let h = p.header();
    let mut head = h.ev_head.load(Relaxed);
    loop {
        if head.wrapping_sub(h.ev_tail.load(Acquire)) > p.ev_mask {
            count(p, CNT_EVENTS_LOST);
            return;
        }
        match h.ev_head.compare_exchange_weak(head, head + 1, AcqRel, Relaxed) {
            Ok(_) => break,
            Err(now) => head = now,
        }
    }
    // SAFETY: slot head & mask was reserved by this thread.
    let e = unsafe { &mut *p.events.add((head & p.ev_mask) as usize) };
    e.kind = kind;
    e.tid = 0;
    e.size = size;
    e.addr = addr;
    e.seq.store(head + 1, Release);
}
