//! Asking memleak to publish the process's executable mappings again, when a walk meets code of
//! an object it has no entry for (dlopen, a library libc loads by itself): the allocating thread
//! waits for the answer, so that the stack is whole (a bounded wait: memleak may be gone).
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};

use crate::process::Info;
use crate::sys::*;

/// Objects asked for already (their start): memleak answered without them, don't ask again.
static ASKED: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// How long a thread waits for memleak at most.
const WAIT_NS: u64 = 2_000_000_000;

/// Whether `pc` lies in an object the dynamic linker knows and memleak was asked (and had time)
/// to publish it.
pub fn new_object(p: &Info, pc: u64) -> bool {
    let find = crate::init::FIND_OBJECT.load(Relaxed);
    let key = if find != 0 {
        let mut r = DlFindObject {
            flags: 0,
            map_start: core::ptr::null_mut(),
            map_end: core::ptr::null_mut(),
            link_map: core::ptr::null_mut(),
            eh_frame: core::ptr::null_mut(),
            reserved: [0; 7],
        };
        // SAFETY: glibc's _dl_find_object(pc, result): lock-free and async-signal-safe.
        let f: unsafe extern "C" fn(*mut core::ffi::c_void, *mut DlFindObject) -> i32 =
            unsafe { core::mem::transmute(find) };
        // SAFETY: as above; r is a valid result buffer.
        if unsafe { f(pc as *mut _, &mut r) } != 0 {
            return false; // not an ELF object: JIT code or a bad address
        }
        r.map_start as u64
    } else {
        pc & !0xf_ffff
    };
    // A key per process: a forked child asks again for what its parent asked.
    let key = key ^ u64::from(p.pid) << 48;
    if ASKED.iter().any(|a| a.load(Relaxed) == key) {
        return false;
    }
    ASKED[NEXT.fetch_add(1, Relaxed) % ASKED.len()].store(key, Relaxed);
    request(p);
    true
}

/// Asks memleak to publish the mappings and waits for its answer.
pub fn request(p: &Info) {
    let h = p.header();
    let req = h.sync_req.fetch_add(1, AcqRel).wrapping_add(1);
    let one = 1u8;
    // SAFETY: one byte on the connection (memleak gone: EPIPE, no signal).
    let sent = unsafe {
        syscall6(SYS_SENDTO, p.sock as usize, &one as *const u8 as usize, 1, MSG_NOSIGNAL | MSG_DONTWAIT, 0, 0)
    };
    if sent != 1 {
        return;
    }
    let deadline = monotonic_ns() + WAIT_NS;
    loop {
        let done = h.sync_done.load(Acquire);
        if done.wrapping_sub(req) as i32 >= 0 {
            return;
        }
        let now = monotonic_ns();
        if now >= deadline {
            return;
        }
        let left = (deadline - now).min(100_000_000);
        let ts = Timespec { tv_sec: 0, tv_nsec: left as i64 };
        // SAFETY: waits on the shared futex word while it still holds `done`.
        unsafe {
            syscall6(
                SYS_FUTEX,
                &h.sync_done as *const _ as usize,
                FUTEX_WAIT,
                done as usize,
                &ts as *const _ as usize,
                0,
                0,
            )
        };
    }
}
