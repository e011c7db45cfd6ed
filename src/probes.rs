//! Probes: the allocator's entry points found in its ELF object, attached as uprobes.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use libbpf_rs::{Link, ProgramMut, UprobeMultiOpts, UprobeOpts};
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::placement::{Placement, place};
use crate::skel::types::fn_kind;

/// The functions traced, with the kind the BPF program is told through the cookie.
pub const ENTRY_POINTS: &[(&str, fn_kind)] = &[
    ("malloc", fn_kind::FN_MALLOC),
    ("calloc", fn_kind::FN_CALLOC),
    ("realloc", fn_kind::FN_REALLOC),
    ("reallocarray", fn_kind::FN_REALLOCARRAY),
    ("posix_memalign", fn_kind::FN_POSIX_MEMALIGN),
    ("aligned_alloc", fn_kind::FN_ALIGNED_ALLOC),
    ("memalign", fn_kind::FN_ALIGNED_ALLOC),
    ("valloc", fn_kind::FN_VALLOC),
    ("pvalloc", fn_kind::FN_PVALLOC),
    ("free", fn_kind::FN_FREE),
    ("mmap", fn_kind::FN_MMAP),
    ("munmap", fn_kind::FN_MUNMAP),
    ("mremap", fn_kind::FN_MREMAP),
    ("mprotect", fn_kind::FN_MPROTECT),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPoint {
    /// The names found at this offset, e.g. "memalign/aligned_alloc".
    pub names: String,
    pub kind: fn_kind,
    /// File offset of the function's first instruction.
    pub entry_offset: u64,
    /// File offset of the probed instruction: where the uprobe attaches.
    pub file_offset: u64,
    pub placement: Placement,
}

impl EntryPoint {
    /// free, munmap and mprotect need no return probe.
    pub fn needs_return(&self) -> bool {
        !matches!(self.kind, fn_kind::FN_FREE | fn_kind::FN_MUNMAP | fn_kind::FN_MPROTECT)
    }
}

/// The entry points that `path` defines (with `prefix` before each name), one per distinct
/// address, and the names it lacks.
pub fn resolve(path: &Path, prefix: &str) -> Result<(Vec<EntryPoint>, Vec<String>)> {
    let (_, data) = crate::objfile::read_elf(path)?;
    let file = object::File::parse(&*data).with_context(|| format!("{} is not an ELF object", path.display()))?;
    let mut by_offset: BTreeMap<u64, EntryPoint> = BTreeMap::new();
    let mut missing = Vec::new();
    for &(name, kind) in ENTRY_POINTS {
        let full = format!("{prefix}{name}");
        let Some((vaddr, size)) = symbol_address(&file, &full) else {
            missing.push(full);
            continue;
        };
        let Some(off) = vaddr_to_offset(&file, vaddr) else {
            missing.push(full);
            continue;
        };
        if let Some(e) = by_offset.get_mut(&off) {
            e.names.push_str(&format!("/{full}"));
            continue;
        }
        // The function's code, at most 64 bytes of it, decides where its probe goes.
        let len = if size > 0 { size.min(64) } else { 64 } as usize;
        let code = data.get(off as usize..).map(|c| &c[..c.len().min(len)]).unwrap_or_default();
        let placement = place(code);
        let file_offset = off + placement.delta;
        by_offset.insert(off, EntryPoint { names: full, kind, entry_offset: off, file_offset, placement });
    }
    Ok((by_offset.into_values().collect(), missing))
}

/// The address and size of the function `name`.
fn symbol_address(file: &object::File, name: &str) -> Option<(u64, u64)> {
    let defined = |s: &object::Symbol| s.name() == Ok(name) && s.is_definition() && s.kind() == SymbolKind::Text;
    file.dynamic_symbols().find(defined).or_else(|| file.symbols().find(defined)).map(|s| (s.address(), s.size()))
}

fn vaddr_to_offset(file: &object::File, vaddr: u64) -> Option<u64> {
    file.segments().find_map(|seg| {
        let (off, size) = seg.file_range();
        (vaddr >= seg.address() && vaddr < seg.address() + size).then(|| vaddr - seg.address() + off)
    })
}

/// Whether the ELF file at `path` defines the function `name`.
pub fn defines(path: &Path, name: &str) -> bool {
    let Ok((_, data)) = crate::objfile::read_elf(path) else { return false };
    let Ok(file) = object::File::parse(&*data) else { return false };
    symbol_address(&file, name).is_some()
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

/// One uprobe_multi link of `prog` on `entries`, each with its kind as the cookie.
fn attach_multi(prog: &ProgramMut, pid: i32, path: &Path, entries: &[EntryPoint], how: Multi) -> Result<Link> {
    let opts = UprobeMultiOpts {
        offsets: entries.iter().map(|e| e.file_offset as usize).collect(),
        cookies: entries.iter().map(|e| e.kind.0 as u64).collect(),
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
            Ok(vec![
                attach_multi(&progs.memleak_multi_entry, pid, path, entries, Multi::Entry)?,
                attach_multi(&progs.memleak_multi_return, pid, path, &returns, Multi::Return)?,
            ])
        }
        AttachMode::Classic => {
            let mut links = Vec::new();
            for e in entries {
                let entry = UprobeOpts { cookie: e.kind.0 as u64, ..Default::default() };
                links.push(
                    progs
                        .memleak_entry
                        .attach_uprobe_with_opts(pid, path, e.file_offset as usize, entry)
                        .with_context(|| format!("cannot attach a uprobe to {} in {}", e.names, path.display()))?,
                );
                if e.needs_return() {
                    let ret = UprobeOpts { cookie: e.kind.0 as u64, retprobe: true, ..Default::default() };
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
    use std::path::PathBuf;

    use super::*;

    /// The test binary's libc, opened as memleak opens a -p process's (kept open).
    fn libc() -> PathBuf {
        let me = std::process::id() as i32;
        let o = crate::target::allocator_object(me, None, "").expect("the test binary maps libc");
        assert!(o.shown.to_string_lossy().contains("libc.so"), "{}", o.shown.display());
        let path = o.path.clone();
        std::mem::forget(o);
        path
    }

    #[test]
    fn glibc_entry_points_are_found_once_each() {
        let (entries, missing) = resolve(&libc(), "").expect("libc parses");
        assert!(missing.is_empty(), "glibc lacks {missing:?}");
        let names: Vec<&str> = entries.iter().map(|e| e.names.as_str()).collect();
        // memalign and aligned_alloc are one function in glibc: probed once.
        assert!(names.iter().any(|n| n.contains("aligned_alloc") && n.contains("memalign")), "{names:?}");
        let mut offsets: Vec<u64> = entries.iter().map(|e| e.file_offset).collect();
        offsets.dedup();
        assert_eq!(offsets.len(), entries.len());
        assert!(entries.iter().all(|e| e.file_offset > 0));
        let free = entries.iter().find(|e| e.names == "free").expect("free");
        assert!(!free.needs_return());
        // Debian 12's free starts `test %rdi,%rdi; je`: the probe goes on the je.
        assert_eq!(free.file_offset - free.entry_offset, 3, "{free:?}");
        let malloc = entries.iter().find(|e| e.names == "malloc").expect("malloc");
        assert_eq!(malloc.file_offset, malloc.entry_offset, "malloc starts with an emulated push: {malloc:?}");
    }

    #[test]
    fn a_prefix_that_matches_nothing_reports_every_name_missing() {
        let (entries, missing) = resolve(&libc(), "je_").expect("libc parses");
        assert!(entries.is_empty());
        assert_eq!(missing.len(), ENTRY_POINTS.len());
        assert_eq!(missing[0], "je_malloc");
    }

    #[test]
    fn defines_finds_functions_by_name() {
        assert!(defines(&libc(), "malloc"));
        assert!(!defines(&libc(), "no_such_function_here"));
    }
}
