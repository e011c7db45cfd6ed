//! This process's part: the region memleak hands over on a connection the library opens to it
//! (an abstract unix socket named in the environment, so descriptors the program closed do not
//! matter; the kernel tells memleak who connected). A forked child connects again and gets a
//! region of its own: the state that says "set up" lives in a page the kernel wipes in a forked
//! child (MADV_WIPEONFORK), so the child never writes its parent's records.
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::*};

use crate::layout::*;
use crate::sys::*;

/// What the region and tables hold, checked once; read-only afterwards.
pub struct Info {
    pub pid: u32,
    pub header: *const RegionHeader,
    /// The header's settings, copied (sample_rate at least 1).
    pub settings: Settings,
    pub alloc_keys: *const AtomicU64,
    pub alloc_infos: *const BlockInfo,
    pub alloc_mask: u64,
    pub stack_index: *const StackSlot,
    pub stack_mask: u64,
    pub stacks: *mut StackEntry,
    pub max_stacks: u64,
    pub combined: *const Combined,
    pub events: *mut Event,
    pub ev_mask: u64,
    pub mapents: *const MapEntry,
    pub max_maps: u32,
    pub rules: *const Rule,
    pub max_rules: u32,
    pub pages: *const Page,
    pub max_pages: u32,
    pub rows: *const u32,
    pub max_rows: u32,
    /// The connection to memleak (requests for the mappings go there).
    pub sock: i32,
}

impl Info {
    #[inline(always)]
    pub fn header(&self) -> &RegionHeader {
        // SAFETY: the region stays mapped for the life of the process.
        unsafe { &*self.header }
    }
}

const NONE: u32 = 0;
const SETTING_UP: u32 = 1;
const RECORDING: u32 = 2;
const FORWARD_ONLY: u32 = 3;

/// The page wiped in a forked child: the state word, then the Info.
#[repr(C)]
struct StatePage {
    state: AtomicU32,
    info: core::cell::UnsafeCell<Info>,
}

impl StatePage {
    fn info(&self) -> &Info {
        // SAFETY: written only by the thread that set it up, before RECORDING was published.
        unsafe { &*self.info.get() }
    }
}

static PAGE: AtomicUsize = AtomicUsize::new(0);

/// What the last set-up mapped, kept where fork does not wipe it: a forked child unmaps its
/// parent's region and closes its parent's connection before it asks for its own.
struct Shadow {
    pid: AtomicU32,
    region: AtomicUsize,
    region_len: AtomicUsize,
    tables: AtomicUsize,
    tables_len: AtomicUsize,
    sock: AtomicU32,
    sock_ino: AtomicU64,
}

static SHADOW: Shadow = Shadow {
    pid: AtomicU32::new(0),
    region: AtomicUsize::new(0),
    region_len: AtomicUsize::new(0),
    tables: AtomicUsize::new(0),
    tables_len: AtomicUsize::new(0),
    sock: AtomicU32::new(u32::MAX),
    sock_ino: AtomicU64::new(0),
};

/// How long the library waits for memleak's answer at most.
const WAIT_SECS: i64 = 10;

/// This process's records, when it records now; None: forward only.
#[inline(always)]
pub fn current() -> Option<&'static Info> {
    let p = PAGE.load(Acquire) as *const StatePage;
    if !p.is_null() {
        // SAFETY: the page is mapped for the life of the process once published.
        let page = unsafe { &*p };
        match page.state.load(Acquire) {
            RECORDING => {
                let info = page.info();
                // memleak stops tracing (count reached, a stop signal): it zeroes the owner.
                return (info.header().owner_pid.load(Relaxed) == info.pid).then_some(info);
            }
            FORWARD_ONLY => return None,
            _ => {}
        }
    }
    current_slow()
}

#[cold]
fn current_slow() -> Option<&'static Info> {
    let t = crate::thread::get();
    if t.in_setup.get() || !crate::init::ready() {
        return None;
    }
    let page = page()?;
    loop {
        match page.state.compare_exchange(NONE, SETTING_UP, Acquire, Acquire) {
            Ok(_) => {
                t.in_setup.set(true);
                // SAFETY: only this thread writes the Info while the state is SETTING_UP.
                let ok = unsafe { setup(&mut *page.info.get()) };
                t.in_setup.set(false);
                page.state.store(if ok { RECORDING } else { FORWARD_ONLY }, Release);
            }
            Err(RECORDING) => {
                let info = page.info();
                return (info.header().owner_pid.load(Relaxed) == info.pid).then_some(info);
            }
            Err(FORWARD_ONLY) => return None,
            Err(_) => {
                // Another thread asks memleak: wait for it.
                // SAFETY: sched_yield has no arguments.
                unsafe { syscall3(SYS_SCHED_YIELD, 0, 0, 0) };
            }
        }
    }
}

