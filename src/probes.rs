//! Probes: the allocator's entry points found in its ELF object, attached as uprobes.
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use libbpf_rs::{Link, ProgramMut, UprobeMultiOpts, UprobeOpts};

use crate::allocator::families::Op;
use crate::allocator::symbols::Found;
use crate::placement::{Placement, place};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPoint {
    /// The names found at this offset, e.g. "memalign/aligned_alloc".
    pub names: String,
    /// What a call does (the first name's meaning: aliases share one).
    pub op: Op,
    /// The BPF cookie: the meaning of the call and the function's id (families.rs,
    /// `Spec::cookie`).
    pub cookie: u64,
    /// File offset of the function's first instruction.
    pub entry_offset: u64,
    /// File offset of the probed instruction: where the uprobe attaches.
    pub file_offset: u64,
    /// The function's size in bytes (0: unknown).
    pub size: u64,
    pub placement: Placement,
}

impl EntryPoint {
    /// Ending a block (free, munmap), mprotect and the link-map hook need no return probe.
    pub fn needs_return(&self) -> bool {
        self.op.needs_return()
    }
}

/// One entry point per distinct address among `found` (aliases share it, the first one's
/// meaning wins; `conflicts` gets the aliases whose meaning differs), each placed by decoding
/// its first instructions read through `file`. `id` numbers each entry point from its names and
/// the first one's display name.
pub fn entry_points(
    file: &File,
    found: &[Found],
    mut id: impl FnMut(&str, &str) -> u32,
    conflicts: &mut Vec<String>,
) -> Vec<EntryPoint> {
    let mut by_offset: BTreeMap<u64, (String, &Found)> = BTreeMap::new();
    for f in found {
        match by_offset.get_mut(&f.offset) {
            Some((names, first)) => {
                names.push('/');
                names.push_str(&f.symbol);
                if f.spec.cookie(0) != first.spec.cookie(0) {
                    conflicts.push(format!("{} (traced as {})", f.symbol, first.symbol));
                }
            }
            None => {
                by_offset.insert(f.offset, (f.symbol.clone(), f));
            }
        }
    }
    by_offset
        .into_iter()
        .map(|(off, (names, f))| {
            // The function's code, at most 64 bytes of it, decides where its probe goes.
            let len = if f.size > 0 { f.size.min(64) } else { 64 } as usize;
            let mut code = vec![0u8; len];
            let n = read_at_most(file, &mut code, off);
            code.truncate(n);
            let placement = place(&code, f.spec.reads());
            let file_offset = off + placement.delta;
            let cookie = f.spec.cookie_at(id(&names, f.spec.display), &placement.args);
            EntryPoint { names, op: f.spec.op, cookie, entry_offset: off, file_offset, size: f.size, placement }
        })
        .collect()
}

fn read_at_most(file: &File, buf: &mut [u8], off: u64) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

/// How the probes get attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// One uprobe_multi session link for every entry point (Linux 6.13+).
    Session,
    /// One uprobe_multi link for the entries and one uretprobe_multi link for the returns of
    /// the allocating functions (Linux 6.6+).
    Multi,
    /// One classic uprobe per entry point and one uretprobe per allocating function.
    Classic,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Multi {
    Session,
    Entry,
    Return,
}

/// One uprobe_multi link of `prog` on `entries`, each with its cookie.
fn attach_multi(prog: &ProgramMut, pid: i32, path: &Path, entries: &[EntryPoint], how: Multi) -> Result<Link> {
    let opts = UprobeMultiOpts {
        offsets: entries.iter().map(|e| e.file_offset as usize).collect(),
        cookies: entries.iter().map(|e| e.cookie).collect(),
        session: how == Multi::Session,
        retprobe: how == Multi::Return,
        ..Default::default()
    };
    prog.attach_uprobe_multi_with_opts(pid, path, "", opts)
        .with_context(|| format!("cannot attach uprobe_multi probes to {}", path.display()))
}

/// Attaches the loaded programs to every entry point of `path` in process `pid`.
pub fn attach(
    progs: &crate::skel::MemleakProgs,
    mode: AttachMode,
    pid: i32,
    path: &Path,
    entries: &[EntryPoint],
) -> Result<Vec<Link>> {
    if entries.is_empty() {
        bail!("{} defines none of the allocator functions", path.display());
    }
    match mode {
        AttachMode::Session => Ok(vec![attach_multi(&progs.memleak_session, pid, path, entries, Multi::Session)?]),
        AttachMode::Multi => {
            let returns: Vec<EntryPoint> = entries.iter().filter(|e| e.needs_return()).cloned().collect();
            let mut links = vec![attach_multi(&progs.memleak_multi_entry, pid, path, entries, Multi::Entry)?];
            if !returns.is_empty() {
                links.push(attach_multi(&progs.memleak_multi_return, pid, path, &returns, Multi::Return)?);
            }
            Ok(links)
        }
        AttachMode::Classic => {
            let mut links = Vec::new();
            for e in entries {
                let entry = UprobeOpts { cookie: e.cookie, ..Default::default() };
                links.push(
                    progs
                        .memleak_entry
                        .attach_uprobe_with_opts(pid, path, e.file_offset as usize, entry)
                        .with_context(|| format!("cannot attach a uprobe to {} in {}", e.names, path.display()))?,
                );
                if e.needs_return() {
                    let ret = UprobeOpts { cookie: e.cookie, retprobe: true, ..Default::default() };
                    links.push(
                        progs
                            .memleak_return
                            .attach_uprobe_with_opts(pid, path, e.file_offset as usize, ret)
                            .with_context(|| {
                                format!("cannot attach a uretprobe to {} in {}", e.names, path.display())
                            })?,
                    );
                }
            }
            Ok(links)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::symbols::{Symtab, scan, wanted_map};

    fn libc_entries() -> Vec<EntryPoint> {
        let path = Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6");
        let file = File::open(path).unwrap();
        let s = scan(&file, path, &wanted_map(""), Symtab::No).expect("libc parses");
        let mut n = 0;
        let mut conflicts = Vec::new();
        let entries = entry_points(
            &file,
            &s.found,
            |_, _| {
                n += 1;
                n
            },
            &mut conflicts,
        );
        assert!(conflicts.is_empty(), "{conflicts:?}");
        entries
    }

    #[test]
    fn glibc_entry_points_are_found_once_each() {
        let entries = libc_entries();
        let names: Vec<&str> = entries.iter().map(|e| e.names.as_str()).collect();
        // memalign and aligned_alloc are one function in glibc: probed once.
        assert!(names.iter().any(|n| n.contains("aligned_alloc") && n.contains("memalign")), "{names:?}");
        let mut offsets: Vec<u64> = entries.iter().map(|e| e.file_offset).collect();
        offsets.dedup();
        assert_eq!(offsets.len(), entries.len());
        assert!(entries.iter().all(|e| e.file_offset > 0));
        let free = entries.iter().find(|e| e.names.starts_with("free/")).expect("free, first of its aliases");
        assert!(!free.needs_return());
        // Debian 12's free starts `test %rdi,%rdi; je`: the probe goes on the je.
        assert_eq!(free.file_offset - free.entry_offset, 3, "{free:?}");
        let malloc = entries.iter().find(|e| e.names == "malloc/__libc_malloc").expect("malloc");
        assert_eq!(malloc.file_offset, malloc.entry_offset, "malloc starts with an emulated push: {malloc:?}");
        // Ids are distinct and in the cookie's high half.
        let mut ids: Vec<u64> = entries.iter().map(|e| e.cookie >> 32).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), entries.len());
    }
}
