//! The shared-memory format between memleak and its preload library: one definition, used by
//! both (memleak includes this file with `#[path]`). docs/in-process-capture.md describes it.
//!
//! Two memfds, both made by memleak and handed over on the connection each process opens to it
//! (SCM_RIGHTS): the process's *region* (read and written by the process: outstanding blocks,
//! stacks, counters, -t events; written by memleak: the list of the process's executable
//! mappings, the answers to its requests), one per process; and the *tables* (written by
//! memleak, read-only in every process: the unwind rules, rows and pages of docs/unwinding.md,
//! the very indexes the BPF maps hold), one per run. memleak reads a region as untrusted input:
//! the process can write anything there.
#![allow(dead_code)] // each side uses its part

use core::sync::atomic::{AtomicU32, AtomicU64};

/// "memleak2" / "mlktbl02": a mapping that does not start with these is not ours.
pub const REGION_MAGIC: u64 = 0x326b_6165_6c6d_656d;
pub const TABLES_MAGIC: u64 = 0x3230_6c62_746b_6c6d;

/// The environment variable naming memleak's socket (an abstract unix socket name, without
/// the leading NUL): the library connects to it, whatever descriptors the process closed.
pub const ENV: &str = "MEMLEAK_PRELOAD";

/// The library's hello on its connection: who it is and where its per-thread state lies.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Hello {
    pub magic: u64,
    /// The offset from a thread's thread pointer (fs base) of the word holding the stack
    /// pointer of the allocator call in flight on that thread (0: none): the BPF side reads it
    /// to count a call made inside one of the library's (malloc's mmap) once.
    pub call_sp_tls: i64,
}

pub const HELLO_MAGIC: u64 = 0x6f6c_6c65_686b_6c6d;

/// memleak's answer: the region and the tables come with it as descriptors. `ok` 0: memleak
/// does not trace this process in-process (not followed, or it stopped): forward only.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Welcome {
    pub magic: u64,
    pub ok: u64,
}

/// The functions the library interposes (its exported names, pthread_getattr_np aside): the
/// calls memleak's uprobes need not see where the library forwards them.
pub const INTERPOSED: [&str; 38] = [
    "malloc",
    "calloc",
    "realloc",
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "free",
    "cfree",
    "__libc_malloc",
    "__libc_calloc",
    "__libc_realloc",
    "__libc_free",
    "__libc_memalign",
    "__libc_valloc",
    "__libc_pvalloc",
    "_Znwm",
    "_Znam",
    "_ZnwmRKSt9nothrow_t",
    "_ZnamRKSt9nothrow_t",
    "_ZnwmSt11align_val_t",
    "_ZnamSt11align_val_t",
    "_ZnwmSt11align_val_tRKSt9nothrow_t",
    "_ZnamSt11align_val_tRKSt9nothrow_t",
    "_ZdlPv",
    "_ZdaPv",
    "_ZdlPvm",
    "_ZdaPvm",
    "_ZdlPvSt11align_val_t",
    "_ZdaPvSt11align_val_t",
    "_ZdlPvmSt11align_val_t",
    "_ZdaPvmSt11align_val_t",
    "_ZdlPvRKSt9nothrow_t",
    "_ZdaPvRKSt9nothrow_t",
    "_ZdlPvSt11align_val_tRKSt9nothrow_t",
    "_ZdaPvSt11align_val_tRKSt9nothrow_t",
];

/// Frames kept per stack (memleak.h's MAX_STACK_DEPTH).
pub const MAX_DEPTH: usize = 127;

/// `RegionHeader::flags`.
pub const FLAG_TRACE_ALL: u32 = 1;
pub const FLAG_COMBINED_ONLY: u32 = 2;
pub const FLAG_WA_MISSING_FREE: u32 = 4;
pub const FLAG_FRAME_POINTERS: u32 = 8;

/// The key word of a block slot: the block's address in the low 48 bits, a generation in the
/// high 16 bits (bumped by every write, so that a reader can tell a slot changed under it).
/// The address part of a slot not holding a block is one of these.
pub const KEY_EMPTY: u64 = 0;
pub const KEY_BUSY: u64 = 2;
pub const ADDR_MASK: u64 = (1 << 48) - 1;