/// The wiped-on-fork page, mapped at first use.
fn page() -> Option<&'static StatePage> {
    let mut p = PAGE.load(Acquire);
    if p == 0 {
        let m = map_anon(4096);
        if m.is_null() {
            return None;
        }
        // SAFETY: madvise on the page just mapped.
        if unsafe { syscall3(SYS_MADVISE, m as usize, 4096, MADV_WIPEONFORK) } != 0 {
            // SAFETY: the page just mapped.
            unsafe { syscall3(SYS_MUNMAP, m as usize, 4096, 0) };
            return None;
        }
        p = match PAGE.compare_exchange(0, m as usize, AcqRel, Acquire) {
            Ok(_) => m as usize,
            Err(other) => {
                // SAFETY: the page just mapped, unused.
                unsafe { syscall3(SYS_MUNMAP, m as usize, 4096, 0) };
                other
            }
        };
    }
    // SAFETY: a zero page is a valid StatePage (NONE, null pointers); it is never unmapped.
    Some(unsafe { &*(p as *const StatePage) })
}

/// Unmaps what the parent handed over to itself (a forked child holds copies of it).
fn forget_parent(pid: u32) {
    let old = SHADOW.pid.load(Relaxed);
    if old == 0 || old == pid {
        return;
    }
    // SAFETY: the parent's mappings, copied into this child by fork; nothing of this process
    // uses them any more (its state page was wiped).
    unsafe {
        for (a, l) in [(&SHADOW.region, &SHADOW.region_len), (&SHADOW.tables, &SHADOW.tables_len)] {
            let (addr, len) = (a.swap(0, Relaxed), l.swap(0, Relaxed));
            if addr != 0 {
                syscall3(SYS_MUNMAP, addr, len, 0);
            }
        }
    }
    // The parent's connection, if the descriptor still is that socket (the program may have
    // closed it and reused the number since).
    let fd = SHADOW.sock.swap(u32::MAX, Relaxed);
    if fd != u32::MAX && fd_ino(fd as i32) == Some(SHADOW.sock_ino.load(Relaxed)) {
        close(fd as i32);
    }
}

fn fd_ino(fd: i32) -> Option<u64> {
    // SAFETY: fstat into a local struct stat.
    let mut st: Stat = unsafe { core::mem::zeroed() };
    let r = unsafe { syscall3(SYS_FSTAT, fd as usize, &mut st as *mut Stat as usize, 0) };
    (r == 0).then_some(st.ino)
}

fn fd_size(fd: i32) -> usize {
    // SAFETY: fstat into a local struct stat.
    let mut st: Stat = unsafe { core::mem::zeroed() };
    let r = unsafe { syscall3(SYS_FSTAT, fd as usize, &mut st as *mut Stat as usize, 0) };
    if r == 0 && st.size > 0 { st.size as usize } else { 0 }
}

