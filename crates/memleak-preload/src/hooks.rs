//! The interposed functions: the C library's malloc family, glibc's `__libc_*` names and C++'s
//! operator new and delete. Each allocating name is a trampoline that hands the implementation
//! the stack pointer and frame pointer at its entry (the stack there is exactly the caller's,
//! as at a uprobe on the allocator's first instruction) and jumps to it, so the implementation
//! returns straight to the caller. mmap, munmap, mremap and mprotect are not interposed: uprobes
//! trace them (docs/in-process-capture.md, "The hybrid").
use core::ffi::c_void;
use core::mem::transmute;

use crate::init::{self, arena_alloc, arena_size, in_arena, ready, real, real_late};
use crate::layout::*;
use crate::process::{self, Info};
use crate::record::{self, Rec};
use crate::thread::{self, Thread};

/// Defines `$name` (at most four arguments) as a trampoline to `$imp`, which takes four
/// arguments then the stack pointer and frame pointer at the entry (r8, r9). When `$imp`
/// returns, the stack it used below the caller's frame (`$scrub` bytes) is zeroed: the
/// addresses of blocks its recording handled would otherwise stay in dead frames deeper than
/// the program's own calls reach, and a thread that exits leaves its whole stack, scanned by a
/// reachability scan, to glibc's cache. (Measured: a recorded malloc uses about 680 bytes of
/// stack below its caller, glibc's malloc included; free about 100.)
macro_rules! trampoline {
    ($name:ident, $imp:ident, $scrub:literal) => {
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        pub unsafe extern "C-unwind" fn $name() {
            core::arch::naked_asm!(
                ".cfi_startproc",
                "mov r8, rsp",
                "mov r9, rbp",
                "sub rsp, 8",
                ".cfi_adjust_cfa_offset 8",
                "call {imp}",
                "mov r11, rax",
                concat!("lea rdi, [rsp - ", $scrub, "]"),
                concat!("mov ecx, ", $scrub, " / 8"),
                "xor eax, eax",
                "rep stosq",
                "mov rax, r11",
                "add rsp, 8",
                ".cfi_adjust_cfa_offset -8",
                "ret",
                ".cfi_endproc",
                imp = sym $imp
            )
        }
    };
    ($name:ident, $imp:ident) => {
        trampoline!($name, $imp, 1024);
    };
}

trampoline!(malloc, malloc_imp);
trampoline!(__libc_malloc, libc_malloc_imp);
trampoline!(calloc, calloc_imp);
trampoline!(__libc_calloc, libc_calloc_imp);
trampoline!(realloc, realloc_imp);
trampoline!(__libc_realloc, libc_realloc_imp);
trampoline!(reallocarray, reallocarray_imp);
trampoline!(posix_memalign, posix_memalign_imp);
trampoline!(aligned_alloc, aligned_alloc_imp);
trampoline!(memalign, memalign_imp);
trampoline!(__libc_memalign, libc_memalign_imp);
trampoline!(valloc, valloc_imp);
trampoline!(__libc_valloc, libc_valloc_imp);
trampoline!(pvalloc, pvalloc_imp);
trampoline!(__libc_pvalloc, libc_pvalloc_imp);
// operator new and new[]: (size), (size, nothrow), (size, align), (size, align, nothrow).
trampoline!(_Znwm, new0_imp);
trampoline!(_Znam, new1_imp);
trampoline!(_ZnwmRKSt9nothrow_t, new2_imp);
trampoline!(_ZnamRKSt9nothrow_t, new3_imp);
trampoline!(_ZnwmSt11align_val_t, new4_imp);
trampoline!(_ZnamSt11align_val_t, new5_imp);
trampoline!(_ZnwmSt11align_val_tRKSt9nothrow_t, new6_imp);
trampoline!(_ZnamSt11align_val_tRKSt9nothrow_t, new7_imp);

