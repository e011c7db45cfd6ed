//! Start-up of the library in an image: the functions below it (dlsym RTLD_NEXT, with a
//! bootstrap arena for what dlsym itself allocates). Per-process state (memleak's region) is
//! process.rs's.
use core::ffi::c_void;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering::*};

use crate::sys::*;

/// The functions below this library, by the position of their name in [`NAMES`].
pub const MALLOC: usize = 0;
pub const CALLOC: usize = 1;
pub const REALLOC: usize = 2;
pub const REALLOCARRAY: usize = 3;
pub const POSIX_MEMALIGN: usize = 4;
pub const ALIGNED_ALLOC: usize = 5;
pub const MEMALIGN: usize = 6;
pub const VALLOC: usize = 7;
pub const PVALLOC: usize = 8;
pub const FREE: usize = 9;
pub const CFREE: usize = 10;
pub const LIBC_MALLOC: usize = 11;
pub const LIBC_CALLOC: usize = 12;
pub const LIBC_REALLOC: usize = 13;
pub const LIBC_FREE: usize = 14;
pub const LIBC_MEMALIGN: usize = 15;
pub const LIBC_VALLOC: usize = 16;
pub const LIBC_PVALLOC: usize = 17;
pub const GETATTR: usize = 18;
/// C++: operator new and new[] (plain, nothrow, aligned, aligned nothrow), then operator delete
/// and delete[] in their 12 forms.
pub const NEW: usize = 19;
pub const NEW_FORMS: usize = 8;
pub const DELETE: usize = NEW + NEW_FORMS;
pub const DELETE_FORMS: usize = 12;
pub const COUNT: usize = DELETE + DELETE_FORMS;

pub const NAMES: [&[u8]; COUNT] = [
    b"malloc\0",
    b"calloc\0",
    b"realloc\0",
    b"reallocarray\0",
    b"posix_memalign\0",
    b"aligned_alloc\0",
    b"memalign\0",
    b"valloc\0",
    b"pvalloc\0",
    b"free\0",
    b"cfree\0",
    b"__libc_malloc\0",
    b"__libc_calloc\0",
    b"__libc_realloc\0",
    b"__libc_free\0",
    b"__libc_memalign\0",
    b"__libc_valloc\0",
    b"__libc_pvalloc\0",
    b"pthread_getattr_np\0",
    // operator new: size; size, nothrow; size, align; size, align, nothrow.
    b"_Znwm\0",
    b"_Znam\0",
    b"_ZnwmRKSt9nothrow_t\0",
    b"_ZnamRKSt9nothrow_t\0",
    b"_ZnwmSt11align_val_t\0",
    b"_ZnamSt11align_val_t\0",
    b"_ZnwmSt11align_val_tRKSt9nothrow_t\0",
    b"_ZnamSt11align_val_tRKSt9nothrow_t\0",
    // operator delete.
    b"_ZdlPv\0",
    b"_ZdaPv\0",
    b"_ZdlPvm\0",
    b"_ZdaPvm\0",
    b"_ZdlPvSt11align_val_t\0",
    b"_ZdaPvSt11align_val_t\0",
    b"_ZdlPvmSt11align_val_t\0",
    b"_ZdaPvmSt11align_val_t\0",
    b"_ZdlPvRKSt9nothrow_t\0",
    b"_ZdaPvRKSt9nothrow_t\0",
    b"_ZdlPvSt11align_val_tRKSt9nothrow_t\0",
    b"_ZdaPvSt11align_val_tRKSt9nothrow_t\0",
];

/// A name the allocator below lacks forwards to this counterpart (a `__libc_*` name to the
/// plain one, cfree to free).
const fn fallback(i: usize) -> usize {
    match i {
        CFREE => FREE,
        LIBC_MALLOC => MALLOC,
        LIBC_CALLOC => CALLOC,
        LIBC_REALLOC => REALLOC,
        LIBC_FREE => FREE,
        LIBC_MEMALIGN => MEMALIGN,
        LIBC_VALLOC => VALLOC,
        LIBC_PVALLOC => PVALLOC,
        _ => i,
    }
}

static REAL: [AtomicUsize; COUNT] = [const { AtomicUsize::new(0) }; COUNT];
/// glibc's _dl_find_object (2.35+), or 0.
pub static FIND_OBJECT: AtomicUsize = AtomicUsize::new(0);

const INIT_NONE: u32 = 0;
const INIT_RUNNING: u32 = 1;
const INIT_DONE: u32 = 2;
static INIT: AtomicU32 = AtomicU32::new(INIT_NONE);

/// The function below this library; 0 when there is none.
#[inline(always)]
pub fn real(i: usize) -> usize {
    REAL[i].load(Relaxed)
}

/// The function below this library, looked up again if it was not there at start (a library
/// loaded since: libstdc++ by dlopen); 0 when there is none.
pub fn real_late(i: usize) -> usize {
    let f = real(i);
    if f != 0 {
        return f;
    }
    // SAFETY: a NUL-terminated name.
    let f = unsafe { dlsym(RTLD_NEXT, NAMES[i].as_ptr().cast()) } as usize;
    if f != 0 {
        REAL[i].store(f, Relaxed);
    }
    f
}

