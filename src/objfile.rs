//! Opening files that a traced process maps or names. memleak runs as root beside code it does
//! not trust, so a path the target controls is never followed blindly: files are opened
//! without blocking (a FIFO or a device never hangs the open), must be regular files, are read
//! with a size bound, and an object must be an ELF file of memleak's own class and machine.
//! Mapped objects are opened through /proc/PID/map_files (see procmaps), and read afterwards
//! through the descriptor held: [`fd_path`].
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The largest object memleak reads (the largest shared objects on a distribution are a few
/// hundred MiB; a file larger than this is refused rather than read into memory).
pub const MAX_OBJECT_SIZE: u64 = 2 << 30;

/// Opens `path` for reading without blocking and checks it is a regular file.
pub fn open_regular(path: &Path) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let ft = f.metadata().with_context(|| format!("cannot stat {}", path.display()))?.file_type();
    if !ft.is_file() {
        let what = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        bail!("{}: {what}, not a regular file", path.display());
    }
    Ok(f)
}

/// Opens a file a process has mapped through its /proc/PID/map_files/START-END link, which
/// names the very file mapped whatever its path names now, and checks that it is a regular file
/// of the (dev, inode) the mapping was seen with (`dev` as stat's st_dev). The link is opened
/// with O_PATH first, which runs no driver's open: a device mapping is refused unopened.
pub fn open_mapped(link: &Path, dev: u64, ino: u64) -> Result<File> {
    use std::os::unix::fs::MetadataExt;
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(link)
        .with_context(|| format!("cannot open {}", link.display()))?;
    let md = handle.metadata().with_context(|| format!("cannot stat {}", link.display()))?;
    // NotFound, as for a mapping gone: the file asked for is not mapped there any more.
    let remapped = || {
        Err(std::io::Error::new(std::io::ErrorKind::NotFound, "another file is mapped there now"))
            .with_context(|| link.display().to_string())
    };
    if (md.dev(), md.ino()) != (dev, ino) {
        return remapped();
    }
    if !md.file_type().is_file() {
        bail!("{}: not a regular file", link.display());
    }
    // The O_PATH descriptor names the same inode: reopened for reading, it cannot be swapped.
    let f = open_regular(&fd_path(&handle))?;
    let again = f.metadata().with_context(|| format!("cannot stat {}", link.display()))?;
    if (again.dev(), again.ino()) != (dev, ino) {
        return remapped();
    }
    Ok(f)
}

/// Reads all of `f` (named `what` in errors), refusing more than `limit` bytes.
pub fn read_bounded(f: &File, limit: u64, what: &Path) -> Result<Vec<u8>> {
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    if size > limit {
        bail!("{}: {size} bytes, larger than the {limit} bytes memleak reads", what.display());
    }
    let mut data = Vec::with_capacity(size as usize);
    // One more byte than the limit tells a file that grew past it.
    let n = f.take(limit + 1).read_to_end(&mut data).with_context(|| format!("cannot read {}", what.display()))?;
    if n as u64 > limit {
        bail!("{}: larger than the {limit} bytes memleak reads", what.display());
    }
    Ok(data)
}

/// Checks that `data` is an ELF object memleak can trace: 64-bit, little-endian, x86-64.
pub fn check_elf(data: &[u8], what: &Path) -> Result<()> {
    const EM_X86_64: u16 = 62;
    if data.len() < 20 || &data[..4] != b"\x7fELF" {
        bail!("{}: not an ELF file", what.display());
    }
    if data[4] != 2 {
        bail!("{}: a 32-bit ELF object; memleak traces 64-bit (x86-64) code", what.display());
    }
    if data[5] != 1 {
        bail!("{}: a big-endian ELF object; memleak traces x86-64 code", what.display());
    }
    let machine = u16::from_le_bytes([data[18], data[19]]);
    if machine != EM_X86_64 {
        bail!(
            "{}: an ELF object for another machine (e_machine {machine}); memleak traces x86-64 code",
            what.display()
        );
    }
    Ok(())
}

/// Opens and reads an ELF object named by the user or found for a process: a regular file,
/// bounded, of memleak's class and machine.
pub fn read_elf(path: &Path) -> Result<(File, Vec<u8>)> {
    let f = open_regular(path)?;
    let data = read_bounded(&f, MAX_OBJECT_SIZE, path)?;
    check_elf(&data, path)?;
    Ok((f, data))
}

/// A path naming the very file `f` holds open, for libraries that take paths (blazesym,
/// libbpf's uprobe attach): the kernel resolves it to the open file, not to any path.
pub fn fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("memleak-objfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&fifo).expect_err("a FIFO is not a regular file");
        assert!(format!("{e:#}").contains("a FIFO, not a regular file"), "{e:#}");
        let e = open_regular(Path::new("/dev/zero")).expect_err("a device");
        assert!(format!("{e:#}").contains("a device"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_are_bounded_and_elf_is_checked() {
        let exe = std::env::current_exe().unwrap();
        let (f, data) = read_elf(&exe).expect("own executable");
        assert!(data.len() > 1000);
        assert!(read_bounded(&f, 10, &exe).is_err());
        let mut elf32 = data[..64].to_vec();
        elf32[4] = 1;
        assert!(format!("{:#}", check_elf(&elf32, &exe).unwrap_err()).contains("32-bit"));
        let mut arm = data[..64].to_vec();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert!(format!("{:#}", check_elf(&arm, &exe).unwrap_err()).contains("another machine"));
        assert!(check_elf(b"#!/bin/sh\n", &exe).is_err());
        // The descriptor's path names the same file.
        let same = std::fs::read(fd_path(&f)).unwrap();
        assert_eq!(same.len(), data.len());
    }
}
