//! The allocation records as user space sees them: the BPF table (`struct alloc_bucket`,
//! src/bpf/memleak.h and records.bpf.h) mapped into memleak's memory, scanned in place. A
//! report reads it at memory speed, with no syscall per element (the hash map it replaces took
//! 2.6 s to read at 4 M records through BPF_MAP_LOOKUP_BATCH).
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, bail};
use libbpf_rs::MapCore;

use crate::skel::types::{alloc_bucket, alloc_info};

/// Slots per bucket, empty and in-progress markers (memleak.h).
const SLOTS: usize = 8;
const EMPTY: u64 = 0;
const BUSY: u64 = 1;
/// Records per bucket at a full table: two choices of 8-slot buckets keep every bucket below
/// its 8 slots at this load (docs/design.md, Records).
pub const RECORDS_PER_BUCKET: u32 = 5;

/// Buckets of a table for at most `max_records` records.
pub fn buckets_for(max_records: u32) -> u32 {
    max_records.div_ceil(RECORDS_PER_BUCKET).max(1)
}

/// Kernel memory of such a table, taken at start.
pub fn table_bytes(max_records: u32) -> u64 {
    u64::from(buckets_for(max_records)) * std::mem::size_of::<alloc_bucket>() as u64
}

/// One record: a block still allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub pid: u32,
    pub addr: u64,
    pub size: u64,
    pub timestamp_ns: u64,
    pub stack_id: u64,
}

/// The table mapped read-write (retire ends a process's records itself).
pub struct RecordTable {
    base: *mut alloc_bucket,
    buckets: usize,
    len: usize,
}

impl RecordTable {
    /// Maps the `allocs` array of a loaded object.
    pub fn map(map: &impl MapCore) -> Result<Self> {
        let buckets = map.max_entries() as usize;
        if map.value_size() as usize != std::mem::size_of::<alloc_bucket>() {
            bail!("the allocation table's buckets are {} bytes, not {}", map.value_size(), size_of::<alloc_bucket>());
        }
        let len = (buckets * size_of::<alloc_bucket>()).next_multiple_of(crate::loader::page_size() as usize);
        // SAFETY: a shared mapping of the BPF array's pages (BPF_F_MMAPABLE), which live as
        // long as the mapping does, whatever happens to the map's descriptor.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!("cannot map the allocation table: {}", std::io::Error::last_os_error());
        }
        Ok(RecordTable { base: p.cast(), buckets, len })
    }

    /// Kernel memory of the table (its pages, mapped here too).
    pub fn bytes(&self) -> usize {
        self.len
    }

    fn addr_word(&self, b: usize, i: usize) -> &AtomicU64 {
        debug_assert!(b < self.buckets && i < SLOTS);
        // SAFETY: b and i are in range; the slot's address word is an aligned u64 that BPF
        // updates only with atomic or single aligned stores.
        unsafe { AtomicU64::from_ptr(std::ptr::addr_of_mut!((*self.base.add(b)).addr[i])) }
    }

    /// The record in slot i of bucket b, if the slot holds one complete record.
    fn read(&self, b: usize, i: usize) -> Option<Record> {
        let word = self.addr_word(b, i);
        let addr = word.load(Ordering::Acquire);
        if addr <= BUSY {
            return None;
        }
        // SAFETY: in range; plain data that BPF may rewrite meanwhile (read volatile, then the
        // address checked again: a record ended or replaced during the read is skipped).
        let (pid, info) = unsafe {
            let bucket = self.base.add(b);
            (
                std::ptr::read_volatile(std::ptr::addr_of!((*bucket).pid[i])),
                std::ptr::read_volatile(std::ptr::addr_of!((*bucket).info[i])),
            )
        };
        if word.load(Ordering::Acquire) != addr {
            return None;
        }
        let alloc_info { size, timestamp_ns, stack_id } = info;
        Some(Record { pid, addr, size, timestamp_ns, stack_id })
    }

    /// Calls `f` for every record; returns how many there were.
    pub fn for_each(&self, mut f: impl FnMut(&Record)) -> usize {
        let mut n = 0;
        for b in 0..self.buckets {
            for i in 0..SLOTS {
                if let Some(r) = self.read(b, i) {
                    f(&r);
                    n += 1;
                }
            }
        }
        n
    }

    /// Ends every record of process `pid` (gone: nothing of it runs BPF any more); returns how
    /// many. `live`: the BPF side's count of records, kept right.
    pub fn remove_pid(&self, pid: u32, live: &AtomicU64) -> usize {
        let mut n = 0;
        for b in 0..self.buckets {
            for i in 0..SLOTS {
                let Some(r) = self.read(b, i) else { continue };
                if r.pid == pid
                    && self.addr_word(b, i).compare_exchange(r.addr, EMPTY, Ordering::AcqRel, Ordering::Relaxed).is_ok()
                {
                    live.fetch_sub(1, Ordering::AcqRel);
                    n += 1;
                }
            }
        }
        n
    }

    /// Test and benchmark support: records a block as the BPF side does (records.bpf.h).
    #[cfg(test)]
    pub fn insert(&self, r: &Record) -> bool {
        let (k1, k2) = buckets_of(r.pid, r.addr, self.buckets as u32);
        let used = |b: usize| (0..SLOTS).filter(|&i| self.addr_word(b, i).load(Ordering::Acquire) != EMPTY).count();
        let (first, second) = if used(k2 as usize) < used(k1 as usize) { (k2, k1) } else { (k1, k2) };
        for b in [first as usize, second as usize] {
            for i in 0..SLOTS {
                if self.addr_word(b, i).compare_exchange(EMPTY, BUSY, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    // SAFETY: the slot is claimed (BUSY): nothing else writes it.
                    unsafe {
                        let bucket = self.base.add(b);
                        (*bucket).pid[i] = r.pid;
                        (*bucket).info[i] =
                            alloc_info { size: r.size, timestamp_ns: r.timestamp_ns, stack_id: r.stack_id };
                    }
                    self.addr_word(b, i).store(r.addr, Ordering::Release);
                    return true;
                }
            }
        }
        false
    }
}