/// The counters: the indexes of memleak.h's `enum counter`.
pub const NR_COUNTERS: usize = 20;
pub const CNT_ALLOCS_FULL: usize = 0;
pub const CNT_STACKS_FULL: usize = 1;
pub const CNT_EVENTS_LOST: usize = 3;
pub const CNT_COMBINED_FULL: usize = 4;
pub const CNT_TRUNCATED: usize = 5;
pub const CNT_UNWINDS: usize = 7;
pub const CNT_STOP_NOT_MAPPED: usize = 8;
pub const CNT_STOP_NO_TABLE: usize = 9;
pub const CNT_STOP_NO_CFI: usize = 10;
pub const CNT_STOP_UNSUPPORTED: usize = 11;
pub const CNT_STOP_BAD_CFA: usize = 12;
pub const CNT_STOP_READ: usize = 13;
pub const CNT_NO_TABLE_SEEN: usize = 14;

/// memleak.h's `enum event_kind`, for -t lines.
pub const EV_ALLOC: u32 = 1;
pub const EV_FREE: u32 = 2;

/// The run's options a region carries: memleak writes them, the library copies them once.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings {
    pub min_size: u64,
    pub max_size: u64,
    pub sample_rate: u32,
    pub flags: u32,
    /// Blocks recorded at most at once (--max-allocs).
    pub max_allocs: u64,
    /// --sample-bytes (0: off): a block of size s is sampled with probability
    /// 1 - exp(-s / sample_bytes), as records.bpf.h decides.
    pub sample_bytes: u64,
}

/// The head of a region. memleak fills the configuration before it hands the region over.
#[repr(C)]
pub struct RegionHeader {
    pub magic: u64,
    /// The process the region is for: the library records into it only there (a forked child
    /// asks for a region of its own). memleak sets it to 0 when it stops tracing the process.
    pub owner_pid: AtomicU32,
    /// Set by the library at its first recorded allocation call.
    pub seen: AtomicU32,
    /// The run's options, as memleak set them.
    pub settings: Settings,
    /// The block table: `alloc_slots` (a power of two) keys (`AtomicU64`) at `allocs_off`, and
    /// as many `BlockInfo`s at `alloc_infos_off`: the keys are apart so that a lookup reads
    /// 8 bytes a slot.
    pub alloc_slots: u64,
    pub allocs_off: u64,
    pub alloc_infos_off: u64,
    /// The stack index: `stack_slots` (a power of two) `StackSlot`s at `stack_index_off`;
    /// `max_stacks` `StackEntry`s at `stacks_off`; `max_stacks + 1` `Combined` at
    /// `combined_off` (the last: blocks whose stack was not stored).
    pub stack_slots: u64,
    pub stack_index_off: u64,
    pub max_stacks: u64,
    pub stacks_off: u64,
    pub combined_off: u64,
    /// -t: a ring of `events_len` (a power of two) `Event`s at `events_off`.
    pub events_len: u64,
    pub events_off: u64,
    /// The process's executable mappings (memleak writes them): `max_maps` `MapEntry`s at
    /// `maps_off`, `nmaps` of them valid, sorted by start, under the sequence lock `maps_seq`
    /// (odd while memleak writes).
    pub max_maps: u64,
    pub maps_off: u64,
    /// The region's size.
    pub size: u64,
    /// Blocks recorded now.
    pub alloc_count: AtomicU64,
    /// StackEntry slots handed out.
    pub stack_count: AtomicU64,
    pub maps_seq: AtomicU32,
    pub nmaps: AtomicU32,
    /// Futex words: the process asks memleak to publish its mappings again (sync_req, then a
    /// byte on its connection), memleak answers by setting sync_done to the request it served.
    pub sync_req: AtomicU32,
    pub sync_done: AtomicU32,
    /// -t: events written (head) and read by memleak (tail).
    pub ev_head: AtomicU64,
    pub ev_tail: AtomicU64,
    pub counters: [AtomicU64; NR_COUNTERS],
    /// The pid that goes into each stack's hash (memleak.h's `struct stack`'s pid).
    pub stack_pid: u32,
    pub pad: u32,
}

/// What a block slot holds besides its key.
#[repr(C)]
pub struct BlockInfo {
    pub size: AtomicU64,
    pub timestamp_ns: AtomicU64,
    pub stack_id: AtomicU64,
}

/// The stack index: `hash` (0 empty) names the entry `entry` (index + 1; 0 being written,
/// u64::MAX no room).
#[repr(C)]
pub struct StackSlot {
    pub hash: AtomicU64,
    pub entry: AtomicU64,
}

/// memleak.h's `struct stack` without its pid (the region's): return addresses, innermost
/// first, and where each was (object id << 32 | file offset; 0 unknown).
#[repr(C)]
pub struct StackEntry {
    pub depth: u32,
    pub truncated: u32,
    /// Allocations from this stack since tracing began, and their bytes (pprof's alloc_*).
    pub alloc_count: AtomicU64,
    pub alloc_bytes: AtomicU64,
    pub ips: [u64; MAX_DEPTH],
    pub locs: [u64; MAX_DEPTH],
}

