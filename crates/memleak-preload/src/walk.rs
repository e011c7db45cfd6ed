//! The in-process stack walk: src/bpf/unwind.bpf.h's algorithm step for step over the same
//! tables, which memleak shares read-only, recording where each frame was (object id and file
//! offset) as it does. Reads stay inside this thread's stack; a stack elsewhere (an alternate
//! signal stack, a coroutine's) is read with process_vm_readv, which cannot fault.
use core::sync::atomic::{Ordering::*, fence};

use crate::layout::*;
use crate::process::Info;
use crate::thread::{CACHE, Frames, MapCache};

/// How a walk went: frames, whether it was cut at MAX_DEPTH, and the counter of why it ended
/// early (0: it did not).
pub struct Walked {
    pub depth: usize,
    pub truncated: bool,
    pub stop: usize,
}

struct Reader {
    lo: u64,
    hi: u64,
    /// The stack is not this thread's known stack: every read goes through the kernel.
    safe: bool,
    pid: u32,
}

impl Reader {
    fn read<const N: usize>(&self, addr: u64) -> Option<[u64; N]> {
        let len = 8 * N as u64;
        if !self.safe {
            if addr < self.lo || addr.checked_add(len)? > self.hi || addr & 7 != 0 {
                return None;
            }
            // SAFETY: inside this thread's live stack, above the allocator's entry.
            return Some(unsafe { core::ptr::read_volatile(addr as *const [u64; N]) });
        }
        let mut out = [0u64; N];
        let local = crate::sys::IoVec { base: out.as_mut_ptr().cast(), len: len as usize };
        let remote = crate::sys::IoVec { base: addr as *mut _, len: len as usize };
        // SAFETY: the kernel copies from this process's memory, failing instead of faulting.
        let n = unsafe {
            crate::sys::syscall6(
                crate::sys::SYS_PROCESS_VM_READV,
                self.pid as usize,
                &local as *const _ as usize,
                1,
                &remote as *const _ as usize,
                1,
                0,
            )
        };
        (n == len as isize).then_some(out)
    }
}

/// Where frame `i` (return address `pc`, in mapping `m`) was: object id and file offset
/// (unwind.bpf.h's unwind_locate).
fn locate(out: &mut Frames, i: usize, m: Option<&MapEntry>, pc: u64) {
    if i >= MAX_DEPTH {
        return;
    }
    out.locs[i] = 0;
    let Some(m) = m.filter(|m| m.obj != 0) else { return };
    let off = (pc as i64).wrapping_add(m.file_adj) as u64;
    if off >> 32 == 0 {
        out.locs[i] = u64::from(m.obj) << 32 | off;
    }
}

