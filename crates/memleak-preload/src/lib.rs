//! memleak's in-process capture (docs/in-process-capture.md): an LD_PRELOAD library that
//! interposes the allocator's functions, forwards each call to the allocator below it
//! (dlsym RTLD_NEXT), and records outstanding blocks, their sizes, times and stacks into memory
//! shared with memleak, which reads it as it reads the BPF maps. memleak embeds the library and
//! hands it to the command it starts through a memfd; each process connects to memleak for a
//! region of its own.
//!
//! Its own memory never comes from malloc (a global allocator over mmap), its per-thread state
//! is plain ELF TLS, and it panics by aborting.
#![allow(clippy::missing_safety_doc)]
// The interposed functions are left out of the unit tests (the test binary would interpose
// its own malloc): what only they use is dead there.
#![cfg_attr(test, allow(dead_code))]

#[cfg(not(test))]
mod hooks;
mod init;
pub mod layout;
mod process;
mod record;
mod sync;
mod sys;
mod thread;
mod walk;

/// Rust's own allocations in this library (there should be none but a panic's message) go to
/// mmap, never to the malloc it interposes.
struct PageAlloc;

// SAFETY: every block is a fresh anonymous mapping, unmapped by dealloc with the same size.
unsafe impl core::alloc::GlobalAlloc for PageAlloc {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        if layout.align() > 4096 {
            return core::ptr::null_mut();
        }
        sys::map_anon(layout.size().max(1))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: core::alloc::Layout) {
        // SAFETY: ptr is a mapping of this size made by alloc.
        unsafe { sys::syscall3(sys::SYS_MUNMAP, ptr as usize, layout.size().max(1), 0) };
    }
}

/// Says why on stderr and aborts (the C++ runtime would have thrown, and cannot be reached).
#[cfg_attr(test, allow(dead_code))]
fn die(msg: &[u8]) -> ! {
    // SAFETY: a write of the message to stderr, then abort.
    unsafe {
        sys::write(2, msg.as_ptr().cast(), msg.len());
        sys::abort()
    }
}

/// Runs when the library is loaded, not only at the first allocation: the process connects to
/// memleak before the program's own constructors run.
#[cfg(not(test))]
#[used]
#[unsafe(link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = {
    extern "C" fn constructor() {
        if init::ready() {
            let _ = process::current();
        }
    }
    constructor
};

#[cfg(not(test))]
#[global_allocator]
static ALLOC: PageAlloc = PageAlloc;