/// Connects to memleak, says hello, and maps what it hands over. False: forward only.
///
/// # Safety
/// Called by one thread at a time, which owns `info` meanwhile.
unsafe fn setup(info: &mut Info) -> bool {
    let pid = getpid();
    forget_parent(pid);
    let mut name = [0u8; 108];
    // SAFETY: reads the environment as set up by the kernel or libc.
    let Some(len) = (unsafe { socket_name(&mut name) }) else { return false };
    // SAFETY: socket syscalls on the library's own descriptor and local buffers.
    let fd = unsafe { syscall3(SYS_SOCKET, AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    let fd = fd as i32;
    let tv = Timeval { tv_sec: WAIT_SECS, tv_usec: 0 };
    let mut addr = SockaddrUn { family: AF_UNIX as u16, path: [0; 108] };
    // An abstract name: a NUL, then the name.
    addr.path[1..1 + len].copy_from_slice(&name[..len]);
    let hello = Hello { magic: HELLO_MAGIC, call_sp_tls: crate::thread::call_sp_offset() };
    let mut welcome = Welcome::default();
    let mut fds = [-1i32; 2];
    let ok = unsafe {
        syscall6(SYS_SETSOCKOPT, fd as usize, SOL_SOCKET, SO_RCVTIMEO, &tv as *const _ as usize, 16, 0) == 0
            && syscall6(SYS_SETSOCKOPT, fd as usize, SOL_SOCKET, SO_SNDTIMEO, &tv as *const _ as usize, 16, 0) == 0
            && retry(|| syscall3(SYS_CONNECT, fd as usize, &addr as *const _ as usize, 2 + 1 + len)) == 0
            && retry(|| {
                syscall6(SYS_SENDTO, fd as usize, &hello as *const _ as usize, size_of::<Hello>(), MSG_NOSIGNAL, 0, 0)
            }) == size_of::<Hello>() as isize
            && receive(fd, &mut welcome, &mut fds)
    };
    if !ok || welcome.magic != HELLO_MAGIC || welcome.ok == 0 || fds[0] < 0 || fds[1] < 0 {
        for f in fds {
            if f >= 0 {
                close(f);
            }
        }
        close(fd);
        return false;
    }
    // SAFETY: maps the descriptors memleak handed over, checking what they hold.
    let mapped = unsafe { map_region(info, pid, fds[0], fds[1]) };
    close(fds[0]);
    close(fds[1]);
    if !mapped {
        close(fd);
        return false;
    }
    info.sock = fd;
    SHADOW.pid.store(pid, Relaxed);
    SHADOW.sock.store(fd as u32, Relaxed);
    SHADOW.sock_ino.store(fd_ino(fd).unwrap_or(0), Relaxed);
    true
}

/// Repeats a system call interrupted by a signal.
fn retry(mut f: impl FnMut() -> isize) -> isize {
    loop {
        let r = f();
        if r != EINTR {
            return r;
        }
    }
}

/// memleak's answer and its two descriptors.
unsafe fn receive(fd: i32, welcome: &mut Welcome, fds: &mut [i32; 2]) -> bool {
    let mut iov = IoVec { base: (welcome as *mut Welcome).cast(), len: size_of::<Welcome>() };
    let mut cmsg = CmsgFds { len: 0, level: 0, kind: 0, fds: [-1, -1] };
    let mut msg = MsgHdr {
        name: core::ptr::null_mut(),
        namelen: 0,
        iov: &mut iov,
        iovlen: 1,
        control: (&mut cmsg as *mut CmsgFds).cast(),
        controllen: size_of::<CmsgFds>(),
        flags: 0,
    };
    // SAFETY: recvmsg into the local buffers described by msg.
    let n = retry(|| unsafe { syscall3(SYS_RECVMSG, fd as usize, &mut msg as *mut MsgHdr as usize, MSG_CMSG_CLOEXEC) });
    // Two descriptors: the header (16 bytes) and 8 bytes of data.
    if cmsg.level == SOL_SOCKET as i32 && cmsg.kind == SCM_RIGHTS && cmsg.len >= 16 + 4 {
        fds[0] = cmsg.fds[0];
        if cmsg.len >= 16 + 8 {
            fds[1] = cmsg.fds[1];
        }
    }
    n == size_of::<Welcome>() as isize
}

/// The value of MEMLEAK_PRELOAD into `out`; its length.
unsafe fn socket_name(out: &mut [u8; 108]) -> Option<usize> {
    // libc sets `environ` before any constructor runs; the dynamic linker may allocate before
    // that: then the environment is read from /proc.
    // SAFETY: environ is libc's; a non-null array of C strings ends with null.
    let mut p = unsafe { environ };
    let key = ENV.as_bytes();
    let take = |v: &[u8], out: &mut [u8; 108]| -> Option<usize> {
        let v = v.strip_prefix(key)?.strip_prefix(b"=")?;
        (!v.is_empty() && v.len() < out.len() - 1).then(|| {
            out[..v.len()].copy_from_slice(v);
            v.len()
        })
    };
    if !p.is_null() {
        let mut found = None;
        loop {
            // SAFETY: see above.
            let s = unsafe { *p };
            if s.is_null() {
                return found;
            }
            // SAFETY: a NUL-terminated string.
            let v = unsafe { core::ffi::CStr::from_ptr(s) }.to_bytes();
            // The last one counts, as getenv's first would not: a program appending its own.
            if let Some(n) = take(v, out) {
                found = Some(n);
            }
            // SAFETY: within the array.
            p = unsafe { p.add(1) };
        }
    }
    let buf = map_anon(1 << 20);
    if buf.is_null() {
        return None;
    }
    // SAFETY: reads /proc/self/environ into the fresh 1 MiB buffer.
    let n = unsafe {
        let fd = syscall3(SYS_OPEN, c"/proc/self/environ".as_ptr() as usize, 0o2_000_000, 0);
        if fd < 0 {
            syscall3(SYS_MUNMAP, buf as usize, 1 << 20, 0);
            return None;
        }
        let mut n = 0usize;
        loop {
            let r = syscall3(SYS_READ, fd as usize, buf as usize + n, (1 << 20) - 1 - n);
            if r <= 0 {
                break;
            }
            n += r as usize;
        }
        close(fd as i32);
        n
    };
    // SAFETY: n bytes were read into buf.
    let text = unsafe { core::slice::from_raw_parts(buf, n) };
    let found = text.split(|&b| b == 0).filter_map(|v| take(v, out)).last();
    // SAFETY: the buffer mapped above.
    unsafe { syscall3(SYS_MUNMAP, buf as usize, 1 << 20, 0) };
    found
}

/// Maps the region and tables memleak handed over, checks them, and fills `info`.
unsafe fn map_region(info: &mut Info, pid: u32, region_fd: i32, tables_fd: i32) -> bool {
    let (rsize, tsize) = (fd_size(region_fd), fd_size(tables_fd));
    if rsize < size_of::<RegionHeader>() || tsize < size_of::<TablesHeader>() {
        return false;
    }
    // SAFETY: new shared mappings of the descriptors; their contents are checked below.
    unsafe {
        let r = syscall6(SYS_MMAP, 0, rsize, PROT_READ | PROT_WRITE, MAP_SHARED, region_fd as usize, 0);
        if r < 0 {
            return false;
        }
        let t = syscall6(SYS_MMAP, 0, tsize, PROT_READ, MAP_SHARED, tables_fd as usize, 0);
        if t < 0 {
            syscall3(SYS_MUNMAP, r as usize, rsize, 0);
            return false;
        }
        let (base, tbase) = (r as usize, t as usize);
        let sh = &*(base as *const RegionHeader);
        let th = &*(tbase as *const TablesHeader);
        let fits = |off: u64, n: u64, each: usize, size: usize| {
            n.checked_mul(each as u64).and_then(|b| b.checked_add(off)).is_some_and(|end| end <= size as u64)
        };
        let ok = sh.magic == REGION_MAGIC
            && th.magic == TABLES_MAGIC
            && sh.owner_pid.load(Relaxed) == pid
            && sh.alloc_slots.is_power_of_two()
            && sh.stack_slots.is_power_of_two()
            && sh.events_len.is_power_of_two()
            && sh.max_maps <= u64::from(u32::MAX)
            && fits(sh.allocs_off, sh.alloc_slots, 8, rsize)
            && fits(sh.alloc_infos_off, sh.alloc_slots, size_of::<BlockInfo>(), rsize)
            && fits(sh.stack_index_off, sh.stack_slots, size_of::<StackSlot>(), rsize)
            && fits(sh.stacks_off, sh.max_stacks, size_of::<StackEntry>(), rsize)
            && fits(sh.combined_off, sh.max_stacks.saturating_add(1), size_of::<Combined>(), rsize)
            && fits(sh.events_off, sh.events_len, size_of::<Event>(), rsize)
            && fits(sh.maps_off, sh.max_maps, size_of::<MapEntry>(), rsize)
            && fits(th.rules_off, u64::from(th.max_rules), size_of::<Rule>(), tsize)
            && fits(th.pages_off, u64::from(th.max_pages), size_of::<Page>(), tsize)
            && fits(th.rows_off, u64::from(th.max_rows), 4, tsize);
        if !ok {
            syscall3(SYS_MUNMAP, base, rsize, 0);
            syscall3(SYS_MUNMAP, tbase, tsize, 0);
            return false;
        }
        *info = Info {
            pid,
            header: sh,
            settings: Settings { sample_rate: sh.settings.sample_rate.max(1), ..sh.settings },
            alloc_keys: (base + sh.allocs_off as usize) as *const AtomicU64,
            alloc_infos: (base + sh.alloc_infos_off as usize) as *const BlockInfo,
            alloc_mask: sh.alloc_slots - 1,
            stack_index: (base + sh.stack_index_off as usize) as *const StackSlot,
            stack_mask: sh.stack_slots - 1,
            stacks: (base + sh.stacks_off as usize) as *mut StackEntry,
            max_stacks: sh.max_stacks,
            combined: (base + sh.combined_off as usize) as *const Combined,
            events: (base + sh.events_off as usize) as *mut Event,
            ev_mask: sh.events_len - 1,
            mapents: (base + sh.maps_off as usize) as *const MapEntry,
            max_maps: sh.max_maps as u32,
            rules: (tbase + th.rules_off as usize) as *const Rule,
            max_rules: th.max_rules,
            pages: (tbase + th.pages_off as usize) as *const Page,
            max_pages: th.max_pages,
            rows: (tbase + th.rows_off as usize) as *const u32,
            max_rows: th.max_rows,
            sock: -1,
        };
        SHADOW.region.store(base, Relaxed);
        SHADOW.region_len.store(rsize, Relaxed);
        SHADOW.tables.store(tbase, Relaxed);
        SHADOW.tables_len.store(tsize, Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hello_and_welcome_keep_their_sizes() {
        assert_eq!(size_of::<Hello>(), 16);
        assert_eq!(size_of::<Welcome>(), 16);
        assert_eq!(size_of::<CmsgFds>(), 24);
        assert_eq!(size_of::<Stat>(), 144);
    }
}
