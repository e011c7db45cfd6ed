//! One process's region: the shared memory its preload library records into (blocks, stacks,
//! counters, -t events) and memleak publishes its executable mappings into. The process can
//! write anything there: every index memleak reads from it is bounded by memleak's own copy of
//! the layout, every count checked, and the memfd cannot shrink under memleak's reads.
use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::*};

use anyhow::Result;

use super::layout::*;
use super::shm::Shm;

/// Stacks per process: the BPF stack map's size.
pub const MAX_STACKS: u64 = crate::loader::MAX_STACKS as u64;
const STACK_SLOTS: u64 = 2 * MAX_STACKS;
/// -t lines a process can hold until memleak reads them.
const EVENTS: u64 = 1 << 16;
/// Executable mappings a process's list holds.
pub const MAX_MAPS: u64 = 8192;
/// No block is larger (user space addresses are 47 bits): a size above is a scribble.
const MAX_BLOCK: u64 = 1 << 47;

/// Where each part of a region lies, decided by memleak (the process only reads the offsets).
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub alloc_slots: u64,
    pub allocs_off: usize,
    pub alloc_infos_off: usize,
    pub stack_index_off: usize,
    pub stacks_off: usize,
    pub combined_off: usize,
    pub events_off: usize,
    pub events_len: u64,
    pub maps_off: usize,
    pub size: usize,
}

fn align(n: usize) -> usize {
    n.next_multiple_of(4096)
}

impl Layout {
    pub fn new(max_allocs: u64, trace: bool) -> Layout {
        // Twice the blocks, so that a block's 64-slot window is rarely full.
        let alloc_slots = (2 * max_allocs).next_power_of_two().max(64);
        let events_len = if trace { EVENTS } else { 1 };
        let allocs_off = 4096;
        let alloc_infos_off = allocs_off + align(alloc_slots as usize * 8);
        let stack_index_off = alloc_infos_off + align(alloc_slots as usize * size_of::<BlockInfo>());
        let stacks_off = stack_index_off + align(STACK_SLOTS as usize * size_of::<StackSlot>());
        let combined_off = stacks_off + align(MAX_STACKS as usize * size_of::<StackEntry>());
        let events_off = combined_off + align((MAX_STACKS as usize + 1) * size_of::<Combined>());
        let maps_off = events_off + align(events_len as usize * size_of::<Event>());
        let size = maps_off + align(MAX_MAPS as usize * size_of::<MapEntry>());
        Layout {
            alloc_slots,
            allocs_off,
            alloc_infos_off,
            stack_index_off,
            stacks_off,
            combined_off,
            events_off,
            events_len,
            maps_off,
            size,
        }
    }
}

/// A stack read from a region.
pub struct StackRead {
    pub id: u64,
    /// Read for the first time: its frames.
    pub frames: Option<Vec<(u64, u64)>>,
    pub alloc_count: u64,
    pub alloc_bytes: u64,
}

pub struct Region {
    pub pid: i32,
    shm: Shm,
    layout: Layout,
    /// The process's connection to memleak: its requests come there.
    pub conn: OwnedFd,
    /// Index slots whose stacks were read already (a published entry never changes).
    seen_stacks: HashSet<usize>,
    /// /proc/PID/maps when the mappings were last published.
    pub last_maps: String,
    /// The connection is still open (not polled once the process hung up).
    pub open: bool,
    /// The most values out of bounds (written over by the process) one read of the region met:
    /// ignored, and said in a WARNING.
    rejected: AtomicU64,
}

impl Region {
    pub fn new(pid: i32, layout: Layout, s: &Settings, conn: OwnedFd) -> Result<Region> {
        let name = std::ffi::CString::new(format!("memleak-region-{pid}")).expect("no NUL");
        let shm = Shm::new(&name, layout.size, 0)?;
        // SAFETY: the header at the start of the fresh zeroed mapping, not handed over yet.
        let h = unsafe { &mut *(shm.ptr as *mut RegionHeader) };
        h.magic = REGION_MAGIC;
        h.owner_pid.store(pid as u32, Relaxed);
        h.settings = *s;
        h.alloc_slots = layout.alloc_slots;
        h.allocs_off = layout.allocs_off as u64;
        h.alloc_infos_off = layout.alloc_infos_off as u64;
        h.stack_slots = STACK_SLOTS;
        h.stack_index_off = layout.stack_index_off as u64;
        h.max_stacks = MAX_STACKS;
        h.stacks_off = layout.stacks_off as u64;
        h.combined_off = layout.combined_off as u64;
        h.events_len = layout.events_len;
        h.events_off = layout.events_off as u64;
        h.max_maps = MAX_MAPS;
        h.maps_off = layout.maps_off as u64;
        h.size = layout.size as u64;
        h.stack_pid = pid as u32;
        Ok(Region {
            pid,
            shm,
            layout,
            conn,
            seen_stacks: HashSet::new(),
            last_maps: String::new(),
            open: true,
            rejected: AtomicU64::new(0),
        })
    }