/// Makes sure the functions below are resolved. Returns false while that runs on this thread
/// (dlsym allocating): the caller serves the call from the bootstrap arena.
#[inline(always)]
pub fn ready() -> bool {
    INIT.load(Acquire) == INIT_DONE || init_slow()
}

#[cold]
fn init_slow() -> bool {
    loop {
        match INIT.compare_exchange(INIT_NONE, INIT_RUNNING, Acquire, Acquire) {
            Ok(_) => {
                crate::thread::get().in_init.set(true);
                resolve();
                crate::thread::get().in_init.set(false);
                INIT.store(INIT_DONE, Release);
                return true;
            }
            Err(INIT_DONE) => return true,
            Err(_) => {
                if crate::thread::get().in_init.get() {
                    return false;
                }
                // Another thread resolves the functions: wait for it.
                // SAFETY: sched_yield has no arguments.
                unsafe { syscall3(SYS_SCHED_YIELD, 0, 0, 0) };
            }
        }
    }
}

/// Resolves every function below (run once, by the thread that won INIT_RUNNING).
fn resolve() {
    for (i, name) in NAMES.iter().enumerate() {
        // SAFETY: NUL-terminated names.
        let f = unsafe { dlsym(RTLD_NEXT, name.as_ptr().cast()) } as usize;
        REAL[i].store(f, Relaxed);
    }
    for (i, slot) in REAL.iter().enumerate() {
        if real(i) == 0 && fallback(i) != i {
            slot.store(real(fallback(i)), Relaxed);
        }
    }
    // SAFETY: a NUL-terminated name; the function is looked up anywhere.
    let f = unsafe { dlsym(RTLD_DEFAULT, c"_dl_find_object".as_ptr()) } as usize;
    FIND_OBJECT.store(f, Relaxed);
}

// ---- The bootstrap arena: what dlsym allocates while the functions are resolved.

const ARENA: usize = 256 * 1024;
#[repr(align(16))]
struct Arena(core::cell::UnsafeCell<[u8; ARENA]>);
// SAFETY: bump allocation through an atomic offset: each block is handed out once.
unsafe impl Sync for Arena {}
static ARENA_MEM: Arena = Arena(core::cell::UnsafeCell::new([0; ARENA]));
static ARENA_USED: AtomicUsize = AtomicUsize::new(0);

/// A block from the arena, 16 bytes after a header holding its size; null when exhausted.
pub fn arena_alloc(size: usize, align: usize) -> *mut c_void {
    let align = align.clamp(16, 4096).next_power_of_two();
    let need = match size.checked_add(align + 16) {
        Some(n) => n,
        None => return null_mut(),
    };
    let start = ARENA_USED.fetch_add(need, Relaxed);
    if start.saturating_add(need) > ARENA {
        return null_mut();
    }
    let base = ARENA_MEM.0.get() as usize;
    let p = (base + start + 16).next_multiple_of(align);
    // SAFETY: p - 8 and p lie inside this block of the arena.
    unsafe { *((p - 8) as *mut usize) = size };
    p as *mut c_void
}

pub fn in_arena(p: *mut c_void) -> bool {
    let base = ARENA_MEM.0.get() as usize;
    (p as usize) >= base && (p as usize) < base + ARENA
}

/// The size of an arena block.
pub fn arena_size(p: *mut c_void) -> usize {
    // SAFETY: p came from arena_alloc, which wrote its size right before it.
    unsafe { *((p as usize - 8) as *const usize) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_blocks_are_aligned_zeroed_and_know_their_size() {
        let a = arena_alloc(100, 16);
        let b = arena_alloc(10, 4096);
        assert!(!a.is_null() && !b.is_null());
        assert_eq!(a as usize % 16, 0);
        assert_eq!(b as usize % 4096, 0);
        assert!(in_arena(a) && in_arena(b) && !in_arena(core::ptr::null_mut()));
        assert_eq!((arena_size(a), arena_size(b)), (100, 10));
        // SAFETY: a holds 100 bytes.
        assert!(unsafe { core::slice::from_raw_parts(a as *const u8, 100) }.iter().all(|&x| x == 0));
        assert!(arena_alloc(usize::MAX - 8, 16).is_null());
    }

    #[test]
    fn the_names_resolved_are_those_said_to_be_interposed() {
        let names: Vec<&[u8]> =
            NAMES.iter().filter(|n| **n != b"pthread_getattr_np\0").map(|n| &n[..n.len() - 1]).collect();
        let said: Vec<&[u8]> = crate::layout::INTERPOSED.iter().map(|n| n.as_bytes()).collect();
        assert_eq!(names, said);
    }

    #[test]
    fn every_name_is_nul_terminated_and_fallbacks_are_plain_names() {
        for n in NAMES {
            assert_eq!(n.iter().filter(|&&b| b == 0).count(), 1);
            assert_eq!(n.last(), Some(&0));
        }
        for i in 0..COUNT {
            assert_eq!(fallback(fallback(i)), fallback(i));
        }
    }
}