/// Walks the caller's stack from the allocator's entry (`sp` points at the return address,
/// `bp` is the caller's rbp) into `out`.
pub fn walk(p: &Info, bounds: (u64, u64), cache: &mut MapCache, sp: u64, bp: u64, out: &mut Frames) -> Walked {
    let (lo, hi) = bounds;
    let safe = !(lo <= sp && sp < hi);
    let r = Reader { lo: sp, hi, safe, pid: p.pid };
    let mut w = Walked { depth: 0, truncated: false, stop: 0 };
    // The entry: the return address at [sp] is the caller's frame.
    let Some([ra]) = r.read::<1>(sp) else { return w };
    if ra == 0 {
        return w;
    }
    out.ips[0] = ra;
    w.depth = 1;
    if p.settings.flags & FLAG_FRAME_POINTERS != 0 {
        frame_pointers(&r, sp, bp, out, &mut w);
        return w;
    }
    let (mut pc, mut sp, mut bp) = (ra, sp + 8, bp);
    // The stop reason if pc came from the frame-pointer fallback and points at no code.
    let mut guess = 0;
    loop {
        let lookup = pc.wrapping_sub(1);
        let m = find(p, cache, lookup);
        locate(out, w.depth - 1, m.as_ref(), pc);
        let Some(m) = m else {
            w.stop = CNT_STOP_NOT_MAPPED;
            // A frame-pointer guess that points at no code (rbp held no frame pointer): not a
            // frame; the walk ended in the code before it.
            if guess != 0 {
                w.depth -= 1;
                w.stop = guess;
            }
            return w;
        };
        guess = 0;
        let rule = if m.npages > 0 { rule_at(p, &m, lookup) } else { None };
        let cfa;
        let mut ra = None;
        match rule {
            None => {
                // No CFI: the frame pointer, if this code keeps one; rbp 0 ends the chain.
                if bp == 0 {
                    return w;
                }
                let frame = if bp >= sp && bp & 7 == 0 { r.read::<2>(bp) } else { None };
                let Some(frame) = frame else {
                    w.stop = if m.npages > 0 { CNT_STOP_NO_CFI } else { CNT_STOP_NO_TABLE };
                    return w;
                };
                cfa = bp + 16;
                bp = frame[0];
                guess = if m.npages > 0 { CNT_STOP_NO_CFI } else { CNT_STOP_NO_TABLE };
            }
            Some(rule) => {
                cfa = match rule.cfa {
                    CFA_RSP => sp.wrapping_add(rule.cfa_off as i64 as u64),
                    CFA_RBP => bp.wrapping_add(rule.cfa_off as i64 as u64),
                    CFA_PLT => sp
                        .wrapping_add(rule.cfa_off as i64 as u64)
                        .wrapping_add(if (lookup & 15) >= u64::from(rule.aux) { 8 } else { 0 }),
                    CFA_END => return w,
                    _ => {
                        w.stop = CNT_STOP_UNSUPPORTED;
                        return w;
                    }
                };
                if cfa <= sp || cfa & 7 != 0 {
                    w.stop = CNT_STOP_BAD_CFA;
                    return w;
                }
                if rule.rbp == RBP_AT_CFA && rule.rbp_off == -16 && cfa - 16 >= sp {
                    // The usual frame: rbp saved right below the return address, one read.
                    let Some(f) = r.read::<2>(cfa - 16) else {
                        w.stop = CNT_STOP_READ;
                        return w;
                    };
                    bp = f[0];
                    ra = Some(f[1]);
                } else if rule.rbp == RBP_AT_CFA {
                    let Some([b]) = r.read::<1>(cfa.wrapping_add(rule.rbp_off as i64 as u64)) else {
                        w.stop = CNT_STOP_READ;
                        return w;
                    };
                    bp = b;
                } else if rule.rbp == RBP_UNDEFINED {
                    bp = 0;
                }
            }
        }
        let ra = match ra {
            Some(ra) => ra,
            None => {
                if cfa <= sp || cfa & 7 != 0 {
                    w.stop = CNT_STOP_BAD_CFA;
                    return w;
                }
                let Some([ra]) = r.read::<1>(cfa - 8) else {
                    w.stop = CNT_STOP_READ;
                    return w;
                };
                ra
            }
        };
        if ra == 0 {
            return w;
        }
        if w.depth >= MAX_DEPTH {
            w.truncated = true;
            return w;
        }
        out.ips[w.depth] = ra;
        w.depth += 1;
        pc = ra;
        sp = cfa;
    }
}

/// --frame-pointers: memleak(8)'s walk, as memleak.bpf.c's unwind_frame_pointers (frames are
/// not located: user space normalizes them).
fn frame_pointers(r: &Reader, mut sp: u64, mut fp: u64, out: &mut Frames, w: &mut Walked) {
    out.locs[0] = 0;
    for i in 1..MAX_DEPTH {
        if fp <= sp || fp & 7 != 0 {
            break;
        }
        let Some(frame) = r.read::<2>(fp) else { break };
        if frame[1] == 0 {
            break;
        }
        out.ips[i] = frame[1];
        out.locs[i] = 0;
        w.depth = i + 1;
        sp = fp;
        fp = frame[0];
    }
    w.truncated = w.depth == MAX_DEPTH && fp > sp && fp & 7 == 0;
}