/// The two buckets of {pid, addr}, as records.bpf.h computes them.
#[cfg(test)]
fn buckets_of(pid: u32, addr: u64, buckets: u32) -> (u32, u32) {
    let mut h = addr ^ (u64::from(pid) << 40) ^ u64::from(pid);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ceb9fe1a85ec53);
    h ^= h >> 33;
    let scale = |x: u64| ((x * u64::from(buckets)) >> 32) as u32;
    (scale(h & 0xffff_ffff), scale(h >> 32))
}

impl Drop for RecordTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use libbpf_rs::{MapHandle, MapType};

    /// An allocation table of `max_records` made as the loader makes it (root).
    pub fn table(max_records: u32) -> (MapHandle, RecordTable) {
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            map_flags: libbpf_sys::BPF_F_MMAPABLE,
            ..Default::default()
        };
        let map = MapHandle::create(
            MapType::Array,
            Some("allocs"),
            4,
            size_of::<alloc_bucket>() as u32,
            buckets_for(max_records),
            &opts,
        )
        .expect("a BPF array (root)");
        let t = RecordTable::map(&map).expect("mapped");
        (map, t)
    }

    #[test]
    fn records_are_found_and_removed() {
        let (_map, t) = table(1000);
        let mut want = Vec::new();
        for pid in 1..=3u32 {
            for k in 0..300u64 {
                let r = Record { pid, addr: 0x1000 + 16 * k, size: k, timestamp_ns: 7, stack_id: u64::from(pid) };
                assert!(t.insert(&r), "{r:?}: the table holds 1000 at least");
                want.push(r);
            }
        }
        let mut got = Vec::new();
        assert_eq!(t.for_each(|r| got.push(*r)), 900);
        got.sort_by_key(|r| (r.pid, r.addr));
        assert_eq!(got, want);
        let live = AtomicU64::new(900);
        assert_eq!(t.remove_pid(2, &live), 300);
        assert_eq!(live.load(Ordering::Relaxed), 600);
        let mut pids = Vec::new();
        t.for_each(|r| pids.push(r.pid));
        assert!(pids.len() == 600 && !pids.contains(&2));
    }
}
