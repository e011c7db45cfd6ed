//! The objects (ELF files) a traced process maps, each opened once, through
//! /proc/PID/map_files while it is mapped (or handed over already open: -c's objects before the
//! command runs), and held for the whole run. Unwind tables, symbols and probes read them through
//! the descriptor: nothing is reopened by a path the process could change.
//!
//! Each object also has an id, the one the BPF unwinder records per frame with its file offset
//! (`struct stack` locs): a frame is symbolized from the object mapped when its stack was
//! captured, whatever the process maps at that address later.
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::procmaps::{Mapping, kernel_dev};

/// A file as the BPF side names it: (device in the kernel's encoding, inode).
pub type Key = (u32, u64);

/// Ids user space gives (the BPF side gives those below: `UNWIND_USER_IDS` in memleak.h).
pub const USER_IDS: u32 = 0x8000_0000;

/// What a frame in an object that could not be read says (after "not readable: "), when it was
/// unmapped before memleak could open it.
pub const UNMAPPED: &str = "unmapped before memleak could open it";

pub enum State {
    Open(File),
    /// Never opened. `retry`: the failure may pass (the mapping was gone when memleak looked),
    /// so the object is opened the next time it is seen mapped.
    Unreadable {
        why: String,
        retry: bool,
    },
}

pub struct Object {
    pub key: Key,
    /// The path as the process sees it (in /proc/PID/maps); until it was seen mapped, the path
    /// it was opened by, or None.
    pub name: Option<Arc<Path>>,
    named_by_maps: bool,
    pub state: State,
    /// The id stack frames name it by; 0 while it has none.
    pub id: u32,
}

impl Object {
    /// What reports print as its module: its path, else its device and inode.
    pub fn display_name(&self) -> String {
        match &self.name {
            Some(n) => n.to_string_lossy().into_owned(),
            None => format!("device {}:{} inode {}", self.key.0 >> 20, self.key.0 & 0xfffff, self.key.1),
        }
    }

    /// The file, when it could be opened.
    pub fn file(&self) -> Option<&File> {
        match &self.state {
            State::Open(f) => Some(f),
            State::Unreadable { .. } => None,
        }
    }
}

#[derive(Default)]
pub struct Objects {
    objs: Vec<Object>,
    by_key: HashMap<Key, usize>,
    by_id: HashMap<u32, usize>,
    next_user_id: u32,
}

impl Objects {
    pub fn get(&self, i: usize) -> &Object {
        &self.objs[i]
    }

    pub fn by_id(&self, id: u32) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    pub fn by_key(&self, key: Key) -> Option<usize> {
        self.by_key.get(&key).copied()
    }

    /// The object a file mapping shows, opened now unless it is open already (or cannot be).
    /// `m.path`, when known, must come from the same read of /proc/PID/maps as its range,
    /// dev and inode.
    pub fn open_mapping(&mut self, pid: i32, m: &Mapping) -> usize {
        let key = (m.kernel_dev(), m.inode);
        match self.by_key.get(&key) {
            Some(&i) => {
                let o = &mut self.objs[i];
                if matches!(o.state, State::Unreadable { retry: true, .. }) {
                    o.state = open_state(pid, m, &mut o.name);
                }
                if !o.named_by_maps && m.path.is_some() {
                    o.name = m.path.clone();
                    o.named_by_maps = true;
                }
                i
            }
            None => {
                let mut name = m.path.clone();
                let state = open_state(pid, m, &mut name);
                self.insert(Object { key, name, named_by_maps: m.path.is_some(), state, id: 0 })
            }
        }
    }

    /// A file memleak opened itself (-c: the command's objects, before it runs), named `name`.
    pub fn add_file(&mut self, file: File, name: &Path) -> Result<usize> {
        use std::os::unix::fs::MetadataExt;
        let md = file.metadata().with_context(|| format!("cannot stat {}", name.display()))?;
        let key = (kernel_dev(md.dev()), md.ino());
        Ok(match self.by_key.get(&key) {
            Some(&i) => {
                if self.objs[i].file().is_none() {
                    self.objs[i].state = State::Open(file);
                    self.objs[i].name.get_or_insert_with(|| Arc::from(name));
                }
                i
            }
            None => self.insert(Object {
                key,
                name: Some(Arc::from(name)),
                named_by_maps: false,
                state: State::Open(file),
                id: 0,
            }),
        })
    }

    /// An object the BPF side met and gave `id`, known here only by its key so far.
    pub fn met(&mut self, key: Key, id: u32) -> usize {
        let i = match self.by_key.get(&key) {
            Some(&i) => i,
            None => self.insert(Object {
                key,
                name: None,
                named_by_maps: false,
                state: State::Unreadable { why: UNMAPPED.into(), retry: true },
                id: 0,
            }),
        };
        self.set_id(i, id);
        i
    }

    /// Names object `i` by `id` in stack frames.
    pub fn set_id(&mut self, i: usize, id: u32) {
        if id != 0 && self.objs[i].id != id {
            self.objs[i].id = id;
            self.by_id.insert(id, i);
        }
    }

    /// A new id for an object registered by user space first.
    pub fn new_user_id(&mut self) -> u32 {
        self.next_user_id += 1;
        USER_IDS | self.next_user_id
    }

    fn insert(&mut self, o: Object) -> usize {
        let i = self.objs.len();
        self.by_key.insert(o.key, i);
        if o.id != 0 {
            self.by_id.insert(o.id, i);
        }
        self.objs.push(o);
        i
    }
}

/// Opens a mapping's file; without a path (only its range was known), `name` gets the path of
/// the very file opened.
/// Raises the soft limit of open files to the hard limit: memleak holds a descriptor per
/// object the process maps (a few hundred for a large program).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn open_state(pid: i32, m: &Mapping, name: &mut Option<Arc<Path>>) -> State {
    match m.open(pid) {
        Ok(f) => {
            if name.is_none() {
                *name = std::fs::read_link(crate::objfile::fd_path(&f)).ok().map(|p| Arc::from(p.as_path()));
            }
            State::Open(f)
        }
        Err(e) => {
            // Gone (unmapped, another file there now, or the process exited): it may be mapped
            // again later.
            let gone = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                    io.kind() == std::io::ErrorKind::NotFound || io.raw_os_error() == Some(libc::ESRCH)
                })
            });
            let why = if gone { UNMAPPED.to_string() } else { format!("{e:#}") };
            State::Unreadable { why, retry: gone }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procmaps::ProcMaps;

    #[test]
    fn a_mapping_is_opened_once_and_a_gone_one_says_why() {
        let me = std::process::id() as i32;
        let maps = ProcMaps::read(me).unwrap();
        let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
        let m = maps.mappings.iter().find(|m| m.path.as_deref() == Some(exe.as_path())).unwrap();
        let mut objs = Objects::default();
        let i = objs.open_mapping(me, m);
        assert!(objs.get(i).file().is_some());
        assert_eq!(objs.open_mapping(me, m), i, "opened once");
        assert_eq!(objs.get(i).display_name(), exe.display().to_string());
        let gone = Mapping { start: 0x1000, end: 0x2000, inode: m.inode + 1, ..m.clone() };
        let j = objs.open_mapping(me, &gone);
        match &objs.get(j).state {
            State::Unreadable { why, retry } => assert!(*retry && why == UNMAPPED, "{why}"),
            State::Open(_) => panic!("opened an unmapped range"),
        }
        let k = objs.met((1 << 20 | 3, 99), 7);
        assert_eq!(objs.by_id(7), Some(k));
        assert_eq!(objs.get(k).display_name(), "device 1:3 inode 99");
    }
}