/// The program's own pthread_getattr_np: it holds the thread's lock while it allocates, so the
/// allocations it makes must not ask for the stack bounds (which would take the lock again).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_getattr_np(th: usize, attr: *mut c_void) -> i32 {
    // SAFETY: forwarded as called.
    unsafe { thread::getattr(th, attr) }
}

type Fn1 = unsafe extern "C" fn(usize) -> *mut c_void;
type Fn2 = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type Fn3 = unsafe extern "C" fn(usize, usize, usize) -> *mut c_void;
/// Operator new: it may throw.
type Fn3U = unsafe extern "C-unwind" fn(usize, usize, usize) -> *mut c_void;
type FreeFn = unsafe extern "C-unwind" fn(*mut c_void, usize, usize);
type PmFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> i32;

/// The stack of the allocator call whose entry had `sp` and `bp`, stored with an allocation of
/// `size` bytes counted on it.
fn capture(p: &Info, t: &Thread, sp: usize, bp: usize, size: u64) -> u64 {
    let bounds = thread::stack_bounds(t);
    let (w, id) = if t.busy.get() {
        capture_nested(p, bounds, sp, bp, size)
    } else {
        t.busy.set(true);
        // SAFETY: the cache and frames are this thread's, used only while busy is set (a
        // nested call takes the branch above).
        let (cache, frames) = unsafe { (&mut *t.cache.get(), &mut *t.frames.get()) };
        let w = crate::walk::walk(p, bounds, cache, sp as u64, bp as u64, frames);
        let id = record::store_stack(p, &frames.ips[..w.depth], &frames.locs[..w.depth], w.truncated, size);
        t.busy.set(false);
        (w, id)
    };
    if p.settings.flags & FLAG_FRAME_POINTERS == 0 {
        record::count(p, CNT_UNWINDS);
        if w.stop != 0 {
            record::count(p, w.stop);
        }
    }
    id
}

/// A signal handler's call inside this library's bookkeeping: buffers of its own, on its stack
/// (apart, so that the usual call does not reserve them).
#[inline(never)]
#[cold]
fn capture_nested(p: &Info, bounds: (u64, u64), sp: usize, bp: usize, size: u64) -> (crate::walk::Walked, u64) {
    let mut frames = thread::Frames::NEW;
    let mut cache = thread::MapCache::NEW;
    let w = crate::walk::walk(p, bounds, &mut cache, sp as u64, bp as u64, &mut frames);
    let id = record::store_stack(p, &frames.ips[..w.depth], &frames.locs[..w.depth], w.truncated, size);
    (w, id)
}

/// Whether a call entered at `sp` is nested in the allocator call in flight on this thread
/// (or this library's own libc calls).
#[inline(always)]
fn nested(t: &Thread, sp: usize) -> bool {
    let outer = t.call_sp.get();
    (outer != 0 && sp as u64 <= outer) || t.internal.get()
}

/// The call's record, decided before it is forwarded (the sizes and sampling, then the stack):
/// as memleak.bpf.c does at the entry.
#[inline(always)]
fn entry(p: &Info, t: &Thread, size: u64, sp: usize, bp: usize) -> Option<Rec> {
    if p.header().seen.load(core::sync::atomic::Ordering::Relaxed) == 0 {
        p.header().seen.store(1, core::sync::atomic::Ordering::Relaxed);
    }
    if !record::sampled_in(p, t, size) {
        return None;
    }
    Some(Rec { size, timestamp_ns: 0, stack_id: capture(p, t, sp, bp, size) })
}

/// After an allocation call returned `addr`: its record (memleak.bpf.c's on_return).
#[inline(always)]
fn returned(p: &Info, addr: u64, rec: Option<Rec>) {
    if addr == 0 {
        // Nothing was allocated: the stack's allocation count says so.
        if let Some(r) = rec {
            record::uncount_alloc(p, r.stack_id, r.size);
        }
        return;
    }
    if p.settings.flags & FLAG_WA_MISSING_FREE != 0 {
        record::free(p, addr);
    }
    if let Some(mut r) = rec {
        r.timestamp_ns = crate::sys::monotonic_ns();
        record::insert(p, addr, r);
    }
}

