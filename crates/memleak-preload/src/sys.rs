//! Raw system calls and the few C functions used. The library's own calls must not go through
//! the functions it interposes, nor allocate, hence the syscall instruction.
use core::arch::asm;
use core::ffi::{c_char, c_int, c_void};

pub const SYS_READ: usize = 0;
pub const SYS_CLOSE: usize = 3;
pub const SYS_FSTAT: usize = 5;
pub const SYS_MMAP: usize = 9;
pub const SYS_MUNMAP: usize = 11;
pub const SYS_SCHED_YIELD: usize = 24;
pub const SYS_MADVISE: usize = 28;
pub const SYS_GETPID: usize = 39;
pub const SYS_SOCKET: usize = 41;
pub const SYS_CONNECT: usize = 42;
pub const SYS_SENDTO: usize = 44;
pub const SYS_RECVMSG: usize = 47;
pub const SYS_SETSOCKOPT: usize = 54;
pub const SYS_OPEN: usize = 2;
pub const SYS_FUTEX: usize = 202;
pub const SYS_PROCESS_VM_READV: usize = 310;

pub const PROT_READ: usize = 1;
pub const PROT_WRITE: usize = 2;
pub const MAP_SHARED: usize = 1;
pub const MAP_PRIVATE: usize = 2;
pub const MAP_ANONYMOUS: usize = 0x20;
pub const MADV_WIPEONFORK: usize = 18;
pub const FUTEX_WAIT: usize = 0;
pub const EINTR: isize = -4;

pub const AF_UNIX: usize = 1;
pub const SOCK_SEQPACKET: usize = 5;
pub const SOCK_CLOEXEC: usize = 0o2_000_000;
pub const SOL_SOCKET: usize = 1;
pub const SO_RCVTIMEO: usize = 20;
pub const SO_SNDTIMEO: usize = 21;
pub const SCM_RIGHTS: i32 = 1;
pub const MSG_NOSIGNAL: usize = 0x4000;
pub const MSG_DONTWAIT: usize = 0x40;
pub const MSG_CMSG_CLOEXEC: usize = 0x4000_0000;

/// # Safety
/// The caller passes arguments valid for system call `n`.
#[inline(always)]
pub unsafe fn syscall6(n: usize, a1: usize, a2: usize, a3: usize, a4: usize, a5: usize, a6: usize) -> isize {
    let ret: isize;
    // SAFETY: the syscall instruction with the kernel's x86-64 convention; rcx and r11 are
    // clobbered by it.
    unsafe {
        asm!("syscall", inlateout("rax") n as isize => ret, in("rdi") a1, in("rsi") a2, in("rdx") a3,
             in("r10") a4, in("r8") a5, in("r9") a6, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

/// # Safety
/// As [`syscall6`].
#[inline(always)]
pub unsafe fn syscall3(n: usize, a1: usize, a2: usize, a3: usize) -> isize {
    // SAFETY: as the caller promised.
    unsafe { syscall6(n, a1, a2, a3, 0, 0, 0) }
}

/// An anonymous private mapping of `len` bytes, or null.
pub fn map_anon(len: usize) -> *mut u8 {
    // SAFETY: a fresh anonymous mapping touches no existing memory.
    let r = unsafe { syscall6(SYS_MMAP, 0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, usize::MAX, 0) };
    if r < 0 { core::ptr::null_mut() } else { r as *mut u8 }
}

pub fn getpid() -> u32 {
    // SAFETY: getpid has no arguments.
    unsafe { syscall3(SYS_GETPID, 0, 0, 0) as u32 }
}

pub fn close(fd: i32) {
    // SAFETY: closes a descriptor of the library's own.
    unsafe { syscall3(SYS_CLOSE, fd as usize, 0, 0) };
}

/// The thread pointer (fs base): glibc keeps the TCB's address at %fs:0.
#[inline(always)]
pub fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: reads the TCB's self pointer, present in every glibc thread.
    unsafe { asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags)) };
    tp
}

#[repr(C)]
pub struct Timespec {
    pub tv_sec: i64,
    pub tv_nsec: i64,
}

#[repr(C)]
pub struct Timeval {
    pub tv_sec: i64,
    pub tv_usec: i64,
}

#[repr(C)]
pub struct DlFindObject {
    pub flags: u64,
    pub map_start: *mut c_void,
    pub map_end: *mut c_void,
    pub link_map: *mut c_void,
    pub eh_frame: *mut c_void,
    pub reserved: [u64; 7],
}

#[repr(C)]
pub struct IoVec {
    pub base: *mut c_void,
    pub len: usize,
}

#[repr(C)]
pub struct SockaddrUn {
    pub family: u16,
    pub path: [u8; 108],
}

#[repr(C)]
pub struct MsgHdr {
    pub name: *mut c_void,
    pub namelen: u32,
    pub iov: *mut IoVec,
    pub iovlen: usize,
    pub control: *mut c_void,
    pub controllen: usize,
    pub flags: i32,
}

/// A control message header (struct cmsghdr) followed by its data.
#[repr(C)]
pub struct CmsgFds {
    pub len: usize,
    pub level: i32,
    pub kind: i32,
    pub fds: [i32; 2],
}

/// struct stat, as x86-64 lays it out (only st_ino and st_size are read).
#[repr(C)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub pad0: u32,
    pub rdev: u64,
    pub size: i64,
    pub blksize: i64,
    pub blocks: i64,
    pub times: [u64; 6],
    pub unused: [i64; 3],
}

unsafe extern "C" {
    pub fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void;
    pub fn clock_gettime(clock: c_int, ts: *mut Timespec) -> c_int;
    pub fn pthread_self() -> usize;
    pub fn pthread_attr_getstack(attr: *const c_void, addr: *mut *mut c_void, size: *mut usize) -> c_int;
    pub fn pthread_attr_destroy(attr: *mut c_void) -> c_int;
    pub fn write(fd: c_int, buf: *const c_void, n: usize) -> isize;
    pub fn abort() -> !;
    pub static mut environ: *const *const c_char;
}

pub const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
pub const RTLD_DEFAULT: *mut c_void = core::ptr::null_mut();
pub const CLOCK_MONOTONIC: c_int = 1;

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
#[inline]
pub fn monotonic_ns() -> u64 {
    let mut ts = Timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec (the vDSO answers without a trap).
    unsafe { clock_gettime(CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
