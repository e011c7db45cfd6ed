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
    pub executable: bool,
    /// The backing file, or a pseudo-name such as `[heap]`, `[vdso]`, or None for anonymous.
    pub path: Option<Arc<Path>>,
}

impl Mapping {
    /// A regular file (not `[heap]`, `[vdso]`, `[anon:...]`, nor a deleted file).
    pub fn is_file(&self) -> bool {
        self.path.as_ref().is_some_and(|p| p.is_absolute() && !p.to_string_lossy().ends_with(" (deleted)"))
    }
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

    /// The distinct files mapped, in address order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        let mut seen: Vec<&Path> = Vec::new();
        self.mappings.iter().filter(|m| m.is_file()).filter_map(move |m| {
            let p = m.path.as_deref()?;
            if seen.contains(&p) {
                None
            } else {
                seen.push(p);
                Some(p)
            }
        })
    }
}

fn parse_line(line: &str) -> Option<Mapping> {
    // 7f2c...-7f2c... r-xp 00028000 fe:01 1234   /usr/lib/x86_64-linux-gnu/libc.so.6
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let _dev = it.next()?;
    let _inode = it.next()?;
    let path = it.next().map(str::trim_start).filter(|p| !p.is_empty());
    let (start, end) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        path: path.map(|p| Arc::from(PathBuf::from(p).as_path())),
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
    }

    #[test]
    fn lists_each_file_once() {
        let maps = ProcMaps::parse(MAPS);
        let paths: Vec<_> = maps.paths().collect();
        assert_eq!(paths, [Path::new("/home/u/allocs"), Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6")]);
    }
}
