//! The process's memory: its mappings with their permissions, which pages hold anything, and
//! reading many ranges with few process_vm_readv calls. Nothing is ever written to it.
use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::Result;

pub const PAGE: u64 = 4096;
/// Most iovecs per process_vm_readv (the kernel's UIO_MAXIOV).
const MAX_IOV: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub inode: u64,
    /// As /proc/PID/maps shows it: a path, `[heap]`, `[stack]`, `[anon:name]`, or None.
    pub name: Option<String>,
}

impl Region {
    /// Backed by a file (possibly deleted since), not anonymous memory.
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.name.as_deref().is_some_and(|n| n.starts_with('/'))
    }

    /// Private anonymous memory: a page never touched reads as zeros.
    pub fn is_anonymous(&self) -> bool {
        !self.shared && self.inode == 0
    }

    /// A character or block device (other than /dev/zero): reading it may have effects or hang.
    pub fn is_device(&self) -> bool {
        self.inode != 0
            && self
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("/dev/") && n != "/dev/zero" && !n.starts_with("/dev/shm/"))
    }
}

/// The mappings of `pid`, by address (procmaps reads them). A path is shown as the process
/// sees it.
pub fn regions(pid: i32) -> Result<Vec<Region>> {
    Ok(crate::procmaps::ProcMaps::read(pid)?.mappings.iter().map(Region::from).collect())
}

impl From<&crate::procmaps::Mapping> for Region {
    fn from(m: &crate::procmaps::Mapping) -> Region {
        Region {
            start: m.start,
            end: m.end,
            read: m.readable,
            write: m.writable,
            exec: m.executable,
            shared: m.shared,
            inode: m.inode,
            name: m.path.as_ref().map(|p| p.to_string_lossy().into_owned()),
        }
    }
}

/// The region holding `addr`.
pub fn find(regions: &[Region], addr: u64) -> Option<&Region> {
    let i = regions.partition_point(|r| r.start <= addr);
    let r = regions.get(i.checked_sub(1)?)?;
    (addr < r.end).then_some(r)
}

/// Reads the process's memory; counts what it could not read.
pub struct Reader {
    pid: i32,
    pagemap: Option<File>,
    /// Bytes that could not be read, and in how many separate ranges; the first few ranges.
    pub unreadable: u64,
    pub unreadable_ranges: u64,
    pub unreadable_examples: Vec<(u64, u64)>,
    /// Bytes read (or known to be zero without reading: untouched anonymous pages).
    pub scanned: u64,
    pub skipped_untouched: u64,
    last_bad_end: u64,
}

impl Reader {
    pub fn new(pid: i32) -> Reader {
        Reader {
            pid,
            pagemap: File::open(format!("/proc/{pid}/pagemap")).ok(),
            unreadable: 0,
            unreadable_ranges: 0,
            unreadable_examples: Vec::new(),
            scanned: 0,
            skipped_untouched: 0,
            last_bad_end: 0,
        }
    }

    /// The parts of [start, end) (page-aligned) of an anonymous private region that hold
    /// anything: pages present or swapped out. The rest has never been written and reads as
    /// zeros. Without /proc/PID/pagemap, everything.
    pub fn populated(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let Some(pm) = &self.pagemap else { return vec![(start, end)] };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut buf = vec![0u8; 8 * 4096];
        let mut page = start / PAGE;
        let last = end.div_ceil(PAGE);
        while page < last {
            let n = ((last - page) as usize).min(buf.len() / 8);
            let Ok(got) = pm.read_at(&mut buf[..n * 8], page * 8) else { return vec![(start, end)] };
            if got < n * 8 {
                return vec![(start, end)];
            }
            for k in 0..n {
                let e = u64::from_ne_bytes(buf[k * 8..k * 8 + 8].try_into().expect("8 bytes"));
                // Bit 63: present; bit 62: swapped out.
                if e & (3 << 62) != 0 {
                    let a = (page + k as u64) * PAGE;
                    let (lo, hi) = (a.max(start), (a + PAGE).min(end));
                    match out.last_mut() {
                        Some(l) if l.1 == lo => l.1 = hi,
                        _ => out.push((lo, hi)),
                    }
                }
            }
            page += n as u64;
        }
        let kept: u64 = out.iter().map(|r| r.1 - r.0).sum();
        self.skipped_untouched += (end - start) - kept;
        self.scanned += (end - start) - kept;
        out
    }

