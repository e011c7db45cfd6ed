//! /proc/PID/maps: which file, at which offset, backs an address of a process.
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    /// MAP_SHARED (`s` in the permissions), not private.
    pub shared: bool,
    /// The backing file as the process sees it, or a pseudo-name such as `[heap]`, `[vdso]`,
    /// or None for anonymous memory. A file deleted since it was mapped ends in " (deleted)".
    pub path: Option<Arc<Path>>,
    /// The backing file's device (as stat's st_dev) and inode; 0 for anonymous memory.
    pub dev: u64,
    pub inode: u64,
}

impl Mapping {
    /// A file (not `[heap]`, `[vdso]`, `[anon:...]`), possibly deleted since it was mapped.
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.as_ref().is_some_and(|p| p.is_absolute())
    }

    /// The mapped file, opened through /proc/PID/map_files/START-END (which exists only while
    /// the process lives and maps it): never by its path, which the process may have replaced
    /// since (a symlink to a root-only file, a FIFO); also right for a process in another mount
    /// namespace and for a deleted file. Regular files of the mapping's (dev, inode) only.
    pub fn open(&self, pid: i32) -> Result<fs::File> {
        if self.inode == 0 {
            anyhow::bail!("not a file mapping");
        }
        crate::objfile::open_mapped(&self.map_files(pid), self.dev, self.inode)
    }

    /// Its /proc/PID/map_files link.
    pub fn map_files(&self, pid: i32) -> PathBuf {
        PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", self.start, self.end))
    }

    /// The file's device as the kernel encodes it in BPF (`s_dev`: major << 20 | minor).
    pub fn kernel_dev(&self) -> u32 {
        kernel_dev(self.dev)
    }
}

/// A device number as stat's st_dev gives it, in the kernel's internal encoding (what BPF reads
/// from a superblock's s_dev).
pub fn kernel_dev(dev: u64) -> u32 {
    (libc::major(dev) << 20) | libc::minor(dev)
}

#[derive(Debug, Clone, Default)]
pub struct ProcMaps {
    /// Sorted by start address.
    pub mappings: Vec<Mapping>,
}

impl ProcMaps {
    pub fn read(pid: i32) -> Result<ProcMaps> {
        let text =
            fs::read_to_string(format!("/proc/{pid}/maps")).with_context(|| format!("cannot read /proc/{pid}/maps"))?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> ProcMaps {
        let mut mappings: Vec<Mapping> = text.lines().filter_map(parse_line).collect();
        mappings.sort_by_key(|m| m.start);
        ProcMaps { mappings }
    }

    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }
}

fn parse_line(line: &str) -> Option<Mapping> {
    // 7f2c...-7f2c... r-xp 00028000 fe:01 1234   /usr/lib/x86_64-linux-gnu/libc.so.6
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let (major, minor) = it.next()?.split_once(':')?;
    let inode = it.next()?.parse().ok()?;
    let path = it.next().map(str::trim_start).filter(|p| !p.is_empty());
    let (start, end) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset,
        readable: perms.as_bytes().first() == Some(&b'r'),
        writable: perms.as_bytes().get(1) == Some(&b'w'),
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        shared: perms.as_bytes().get(3) == Some(&b's'),
        path: path.map(|p| Arc::from(PathBuf::from(p).as_path())),
        dev: libc::makedev(u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?),
        inode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1311 /home/u/allocs
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1311 /home/u/allocs
55d0c1a2b000-55d0c1a4c000 rw-p 00000000 00:00 0                          [heap]
7f0b8a228000-7f0b8a3bd000 r-xp 00026000 fe:01 2214 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0b8a400000-7f0b8a401000 rw-p 00000000 00:00 0 
7ffd5a3f0000-7ffd5a3f2000 r-xp 00000000 00:00 0                          [vdso]
";

    #[test]
    fn finds_the_mapping_of_an_address() {
        let maps = ProcMaps::parse(MAPS);
        let m = maps.find(0x7f0b8a228790).expect("in libc");
        assert_eq!(m.path.as_deref(), Some(Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6")));
        assert_eq!(0x7f0b8a228790 - m.start + m.offset, 0x26790);
        assert!(m.executable && m.is_file());
        assert!(maps.find(0x7f0b8a3bd000).is_none(), "end is exclusive");
        assert!(maps.find(0x1000).is_none());
        assert_eq!(maps.find(0x7f0b8a400010).map(|m| m.path.clone()), Some(None));
        assert!(!maps.find(0x55d0c1a2b010).expect("heap").is_file());
        assert_eq!((m.dev, m.inode), (libc::makedev(0xfe, 0x01), 2214));
    }

    #[test]
    fn a_mapped_file_is_opened_through_map_files_only_if_it_is_the_same_file() {
        use std::os::unix::fs::MetadataExt;
        let me = std::process::id() as i32;
        let maps = ProcMaps::read(me).expect("own maps");
        let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
        let m = maps.mappings.iter().find(|m| m.path.as_deref() == Some(exe.as_path())).expect("own executable mapped");
        let f = m.open(me).expect("own executable through map_files");
        assert_eq!(f.metadata().unwrap().ino(), m.inode);
        let other = Mapping { inode: m.inode + 1, ..m.clone() };
        let e = other.open(me).expect_err("another inode");
        assert!(format!("{e:#}").contains("another file is mapped there now"), "{e:#}");
        let gone = Mapping { start: 0x1000, end: 0x2000, ..m.clone() };
        assert!(gone.open(me).is_err());
        assert_eq!(kernel_dev(libc::makedev(0xfe, 1)), (0xfe << 20) | 1);
    }
}