/// --combined-only: a stack's outstanding bytes and blocks.
#[repr(C)]
pub struct Combined {
    pub bytes: AtomicU64,
    pub count: AtomicU64,
}

/// -t: one call. `seq` is the event's position + 1 once written.
#[repr(C)]
pub struct Event {
    pub seq: AtomicU64,
    pub kind: u32,
    pub tid: u32,
    pub size: u64,
    pub addr: u64,
}

/// The head of the tables memfd (read-only in the process).
#[repr(C)]
pub struct TablesHeader {
    pub magic: u64,
    pub max_rules: u32,
    pub max_pages: u32,
    pub max_rows: u32,
    pub pad: u32,
    pub rules_off: u64,
    pub pages_off: u64,
    pub rows_off: u64,
    pub size: u64,
}

/// memleak.h's `struct unwind_rule`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Rule {
    pub cfa: u8,
    pub rbp: u8,
    pub aux: u8,
    pub pad: u8,
    pub cfa_off: i32,
    pub rbp_off: i32,
}

/// memleak.h's `struct unwind_page`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Page {
    pub first_row: u32,
    pub nrows: u32,
}

/// An executable mapping of the process, as unwind.bpf.h's `struct unwind_vma` describes one:
/// `adj` turns an address into the object's virtual address, `file_adj` into its file
/// offset; `npages` 0: no table (walk the frame pointer); `obj` the object's id (0: no file).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub adj: i64,
    pub file_adj: i64,
    pub page_base: u32,
    pub first_page: u32,
    pub npages: u32,
    pub obj: u32,
}

/// memleak.h's `enum unwind_cfa` and `enum unwind_rbp`.
pub const CFA_NONE: u8 = 0;
pub const CFA_RSP: u8 = 1;
pub const CFA_RBP: u8 = 2;
pub const CFA_PLT: u8 = 3;
pub const CFA_END: u8 = 4;
pub const RBP_SAME: u8 = 0;
pub const RBP_AT_CFA: u8 = 1;
pub const RBP_UNDEFINED: u8 = 2;
pub const PAGE_SHIFT: u32 = 16;

/// records.bpf.h's stack_hash: the same frames of the same process give the same id in either
/// capture.
pub fn stack_hash(pid: u32, ips: &[u64], locs: &[u64]) -> u64 {
    const P: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ ips.len() as u64;
    h = (h ^ u64::from(pid)).wrapping_mul(P);
    for (&ip, &loc) in ips.iter().zip(locs) {
        h = (h ^ ip).wrapping_mul(P);
        h = (h ^ loc).wrapping_mul(P);
        h ^= h >> 29;
    }
    h ^= h >> 32;
    if h == 0 { 1 } else { h }
}

/// Where a block's address starts its search in the block table.
#[inline]
pub fn addr_hash(addr: u64) -> u64 {
    (addr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A block lives within this many slots of its home slot.
pub const WINDOW: u64 = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_structures_keep_their_c_sizes() {
        assert_eq!(core::mem::size_of::<BlockInfo>(), 24);
        assert_eq!(core::mem::size_of::<StackSlot>(), 16);
        assert_eq!(core::mem::size_of::<StackEntry>(), 24 + 16 * MAX_DEPTH);
        assert_eq!(core::mem::size_of::<Rule>(), 12);
        assert_eq!(core::mem::size_of::<Page>(), 8);
        assert_eq!(core::mem::size_of::<MapEntry>(), 48);
        assert_eq!(core::mem::size_of::<Event>(), 32);
    }

    #[test]
    fn stack_ids_depend_on_every_frame_its_place_and_the_process() {
        let a = stack_hash(7, &[0x1000, 0x2000], &[1 << 32 | 0x10, 0]);
        assert_ne!(a, stack_hash(7, &[0x1000, 0x2001], &[1 << 32 | 0x10, 0]));
        assert_ne!(a, stack_hash(7, &[0x1000, 0x2000], &[2 << 32 | 0x10, 0]));
        assert_ne!(a, stack_hash(8, &[0x1000, 0x2000], &[1 << 32 | 0x10, 0]));
        assert_ne!(a, stack_hash(7, &[0x1000], &[1 << 32 | 0x10]));
        assert_eq!(a, stack_hash(7, &[0x1000, 0x2000], &[1 << 32 | 0x10, 0]));
        assert_ne!(stack_hash(0, &[], &[]), 0);
    }
}