/// An allocation call: forwarded, and recorded unless it is nested in another allocator call.
#[inline(always)]
fn alloc_call(size: u64, sp: usize, bp: usize, call: impl FnOnce() -> *mut c_void) -> *mut c_void {
    let Some(p) = process::current() else { return call() };
    let t = thread::get();
    if nested(t, sp) {
        return call();
    }
    t.call_sp.set(sp as u64);
    let rec = entry(p, t, size, sp, bp);
    let q = call();
    t.call_sp.set(0);
    returned(p, q as u64, rec);
    q
}

unsafe extern "C" fn malloc_imp(size: usize, _: usize, _: usize, _: usize, sp: usize, bp: usize) -> *mut c_void {
    malloc_via(init::MALLOC, size, sp, bp)
}

unsafe extern "C" fn libc_malloc_imp(size: usize, _: usize, _: usize, _: usize, sp: usize, bp: usize) -> *mut c_void {
    malloc_via(init::LIBC_MALLOC, size, sp, bp)
}

#[inline(always)]
fn malloc_via(which: usize, size: usize, sp: usize, bp: usize) -> *mut c_void {
    alloc_via(which, size, 16, sp, bp)
}

/// malloc, valloc and pvalloc (`align`: what a block made before set-up gets).
#[inline(always)]
fn alloc_via(which: usize, size: usize, align: usize, sp: usize, bp: usize) -> *mut c_void {
    if !ready() {
        return arena_alloc(size, align);
    }
    // SAFETY: the allocator's function of that name, resolved by init.
    let f: Fn1 = unsafe { transmute(real(which)) };
    // SAFETY: forwarded as called.
    alloc_call(size as u64, sp, bp, || unsafe { f(size) })
}

unsafe extern "C" fn calloc_imp(n: usize, size: usize, _: usize, _: usize, sp: usize, bp: usize) -> *mut c_void {
    calloc_via(init::CALLOC, n, size, sp, bp)
}

unsafe extern "C" fn libc_calloc_imp(n: usize, size: usize, _: usize, _: usize, sp: usize, bp: usize) -> *mut c_void {
    calloc_via(init::LIBC_CALLOC, n, size, sp, bp)
}

#[inline(always)]
fn calloc_via(which: usize, n: usize, size: usize, sp: usize, bp: usize) -> *mut c_void {
    if !ready() {
        // Zeroed: the arena is never reused.
        return n.checked_mul(size).map_or(core::ptr::null_mut(), |b| arena_alloc(b, 16));
    }
    // SAFETY: as malloc_via.
    let f: Fn2 = unsafe { transmute(real(which)) };
    // SAFETY: forwarded as called.
    alloc_call((n as u64).wrapping_mul(size as u64), sp, bp, || unsafe { f(n, size) })
}

unsafe extern "C" fn realloc_imp(p: *mut c_void, size: usize, _: usize, _: usize, sp: usize, bp: usize) -> *mut c_void {
    realloc_via(init::REALLOC, p, size as u64, sp, bp, |f, p| {
        // SAFETY: the allocator's realloc, as called.
        unsafe { transmute::<usize, Fn2>(f)(p as usize, size) }
    })
}

unsafe extern "C" fn libc_realloc_imp(
    p: *mut c_void,
    size: usize,
    _: usize,
    _: usize,
    sp: usize,
    bp: usize,
) -> *mut c_void {
    realloc_via(init::LIBC_REALLOC, p, size as u64, sp, bp, |f, p| {
        // SAFETY: as above.
        unsafe { transmute::<usize, Fn2>(f)(p as usize, size) }
    })
}

