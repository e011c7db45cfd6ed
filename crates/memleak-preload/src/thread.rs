//! Per-thread state: plain ELF TLS (a const initializer and no destructor), so reading it never
//! allocates nor registers anything. The library is loaded at start-up (LD_PRELOAD): its TLS is
//! static, at the same offset from every thread's thread pointer, which is how the BPF side
//! finds `call_sp` (layout.rs, `Hello`).
use core::cell::{Cell, UnsafeCell};

use crate::layout::{MAX_DEPTH, MapEntry};

/// The executable mappings this thread's walks met last (docs/unwinding.md's per-thread cache).
pub const CACHE: usize = 4;

/// Flags are Cells read and written through a shared reference: a nested call (the allocator's
/// own, a signal handler's) reads them while an outer one of this thread is still in flight.
#[repr(C)]
pub struct Thread {
    /// The stack pointer at the entry of the allocator call in flight (0: none). A call at the
    /// same depth or deeper (realloc's malloc, operator new's malloc, a signal handler's on this
    /// stack) is part of it, counted once; one higher up starts afresh (the outer call was left
    /// by a longjmp), as memleak.bpf.c decides with outer_sp. The BPF side reads it too: a
    /// probed call (mmap) made inside one of ours is part of it.
    pub call_sp: Cell<u64>,
    /// Resolving the functions below runs on this thread: what dlsym allocates comes from the
    /// bootstrap arena.
    pub in_init: Cell<bool>,
    /// Setting up this process's region runs on this thread: calls made meanwhile (a signal
    /// handler's) are forwarded unrecorded.
    pub in_setup: Cell<bool>,
    /// Inside this library's own bookkeeping: a signal handler's call during it walks without
    /// the cache and with a frame buffer of its own.
    pub busy: Cell<bool>,
    /// This library's own libc calls (the stack bounds): what they allocate is not the program's.
    pub internal: Cell<bool>,
    /// Inside pthread_getattr_np, which holds this thread's own lock while it allocates: the
    /// stack bounds cannot be asked for now.
    pub in_getattr: Cell<bool>,
    pub stack_known: Cell<bool>,
    /// The stack's bounds, stored inverted: a thread's TLS lies in its stack, which memleak
    /// records as a block (its mmap); the block's start stored here as a plain value would read
    /// to a reachability scan as a pointer to it.
    pub stack_lo_inv: Cell<u64>,
    pub stack_hi_inv: Cell<u64>,
    pub rng: Cell<u64>,
    /// Used only while `busy` is set by this thread.
    pub cache: UnsafeCell<MapCache>,
    pub frames: UnsafeCell<Frames>,
}

/// A walk's output.
pub struct Frames {
    pub ips: [u64; MAX_DEPTH],
    pub locs: [u64; MAX_DEPTH],
}

impl Frames {
    pub const NEW: Frames = Frames { ips: [0; MAX_DEPTH], locs: [0; MAX_DEPTH] };
}

const EMPTY_MAP: MapEntry =
    MapEntry { start: 0, end: 0, adj: 0, file_adj: 0, page_base: 0, first_page: 0, npages: 0, obj: 0 };

/// The executable mappings a thread's walks met last, valid while the mapping list's sequence
/// stays (and the region is the same: a forked child has its own). Entries keep their start and
/// end inverted (see `stack_lo_inv`: a JIT's mapping is a block too).
pub struct MapCache {
    pub seq: u32,
    pub region: usize,
    pub next: u32,
    pub ents: [MapEntry; CACHE],
}

impl MapCache {
    pub const NEW: MapCache = MapCache { seq: u32::MAX, region: 0, next: 0, ents: [EMPTY_MAP; CACHE] };
}