    /// Reads each (address, length) range into `dst` one after the other (their lengths add
    /// up to `dst.len()`), in as few calls as the iovec limit allows. What cannot be read is
    /// left zero (a zero is never a pointer) and counted.
    pub fn read(&mut self, ranges: &[(u64, u64)], dst: &mut [u8]) {
        let mut off = 0usize;
        let mut k = 0;
        // The first range may be partly done after a failure.
        let mut skip = 0u64;
        while k < ranges.len() {
            let mut local = Vec::with_capacity(MAX_IOV);
            let mut remote = Vec::with_capacity(MAX_IOV);
            let mut total = 0usize;
            let mut o = off;
            for (i, &(addr, len)) in ranges[k..].iter().enumerate().take(MAX_IOV) {
                let (a, l) = if i == 0 { (addr + skip, len - skip) } else { (addr, len) };
                if l == 0 {
                    continue;
                }
                local.push(libc::iovec { iov_base: dst[o..].as_mut_ptr().cast(), iov_len: l as usize });
                remote.push(libc::iovec { iov_base: a as *mut libc::c_void, iov_len: l as usize });
                o += l as usize;
                total += l as usize;
            }
            let batch = (ranges.len() - k).min(MAX_IOV);
            // SAFETY: each local iovec points into `dst` within its bounds; the remote ones
            // are only read by the kernel, in the other process.
            let n = unsafe {
                libc::process_vm_readv(
                    self.pid,
                    local.as_ptr(),
                    local.len() as libc::c_ulong,
                    remote.as_ptr(),
                    remote.len() as libc::c_ulong,
                    0,
                )
            };
            let done = if n < 0 { 0 } else { n as usize };
            self.scanned += done as u64;
            if done == total {
                off += total;
                k += batch;
                skip = 0;
                continue;
            }
            // Stopped at a page it could not read: find it, count it, go on after it.
            let mut left = done as u64;
            loop {
                let len = ranges[k].1;
                let l = len - skip;
                if left < l {
                    skip += left;
                    off += left as usize;
                    break;
                }
                left -= l;
                off += l as usize;
                k += 1;
                skip = 0;
            }
            let (addr, len) = ranges[k];
            let bad = addr + skip;
            let bad_end = ((bad / PAGE) + 1).saturating_mul(PAGE).min(addr + len);
            let bad_len = bad_end - bad;
            self.count_unreadable(bad, bad_len);
            dst[off..off + bad_len as usize].fill(0);
            off += bad_len as usize;
            skip += bad_len;
            if skip == len {
                k += 1;
                skip = 0;
            }
        }
    }

    fn count_unreadable(&mut self, addr: u64, len: u64) {
        self.unreadable += len;
        if addr != self.last_bad_end {
            self.unreadable_ranges += 1;
            if self.unreadable_examples.len() < 3 {
                self.unreadable_examples.push((addr, addr + len));
            }
        } else if let Some(last) = self.unreadable_examples.last_mut()
            && last.1 == addr
        {
            last.1 = addr + len;
        }
        self.last_bad_end = addr + len;
    }

    /// Reads one word (for the vtable heuristic); None if it cannot be read.
    pub fn word(&self, addr: u64) -> Option<u64> {
        let mut v = [0u8; 8];
        let local = libc::iovec { iov_base: v.as_mut_ptr().cast(), iov_len: 8 };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: 8 };
        // SAFETY: one local iovec of 8 bytes into `v`.
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        (n == 8).then(|| u64::from_ne_bytes(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_permissions_and_names() {
        let maps = crate::procmaps::ProcMaps::parse(
            "7f0b8a400000-7f0b8a401000 rw-p 00000000 00:00 0 \n\
             55d0c1a2b000-55d0c1a4c000 rw-p 00000000 00:00 0                          [heap]\n\
             7f0b8a228000-7f0b8a3bd000 r-xp 00026000 fe:01 2214 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
             7f0b8a500000-7f0b8a501000 rw-s 00000000 00:05 77 /dev/dri/card0\n",
        );
        let r: Vec<Region> = maps.mappings.iter().map(Region::from).collect();
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].name.as_deref(), Some("[heap]"));
        assert!(r[0].read && r[0].write && !r[0].exec && r[0].is_anonymous());
        assert!(r[1].exec && r[1].is_file() && !r[1].write);
        assert!(r[2].is_anonymous() && r[2].name.is_none());
        assert!(r[3].shared && r[3].is_device());
        assert_eq!(find(&r, 0x7f0b8a400fff).map(|r| r.start), Some(0x7f0b8a400000));
        assert!(find(&r, 0x7f0b8a401000).is_none());
    }

    #[test]
    fn reads_own_memory_and_counts_what_it_cannot() {
        // Two readable buffers around an unmapped page: the hole is zeros and counted once.
        // SAFETY: anonymous mappings of our own, unmapped at the end.
        unsafe {
            let len = 3 * PAGE as usize;
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as *mut u8;
            assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
            std::ptr::write_bytes(p, 0xab, len);
            libc::munmap(p.add(PAGE as usize).cast(), PAGE as usize);
            let base = p as u64;
            let mut r = Reader::new(std::process::id() as i32);
            let ranges = [(base + 8, 16), (base + PAGE - 8, PAGE + 16), (base + 2 * PAGE + 8, 8)];
            let mut dst = vec![0xffu8; 16 + PAGE as usize + 16 + 8];
            r.read(&ranges, &mut dst);
            assert!(dst[..16].iter().all(|&b| b == 0xab));
            assert!(dst[16..24].iter().all(|&b| b == 0xab), "the bytes before the hole");
            assert!(dst[24..24 + PAGE as usize].iter().all(|&b| b == 0), "the hole reads as zeros");
            assert!(dst[24 + PAGE as usize..].iter().all(|&b| b == 0xab), "after the hole");
            assert_eq!((r.unreadable, r.unreadable_ranges), (PAGE, 1));
            assert_eq!(r.unreadable_examples, [(base + PAGE, base + 2 * PAGE)]);
            libc::munmap(p.cast(), PAGE as usize);
            libc::munmap(p.add(2 * PAGE as usize).cast(), PAGE as usize);
        }
    }
}