unsafe extern "C" fn reallocarray_imp(
    p: *mut c_void,
    n: usize,
    size: usize,
    _: usize,
    sp: usize,
    bp: usize,
) -> *mut c_void {
    let total = (n as u64).wrapping_mul(size as u64);
    realloc_via(init::REALLOCARRAY, p, total, sp, bp, |f, p| {
        if f == 0 {
            // No reallocarray below: realloc, with its overflow check.
            return match n.checked_mul(size) {
                // SAFETY: the allocator's realloc.
                Some(b) => unsafe { transmute::<usize, Fn2>(real(init::REALLOC))(p as usize, b) },
                None => core::ptr::null_mut(),
            };
        }
        // SAFETY: the allocator's reallocarray, as called.
        unsafe { transmute::<usize, Fn3>(f)(p as usize, n, size) }
    })
}

/// realloc and reallocarray: the old block's record ends before the call (another thread may
/// get its address as soon as it is freed) and comes back if the call fails.
#[inline(always)]
fn realloc_via(
    which: usize,
    old: *mut c_void,
    size: u64,
    sp: usize,
    bp: usize,
    call: impl FnOnce(usize, *mut c_void) -> *mut c_void,
) -> *mut c_void {
    if !ready() || in_arena(old) {
        // A block of the bootstrap arena (or none while init runs): copied to a new block.
        let q = if ready() {
            // SAFETY: the allocator's malloc.
            unsafe { transmute::<usize, Fn1>(real(init::MALLOC))(size as usize) }
        } else {
            arena_alloc(size as usize, 16)
        };
        if !q.is_null() && !old.is_null() {
            let n = arena_size(old).min(size as usize);
            // SAFETY: both blocks hold at least n bytes.
            unsafe { core::ptr::copy_nonoverlapping(old as *const u8, q as *mut u8, n) };
        }
        return q;
    }
    let f = real(which);
    let Some(p) = process::current() else { return call(f, old) };
    let t = thread::get();
    if nested(t, sp) {
        return call(f, old);
    }
    let taken = if old.is_null() { None } else { record::take(p, old as u64) };
    t.call_sp.set(sp as u64);
    let rec = entry(p, t, size, sp, bp);
    let q = call(f, old);
    t.call_sp.set(0);
    if let Some(r) = taken {
        // realloc(p, 0) frees p and returns NULL; a failed realloc leaves p alone.
        if !q.is_null() || size == 0 {
            record::freed(p, old as u64, &r);
        } else {
            record::restore(p, old as u64, r);
        }
    }
    returned(p, q as u64, rec);
    q
}

unsafe extern "C" fn posix_memalign_imp(
    out: *mut *mut c_void,
    align: usize,
    size: usize,
    _: usize,
    sp: usize,
    bp: usize,
) -> i32 {
    if !ready() {
        let p = arena_alloc(size, align);
        if p.is_null() {
            return 12; // ENOMEM
        }
        // SAFETY: the caller's pointer to store the block at.
        unsafe { *out = p };
        return 0;
    }
    // SAFETY: the allocator's posix_memalign.
    let f: PmFn = unsafe { transmute(real(init::POSIX_MEMALIGN)) };
    let Some(p) = process::current() else {
        // SAFETY: forwarded as called.
        return unsafe { f(out, align, size) };
    };
    let t = thread::get();
    if nested(t, sp) {
        // SAFETY: forwarded as called.
        return unsafe { f(out, align, size) };
    }
    t.call_sp.set(sp as u64);
    let rec = entry(p, t, size as u64, sp, bp);
    // SAFETY: forwarded as called.
    let r = unsafe { f(out, align, size) };
    t.call_sp.set(0);
    // SAFETY: posix_memalign succeeded: *out holds the block.
    let block = if r == 0 { (unsafe { *out }) as u64 } else { 0 };
    returned(p, block, rec);
    r
}

fn aligned_via(which: usize, align: usize, size: usize, sp: usize, bp: usize) -> *mut c_void {
    if !ready() {
        return arena_alloc(size, align);
    }
    // SAFETY: the allocator's function of that name.
    let f: Fn2 = unsafe { transmute(real(which)) };
    // SAFETY: forwarded as called.
    alloc_call(size as u64, sp, bp, || unsafe { f(align, size) })
}