impl Thread {
    // A const, not a value shared: each thread's TLS starts as a copy of it.
    #[allow(clippy::declare_interior_mutable_const)]
    pub const NEW: Thread = Thread {
        call_sp: Cell::new(0),
        in_init: Cell::new(false),
        in_setup: Cell::new(false),
        busy: Cell::new(false),
        internal: Cell::new(false),
        in_getattr: Cell::new(false),
        stack_known: Cell::new(false),
        stack_lo_inv: Cell::new(!0),
        stack_hi_inv: Cell::new(!0),
        rng: Cell::new(0),
        cache: UnsafeCell::new(MapCache::NEW),
        frames: UnsafeCell::new(Frames::NEW),
    };
}

thread_local! {
    static T: Thread = const { Thread::NEW };
}

/// This thread's state, valid while the thread lives.
#[inline(always)]
pub fn get() -> &'static Thread {
    // SAFETY: the TLS block outlives every call made on this thread.
    T.with(|t| unsafe { &*(t as *const Thread) })
}

/// Where `call_sp` lies from this thread's thread pointer (the same for every thread).
pub fn call_sp_offset() -> i64 {
    let t = get();
    (&t.call_sp as *const Cell<u64> as usize).wrapping_sub(crate::sys::thread_pointer()) as i64
}

/// The bounds of this thread's stack, found once (pthread_getattr_np allocates: those calls
/// are this library's own and not recorded).
pub fn stack_bounds(t: &Thread) -> (u64, u64) {
    if !t.stack_known.get() && !t.in_getattr.get() {
        t.stack_known.set(true);
        t.internal.set(true);
        ask_bounds(t);
        t.internal.set(false);
    }
    (!t.stack_lo_inv.get(), !t.stack_hi_inv.get())
}

/// Asks glibc for the stack's bounds. What it leaves in this frame is wiped before it returns:
/// a thread that exits leaves its stack to glibc's cache, where a scan reads it whole, and the
/// stack's start found there would keep the stack "reachable by its start".
#[inline(never)]
fn ask_bounds(t: &Thread) {
    let mut attr = [0u64; 8];
    let mut addr: *mut core::ffi::c_void = core::ptr::null_mut();
    let mut size = 0usize;
    // SAFETY: attr is a pthread_attr_t-sized buffer (56 bytes on x86-64), destroyed after use.
    unsafe {
        if getattr(crate::sys::pthread_self(), attr.as_mut_ptr().cast()) == 0 {
            if crate::sys::pthread_attr_getstack(attr.as_ptr().cast(), &mut addr, &mut size) == 0 {
                t.stack_lo_inv.set(!(addr as u64));
                t.stack_hi_inv.set(!(addr as u64 + size as u64));
            }
            crate::sys::pthread_attr_destroy(attr.as_mut_ptr().cast());
        }
        core::ptr::write_volatile(&mut attr, [0; 8]);
        core::ptr::write_volatile(&mut addr, core::ptr::null_mut());
        core::ptr::write_volatile(&mut size, 0);
    }
}

/// pthread_getattr_np below this library, the thread marked as inside it.
///
/// # Safety
/// As pthread_getattr_np.
pub unsafe fn getattr(thread: usize, attr: *mut core::ffi::c_void) -> i32 {
    let f = crate::init::real_late(crate::init::GETATTR);
    if f == 0 {
        return -1;
    }
    let t = get();
    let was = t.in_getattr.replace(true);
    // SAFETY: the C library's pthread_getattr_np, as called.
    let r = unsafe {
        core::mem::transmute::<usize, unsafe extern "C" fn(usize, *mut core::ffi::c_void) -> i32>(f)(thread, attr)
    };
    t.in_getattr.set(was);
    r
}

/// xorshift64*: -s sampling, per thread.
pub fn random(t: &Thread) -> u64 {
    let mut r = t.rng.get();
    if r == 0 {
        r = (crate::sys::monotonic_ns() ^ (t as *const Thread as u64)) | 1;
    }
    r ^= r >> 12;
    r ^= r << 25;
    r ^= r >> 27;
    t.rng.set(r);
    r.wrapping_mul(0x2545_f491_4f6c_dd1d)
}
