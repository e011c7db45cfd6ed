//! Sealed memfds shared with traced processes: nothing on disk. A process may write into a region
//! memleak handed it, never resize it (a read of memleak's past the end would fault); what it
//! must only read (the library, the tables) it gets through a read-only descriptor.
use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

pub struct Shm {
    pub fd: OwnedFd,
    pub ptr: *mut u8,
    pub len: usize,
}

impl Shm {
    /// A zeroed memfd of `len` bytes (pages are allocated only when written), mapped
    /// read-write here, sealed against resizing and with `seals` besides (F_SEAL_FUTURE_WRITE:
    /// memleak's mapping is the only writable one there will be, whoever reopens the file).
    pub fn new(name: &CStr, len: usize, seals: i32) -> Result<Shm> {
        let fd = memfd(name)?;
        // SAFETY: ftruncate, fcntl and mmap on the descriptor just created.
        unsafe {
            if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) != 0 {
                return Err(std::io::Error::last_os_error()).context("sizing shared memory");
            }
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error()).context("mapping shared memory");
            }
            let shm = Shm { fd, ptr: p.cast(), len };
            // After the mapping: a future-write seal refuses new writable mappings only.
            seal(&shm.fd, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL | seals)?;
            Ok(shm)
        }
    }

    /// The parts of [off, off + len) that hold data (pages never written are holes: reading
    /// them through the mapping would allocate them).
    pub fn data_ranges(&self, off: usize, len: usize) -> Vec<(usize, usize)> {
        let fd = self.fd.as_raw_fd();
        let end = off.saturating_add(len).min(self.len);
        let mut out = Vec::new();
        let mut pos = off;
        while pos < end {
            // SAFETY: lseek on our own descriptor.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 || data as usize >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 { end } else { (hole as usize).min(end) };
            out.push((data as usize, hole));
            pos = hole;
        }
        out
    }

    /// The memfd's (device, inode), as a process's maps show it.
    pub fn id(&self) -> (u64, u64) {
        file_id(&self.fd)
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: the mapping made by new.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub fn memfd(name: &CStr) -> Result<OwnedFd> {
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn seal(fd: &OwnedFd, seals: i32) -> Result<()> {
    // SAFETY: fcntl on our own descriptor.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        bail!("sealing a memfd: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A read-only descriptor of the same memfd (a new open file description): a process that gets
/// it cannot map it writable.
pub fn read_only(fd: &OwnedFd) -> Result<OwnedFd> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
    // SAFETY: opens our own descriptor's file again, read-only.
    let r = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("reopening a memfd read-only");
    }
    // SAFETY: a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// (st_dev, st_ino) of a descriptor.
pub fn file_id(fd: &OwnedFd) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let f = std::mem::ManuallyDrop::new(
        // SAFETY: borrowed for the call; ManuallyDrop keeps the descriptor open.
        unsafe { std::fs::File::from_raw_fd(fd.as_raw_fd()) },
    );
    f.metadata().map(|m| (m.dev(), m.ino())).unwrap_or((0, 0))
}