unsafe extern "C" fn aligned_alloc_imp(
    align: usize,
    size: usize,
    _: usize,
    _: usize,
    sp: usize,
    bp: usize,
) -> *mut c_void {
    aligned_via(init::ALIGNED_ALLOC, align, size, sp, bp)
}

unsafe extern "C" fn memalign_imp(align: usize, size: usize, _: usize, _: usize, sp: usize, bp: usize) -> *mut c_void {
    aligned_via(init::MEMALIGN, align, size, sp, bp)
}

unsafe extern "C" fn libc_memalign_imp(
    align: usize,
    size: usize,
    _: usize,
    _: usize,
    sp: usize,
    bp: usize,
) -> *mut c_void {
    aligned_via(init::LIBC_MEMALIGN, align, size, sp, bp)
}

unsafe extern "C" fn valloc_imp(size: usize, _: usize, _: usize, _: usize, sp: usize, bp: usize) -> *mut c_void {
    alloc_via(init::VALLOC, size, 4096, sp, bp)
}

unsafe extern "C" fn libc_valloc_imp(size: usize, _: usize, _: usize, _: usize, sp: usize, bp: usize) -> *mut c_void {
    alloc_via(init::LIBC_VALLOC, size, 4096, sp, bp)
}

unsafe extern "C" fn pvalloc_imp(size: usize, _: usize, _: usize, _: usize, sp: usize, bp: usize) -> *mut c_void {
    alloc_via(init::PVALLOC, size, 4096, sp, bp)
}

unsafe extern "C" fn libc_pvalloc_imp(size: usize, _: usize, _: usize, _: usize, sp: usize, bp: usize) -> *mut c_void {
    alloc_via(init::LIBC_PVALLOC, size, 4096, sp, bp)
}

// ---- operator new: `form` 0-7 as NAMES orders them (bit 0: new[], bit 1: nothrow... see below).

/// operator new, form `i` (index from init::NEW): whether it takes an alignment, whether it
/// throws.
const fn new_form(i: usize) -> (bool, bool) {
    // _Znwm _Znam, nothrow x2, align x2, align nothrow x2.
    let aligned = i >= 4;
    let nothrow = i == 2 || i == 3 || i >= 6;
    (aligned, nothrow)
}

/// `std::nothrow`'s stand-in: the nothrow forms only take its address.
static NOTHROW: u8 = 0;

#[inline(always)]
fn new_via(i: usize, size: usize, a1: usize, a2: usize, sp: usize, bp: usize) -> *mut c_void {
    let (aligned, nothrow) = new_form(i);
    let align = if aligned { a1 } else { 16 };
    if !ready() {
        return arena_alloc(size, align);
    }
    let f = real_late(init::NEW + i);
    if !nothrow && process::current().is_some() && !nested(thread::get(), sp) {
        // A throwing form: an exception thrown through this call would leave it marked in flight
        // (nothing here runs when one passes), and every later call of the thread would look
        // nested in it. So the real nothrow form allocates; only when it fails does the
        // throwing one run, outside any recorded call, to throw (its new-handler runs again).
        let g = real_late(init::NEW + i + 2);
        if g != 0 {
            let nt = &NOTHROW as *const u8 as usize;
            let q = alloc_call(size as u64, sp, bp, || {
                // SAFETY: the C++ runtime's nothrow operator new, with its arguments.
                unsafe {
                    if aligned {
                        transmute::<usize, Fn3U>(g)(size, align, nt)
                    } else {
                        transmute::<usize, Fn3U>(g)(size, nt, 0)
                    }
                }
            });
            if !q.is_null() {
                return q;
            }
            // SAFETY: the throwing form, as called: it throws, or its new-handler found memory
            // (then the block goes unrecorded, what it allocated below it recorded instead).
            return unsafe { transmute::<usize, Fn3U>(f)(size, a1, a2) };
        }
    }
    alloc_call(size as u64, sp, bp, || {
        if f != 0 {
            // SAFETY: the C++ runtime's (or the allocator's) operator new, as called.
            return unsafe { transmute::<usize, Fn3U>(f)(size, a1, a2) };
        }
        // No operator new below (nothing loaded libstdc++ into the global scope): the C
        // allocator, and an abort where the C++ runtime would throw.
        // SAFETY: the allocator's own functions.
        let q = unsafe {
            if aligned {
                transmute::<usize, Fn2>(real(init::ALIGNED_ALLOC))(align, size.next_multiple_of(align.max(1)))
            } else {
                transmute::<usize, Fn1>(real(init::MALLOC))(size.max(1))
            }
        };
        if q.is_null() && !nothrow {
            crate::die(b"memleak preload: operator new: out of memory and no C++ runtime to throw\n");
        }
        q
    })
}

