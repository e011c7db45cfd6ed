//! The objects a discovery considers in a process (from a command's load order or a running
//! process's mappings and link map), and where the in-process capture's library forwards.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;

use super::symbols::Scan;
use super::{Key, linkmap};
use crate::ldso::LoadOrder;
use crate::objects::Objects;
use crate::procmaps::ProcMaps;

/// An object of a process as a discovery met it.
pub(super) struct Candidate {
    pub(super) key: Key,
    pub(super) shown: PathBuf,
    pub(super) file: File,
    /// Its place in the dynamic linker's symbol lookup order; None: not known to be in it.
    pub(super) scope: Option<usize>,
    pub(super) executable: bool,
    /// Known to be mapped by the process (false: a -O file attached in case it is loaded).
    pub(super) mapped: bool,
}

/// For each name the in-process capture's library interposes (at place `lib` in the lookup
/// order), the first definition after it: (file, offset).
pub(super) fn forwarding_targets(lib: usize, cands: &[Candidate], scans: &[Option<Arc<Scan>>]) -> Vec<(Key, u64)> {
    let mut out = Vec::new();
    for name in crate::preload::layout::INTERPOSED {
        // cands are in lookup order.
        let hit = (0..cands.len())
            .filter(|&i| cands[i].scope.is_some_and(|s| s > lib))
            .find_map(|i| scans[i].as_ref()?.found.iter().find(|f| f.symbol == name).map(|f| (cands[i].key, f.offset)));
        if let Some(t) = hit
            && !out.contains(&t)
        {
            out.push(t);
        }
    }
    out
}

/// libc.so.6, libc-2.21.so, musl's libc.musl-x86_64.so.1 and ld-musl-x86_64.so.1: the C
/// library, whose own mmaps (thread stacks) are the program's.
pub(super) fn is_c_library(path: &Path, soname: Option<&str>) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    [name.as_str(), soname.unwrap_or("")].iter().any(|n| {
        n.starts_with("libc.so") || n.starts_with("libc-") || n.starts_with("libc.musl") || n.starts_with("ld-musl")
    })
}

/// The objects of a command's load order: the global scope in order, then the interpreter.
pub(super) fn order_candidates(order: &LoadOrder) -> Vec<Candidate> {
    let mut out = Vec::new();
    for (i, o) in order.startup_objects().enumerate() {
        let Ok(file) = o.file.try_clone() else { continue };
        let Ok(md) = file.metadata() else { continue };
        let key = (md.dev(), md.ino());
        if out.iter().any(|c: &Candidate| c.key == key) {
            continue;
        }
        out.push(Candidate { key, shown: o.path.clone(), file, scope: Some(i), executable: i == 0, mapped: true });
    }
    out
}

/// The objects a running process maps code from, opened through /proc/PID/map_files (the
/// run's `objects` hold them), each with its place in the link map.
pub(super) fn running_candidates(pid: i32, objects: &mut Objects, notes: &mut Vec<String>) -> Result<Vec<Candidate>> {
    let maps = ProcMaps::read(pid)?;
    let exe = std::fs::metadata(format!("/proc/{pid}/exe")).ok().map(|m| (m.dev(), m.ino()));
    // The link map: each object's dynamic section lies in one of its own mappings.
    let mut scope: HashMap<Key, usize> = HashMap::new();
    if let Ok(lm) = linkmap::read(pid) {
        for (i, e) in lm.entries.iter().enumerate() {
            if let Some(m) = maps.find(e.dynamic).filter(|m| m.is_file()) {
                scope.entry((m.dev, m.inode)).or_insert(i);
            }
        }
    }
    let mut out: Vec<Candidate> = Vec::new();
    for m in maps.mappings.iter().filter(|m| m.executable && m.is_file()) {
        let key = (m.dev, m.inode);
        if out.iter().any(|c| c.key == key) {
            continue;
        }
        let i = objects.open_mapping(pid, m);
        let o = objects.get(i);
        let Some(file) = o.file().and_then(|f| f.try_clone().ok()) else {
            if let crate::objects::State::Unreadable { why, retry: false } = &o.state {
                notes.push(format!("{}: not readable: {why}: not probed", o.display_name()));
            }
            continue;
        };
        let shown = m.path.as_deref().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(o.display_name()));
        out.push(Candidate {
            key,
            shown,
            file,
            scope: scope.get(&key).copied(),
            executable: Some(key) == exe,
            mapped: true,
        });
    }
    Ok(out)
}