    /// Notes that one read met `n` values out of bounds.
    pub fn rejected_in_read(&self, n: u64) {
        if n > 0 {
            self.rejected.fetch_max(n, Relaxed);
        }
    }

    /// The most values out of bounds one read met (0: the region was sane).
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Relaxed)
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.shm.fd
    }

    /// The memfd's (device, inode): how the process's maps show the region.
    pub fn id(&self) -> (u64, u64) {
        self.shm.id()
    }

    fn header(&self) -> &RegionHeader {
        // SAFETY: the header of our mapping; the process may write it (atomics, checked uses).
        unsafe { &*(self.shm.ptr as *const RegionHeader) }
    }

    /// The library records no more (memleak stops tracing the process).
    pub fn stop(&self) {
        self.header().owner_pid.store(0, Release);
    }

    /// Whether the library saw an allocation call.
    pub fn seen(&self) -> bool {
        self.header().seen.load(Relaxed) != 0
    }

    /// The loss counters (memleak.h's enum counter).
    pub fn counters(&self) -> [u64; NR_COUNTERS] {
        let mut out = [0u64; NR_COUNTERS];
        for (o, c) in out.iter_mut().zip(&self.header().counters) {
            *o = c.load(Relaxed);
        }
        out
    }

    /// Every outstanding block: f(addr, size, timestamp_ns, stack_id). A slot rewritten while it
    /// is read is read again.
    pub fn for_each_block(&self, f: &mut dyn FnMut(u64, u64, u64, u64)) {
        let (off, n) = (self.layout.allocs_off, self.layout.alloc_slots as usize);
        let keys = self.shm.ptr.wrapping_add(off) as *const AtomicU64;
        let infos = self.shm.ptr.wrapping_add(self.layout.alloc_infos_off) as *const BlockInfo;
        let mut bad = 0;
        for (a, b) in self.shm.data_ranges(off, n * 8) {
            for i in (a - off) / 8..((b - off).div_ceil(8)).min(n) {
                // SAFETY: i < n keys and infos, inside our mapping.
                let (key, info) = unsafe { (&*keys.add(i), &*infos.add(i)) };
                for _ in 0..4 {
                    let k = key.load(Acquire);
                    let addr = k & ADDR_MASK;
                    if addr <= KEY_BUSY {
                        break;
                    }
                    let (size, ts, stack) =
                        (info.size.load(Relaxed), info.timestamp_ns.load(Relaxed), info.stack_id.load(Relaxed));
                    std::sync::atomic::fence(Acquire);
                    if key.load(Relaxed) == k {
                        if size > MAX_BLOCK || addr.checked_add(size).is_none_or(|e| e > ADDR_MASK + 1) {
                            bad += 1;
                        } else {
                            f(addr, size, ts, stack);
                        }
                        break;
                    }
                }
            }
        }
        self.rejected_in_read(bad);
    }

    /// The stack index's slots holding data: (index, hash, entry), entry unchecked.
    fn stack_slots(&self) -> Vec<(usize, u64, u64)> {
        let off = self.layout.stack_index_off;
        let slots = self.shm.ptr.wrapping_add(off) as *const StackSlot;
        let mut out = Vec::new();
        for (a, b) in self.shm.data_ranges(off, STACK_SLOTS as usize * size_of::<StackSlot>()) {
            let first = (a - off) / size_of::<StackSlot>();
            let last = (b - off).div_ceil(size_of::<StackSlot>()).min(STACK_SLOTS as usize);
            for i in first..last {
                // SAFETY: i < STACK_SLOTS, inside our mapping.
                let s = unsafe { &*slots.add(i) };
                out.push((i, s.hash.load(Acquire), s.entry.load(Acquire)));
            }
        }
        out
    }

    /// The stacks stored (frames of those not read before) with their allocation counts.
    pub fn read_stacks(&mut self) -> Vec<StackRead> {
        let mut out = Vec::new();
        let base = self.shm.ptr;
        let entries = base.wrapping_add(self.layout.stacks_off) as *const StackEntry;
        let mut bad = 0;
        for (i, hash, entry) in self.stack_slots() {
            if hash == 0 || entry == 0 {
                continue;
            }
            if entry > MAX_STACKS {
                bad += 1;
                continue;
            }
            // SAFETY: entry - 1 < MAX_STACKS, inside our mapping.
            let e = unsafe { &*entries.add(entry as usize - 1) };
            let frames = if self.seen_stacks.insert(i) {
                // SAFETY: a plain field inside our mapping, copied.
                let depth = unsafe { std::ptr::read_volatile(&e.depth) } as usize;
                if depth > MAX_DEPTH {
                    bad += 1;
                }
                let depth = depth.min(MAX_DEPTH);
                // SAFETY: plain arrays inside our mapping, copied.
                let (ips, locs) = unsafe { (std::ptr::read_volatile(&e.ips), std::ptr::read_volatile(&e.locs)) };
                Some(ips[..depth].iter().copied().zip(locs[..depth].iter().copied()).collect())
            } else {
                None
            };
            out.push(StackRead {
                id: hash,
                frames,
                alloc_count: e.alloc_count.load(Relaxed),
                alloc_bytes: e.alloc_bytes.load(Relaxed),
            });
        }
        self.rejected_in_read(bad);
        out
    }

    /// --combined-only: each stack's outstanding (bytes, blocks), by id (0: not stored).
    pub fn combined(&self) -> Vec<(u64, u64, u64)> {
        let base = self.shm.ptr;
        let totals = base.wrapping_add(self.layout.combined_off) as *const Combined;
        let total = |e: usize| {
            // SAFETY: e <= MAX_STACKS, inside our mapping.
            let c = unsafe { &*totals.add(e) };
            (c.bytes.load(Relaxed), c.count.load(Relaxed))
        };
        let mut out = Vec::new();
        let (mut bad, mut bad_index) = (0, 0);
        let mut put = |id: u64, (bytes, count): (u64, u64)| {
            // Counts that went below zero (a process's scribbles) are not shown.
            if count >= i64::MAX as u64 || bytes >= i64::MAX as u64 {
                bad += 1;
            } else if count > 0 {
                out.push((id, bytes, count));
            }
        };
        put(0, total(MAX_STACKS as usize));
        for (_, hash, entry) in self.stack_slots() {
            if hash != 0 && entry > 0 && entry <= MAX_STACKS {
                put(hash, total(entry as usize - 1));
            } else if hash != 0 && entry > MAX_STACKS {
                bad_index += 1;
            }
        }
        self.rejected_in_read(bad + bad_index);
        out
    }

    /// -t: the calls recorded since the last call: (kind, size, address).
    pub fn drain_events(&self) -> Vec<(u32, u64, u64)> {
        let mask = self.layout.events_len - 1;
        let h = self.header();
        let events = self.shm.ptr.wrapping_add(self.layout.events_off) as *const Event;
        let mut tail = h.ev_tail.load(Acquire);
        let mut out = Vec::new();
        // At most a ring's worth: a process that keeps the ring full cannot hold memleak here.
        for _ in 0..self.layout.events_len {
            // SAFETY: (tail & mask) < events_len, inside our mapping.
            let e = unsafe { &*events.add((tail & mask) as usize) };
            if e.seq.load(Acquire) != tail.wrapping_add(1) {
                break;
            }
            // SAFETY: plain fields of the event just published.
            let (kind, size, addr) = unsafe {
                (std::ptr::read_volatile(&e.kind), std::ptr::read_volatile(&e.size), std::ptr::read_volatile(&e.addr))
            };
            if kind == EV_ALLOC || kind == EV_FREE {
                out.push((kind, size, addr));
            } else {
                self.rejected_in_read(1);
            }
            tail = tail.wrapping_add(1);
        }
        h.ev_tail.store(tail, Release);
        out
    }

    /// Publishes the process's executable mappings (sorted by start) under the sequence lock
    /// the library reads them with.
    pub fn publish_maps(&self, list: &[MapEntry]) {
        let h = self.header();
        let n = list.len().min(MAX_MAPS as usize);
        let ents = self.shm.ptr.wrapping_add(self.layout.maps_off) as *mut MapEntry;
        // Odd while the list changes, whatever the process wrote there.
        let seq = h.maps_seq.load(Relaxed) | 1;
        h.maps_seq.store(seq, Release);
        for (i, e) in list[..n].iter().enumerate() {
            // SAFETY: i < MAX_MAPS, inside our mapping.
            unsafe { ents.add(i).write_volatile(*e) };
        }
        h.nmaps.store(n as u32, Release);
        h.maps_seq.store(seq.wrapping_add(1), Release);
    }

    /// Answers the requests made until now (the mappings were published): wakes the threads
    /// waiting for it.
    pub fn answer(&self) {
        // The bytes that announced them.
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: a non-blocking read into a local buffer from our end of the connection.
            let n =
                unsafe { libc::recv(self.conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n <= 0 {
                break;
            }
        }
        let h = self.header();
        let req = h.sync_req.load(Acquire);
        if h.sync_done.load(Acquire) != req {
            h.sync_done.store(req, Release);
            // SAFETY: wakes the process's threads waiting on the shared futex word.
            unsafe {
                libc::syscall(libc::SYS_futex, &h.sync_done as *const _, libc::FUTEX_WAKE, i32::MAX, 0, 0, 0);
            }
        }
    }

    /// Whether the process hung up (its connection closed: it exec'd or exited).
    pub fn hung_up(&self) -> bool {
        let mut p = libc::pollfd { fd: self.conn.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one live pollfd, no wait.
        unsafe { libc::poll(&mut p, 1, 0) > 0 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_region_layout_is_page_aligned_and_in_order() {
        for (max, trace) in [(1u64, false), (100, true), (1 << 20, false)] {
            let l = Layout::new(max, trace);
            assert!(l.alloc_slots.is_power_of_two() && l.alloc_slots >= 2 * max);
            let offs = [
                l.allocs_off,
                l.alloc_infos_off,
                l.stack_index_off,
                l.stacks_off,
                l.combined_off,
                l.events_off,
                l.maps_off,
                l.size,
            ];
            assert!(offs.windows(2).all(|w| w[0] < w[1]), "{offs:?}");
            assert!(offs.iter().all(|o| o % 4096 == 0), "{offs:?}");
            assert_eq!(l.alloc_infos_off - l.allocs_off, align(l.alloc_slots as usize * 8));
        }
    }

    /// A region read back as the library writes it: blocks, a stack with its counts, events,
    /// and a process's scribbles (an entry index past the end) ignored.
    #[test]
    fn a_region_reads_what_the_library_writes_and_bounds_what_it_scribbles() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(b);
        let s = Settings {
            min_size: 0,
            max_size: u64::MAX,
            sample_rate: 1,
            flags: FLAG_TRACE_ALL,
            max_allocs: 100,
            sample_bytes: 0,
        };
        let mut r = Region::new(7, Layout::new(100, true), &s, OwnedFd::from(a)).unwrap();
        let l = r.layout;
        let base = r.shm.ptr;
        // SAFETY: writes inside the region as the library would.
        unsafe {
            let keys = base.add(l.allocs_off) as *const AtomicU64;
            let infos = base.add(l.alloc_infos_off) as *const BlockInfo;
            (*keys.add(3)).store(0x5000 | 1 << 48, Relaxed);
            (*infos.add(3)).size.store(40, Relaxed);
            (*infos.add(3)).stack_id.store(99, Relaxed);
            let slots = base.add(l.stack_index_off) as *const StackSlot;
            (*slots.add(5)).hash.store(99, Relaxed);
            (*slots.add(5)).entry.store(1, Relaxed);
            (*slots.add(6)).hash.store(98, Relaxed);
            (*slots.add(6)).entry.store(MAX_STACKS + 1, Relaxed);
            let e = &mut *(base.add(l.stacks_off) as *mut StackEntry);
            e.depth = 1000;
            e.ips[0] = 0x1234;
            e.locs[0] = 3 << 32 | 0x34;
            e.alloc_count.store(2, Relaxed);
            e.alloc_bytes.store(80, Relaxed);
            let ev = &mut *(base.add(l.events_off) as *mut Event);
            ev.kind = EV_ALLOC;
            ev.size = 40;
            ev.addr = 0x5000;
            ev.seq.store(1, Relaxed);
        }
        let mut blocks = Vec::new();
        r.for_each_block(&mut |a, s, _, id| blocks.push((a, s, id)));
        assert_eq!(blocks, [(0x5000, 40, 99)]);
        let stacks = r.read_stacks();
        assert_eq!(stacks.len(), 1);
        let f = stacks[0].frames.as_ref().unwrap();
        assert_eq!(f.len(), MAX_DEPTH);
        assert_eq!(f[0], (0x1234, 3 << 32 | 0x34));
        assert_eq!((stacks[0].alloc_count, stacks[0].alloc_bytes), (2, 80));
        assert!(r.read_stacks()[0].frames.is_none(), "frames are read once");
        assert_eq!(r.drain_events(), [(EV_ALLOC, 40, 0x5000)]);
        assert!(r.drain_events().is_empty());
        r.publish_maps(&[MapEntry { start: 1, end: 2, ..Default::default() }]);
        assert_eq!(r.header().nmaps.load(Relaxed), 1);
        assert_eq!(r.header().maps_seq.load(Relaxed) & 1, 0);
    }
}