macro_rules! new_imp {
    ($imp:ident, $i:expr) => {
        unsafe extern "C-unwind" fn $imp(
            size: usize,
            a1: usize,
            a2: usize,
            _: usize,
            sp: usize,
            bp: usize,
        ) -> *mut c_void {
            new_via($i, size, a1, a2, sp, bp)
        }
    };
}

new_imp!(new0_imp, 0);
new_imp!(new1_imp, 1);
new_imp!(new2_imp, 2);
new_imp!(new3_imp, 3);
new_imp!(new4_imp, 4);
new_imp!(new5_imp, 5);
new_imp!(new6_imp, 6);
new_imp!(new7_imp, 7);

// ---- free and operator delete: no stack, no per-thread state (as in BPF).

/// free, cfree, operator delete: the record ends before the block goes back (its address may
/// be handed out again at once). `which`'s function is called with the same arguments.
#[inline(always)]
fn free_via(which: usize, p: *mut c_void, a1: usize, a2: usize) {
    if p.is_null() || in_arena(p) || !ready() {
        return;
    }
    if let Some(info) = process::current() {
        record::free(info, p as u64);
    }
    let f = if which >= init::DELETE { real_late(which) } else { real(which) };
    // SAFETY: the allocator's function of that name, as called (extra arguments are ignored
    // by a function that takes fewer); free if there is no operator delete below.
    unsafe {
        if f != 0 {
            transmute::<usize, FreeFn>(f)(p, a1, a2)
        } else {
            transmute::<usize, FreeFn>(real(init::FREE))(p, 0, 0)
        }
    }
}

macro_rules! free_fn {
    ($name:ident, $imp:ident, $which:expr) => {
        unsafe extern "C-unwind" fn $imp(p: *mut c_void, a1: usize, a2: usize, _: usize, _: usize, _: usize) {
            free_via($which, p, a1, a2)
        }
        trampoline!($name, $imp, 256);
    };
}

free_fn!(free, free_imp, init::FREE);
free_fn!(cfree, cfree_imp, init::CFREE);
free_fn!(__libc_free, libc_free_imp, init::LIBC_FREE);
free_fn!(_ZdlPv, delete0_imp, init::DELETE);
free_fn!(_ZdaPv, delete1_imp, init::DELETE + 1);
free_fn!(_ZdlPvm, delete2_imp, init::DELETE + 2);
free_fn!(_ZdaPvm, delete3_imp, init::DELETE + 3);
free_fn!(_ZdlPvSt11align_val_t, delete4_imp, init::DELETE + 4);
free_fn!(_ZdaPvSt11align_val_t, delete5_imp, init::DELETE + 5);
free_fn!(_ZdlPvmSt11align_val_t, delete6_imp, init::DELETE + 6);
free_fn!(_ZdaPvmSt11align_val_t, delete7_imp, init::DELETE + 7);
free_fn!(_ZdlPvRKSt9nothrow_t, delete8_imp, init::DELETE + 8);
free_fn!(_ZdaPvRKSt9nothrow_t, delete9_imp, init::DELETE + 9);
free_fn!(_ZdlPvSt11align_val_tRKSt9nothrow_t, delete10_imp, init::DELETE + 10);
free_fn!(_ZdaPvSt11align_val_tRKSt9nothrow_t, delete11_imp, init::DELETE + 11);