/// The executable mapping holding `pc`: from the cache, the published list, or after asking
/// memleak to publish the mappings again (an object loaded since: dlopen, a library libc loads
/// itself).
fn find(p: &Info, c: &mut MapCache, pc: u64) -> Option<MapEntry> {
    let h = p.header();
    let seq = h.maps_seq.load(Acquire);
    if c.seq == seq && c.region == p.header as usize {
        for e in c.ents.iter() {
            if pc >= !e.start && pc < !e.end {
                return Some(MapEntry { start: !e.start, end: !e.end, ..*e });
            }
        }
    } else {
        c.seq = seq;
        c.region = p.header as usize;
        for e in c.ents.iter_mut() {
            e.end = !0;
        }
    }
    let found = lookup(p, pc).or_else(|| {
        if crate::sync::new_object(p, pc) {
            let f = lookup(p, pc);
            c.seq = h.maps_seq.load(Acquire);
            for e in c.ents.iter_mut() {
                e.end = !0;
            }
            f
        } else {
            None
        }
    })?;
    let slot = (c.next as usize) % CACHE;
    c.next = c.next.wrapping_add(1);
    c.ents[slot] = MapEntry { start: !found.start, end: !found.end, ..found };
    Some(found)
}

/// Binary search of the published mapping list, consistent under memleak's sequence lock.
pub fn lookup(p: &Info, pc: u64) -> Option<MapEntry> {
    let h = p.header();
    for _ in 0..1000 {
        let s1 = h.maps_seq.load(Acquire);
        if s1 & 1 != 0 {
            core::hint::spin_loop();
            continue;
        }
        let n = h.nmaps.load(Acquire).min(p.max_maps) as usize;
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            // SAFETY: mid < n <= max_maps.
            let e = unsafe { core::ptr::read_volatile(p.mapents.add(mid)) };
            if e.start <= pc {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let hit = if lo > 0 {
            // SAFETY: lo - 1 < n.
            let e = unsafe { core::ptr::read_volatile(p.mapents.add(lo - 1)) };
            (pc < e.end).then_some(e)
        } else {
            None
        };
        fence(Acquire);
        if h.maps_seq.load(Relaxed) == s1 {
            return hit;
        }
    }
    None
}

/// The rule for the code at `pc` of mapping `m`; None without one (or rule 0, no CFI).
fn rule_at(p: &Info, m: &MapEntry, pc: u64) -> Option<Rule> {
    let vaddr = (pc as i64).wrapping_add(m.adj) as u64;
    let page = vaddr >> PAGE_SHIFT;
    let target = (vaddr & 0xffff) as u32;
    if page < u64::from(m.first_page) || page - u64::from(m.first_page) >= u64::from(m.npages) {
        return None;
    }
    let idx = u64::from(m.page_base) + (page - u64::from(m.first_page));
    if idx >= u64::from(p.max_pages) {
        return None;
    }
    // SAFETY: idx < max_pages; the tables are immutable once published.
    let pg = unsafe { core::ptr::read_volatile(p.pages.add(idx as usize)) };
    if pg.nrows == 0 || u64::from(pg.first_row) + u64::from(pg.nrows) > u64::from(p.max_rows) {
        return None;
    }
    let (mut lo, mut n) = (pg.first_row, pg.nrows);
    // The last row whose start is <= target; the page's first row starts at offset 0.
    while n > 1 {
        let half = n / 2;
        let mid = lo + half;
        // SAFETY: mid < first_row + nrows <= max_rows.
        let row = unsafe { core::ptr::read_volatile(p.rows.add(mid as usize)) };
        if (row >> 16) <= target {
            lo = mid;
            n -= half;
        } else {
            n = half;
        }
    }
    // SAFETY: lo < max_rows, checked above.
    let idx = unsafe { core::ptr::read_volatile(p.rows.add(lo as usize)) } & 0xffff;
    if idx == 0 || idx >= p.max_rules {
        return None;
    }
    // SAFETY: idx < max_rules.
    let rule = unsafe { core::ptr::read_volatile(p.rules.add(idx as usize)) };
    (rule.cfa != CFA_NONE).then_some(rule)
}
