//! Unwind tables for stacks without frame pointers: built from each object's `.eh_frame`
//! (`table`), loaded into the BPF maps per mapped object and kept current (`maps`).
pub mod maps;
pub mod table;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

use object::Object;

pub use maps::UnwindTables;

use crate::objects::Objects;
use crate::skel::MemleakSkel;
use crate::skel::types::unwind_met;

/// The unwind tables of a run and the BPF object they feed.
pub struct Unwinder<'a, 'obj> {
    pub skel: &'a MemleakSkel<'obj>,
    pub tables: UnwindTables,
    /// Files the BPF side met that memleak has not opened yet (its wake-up ring buffer).
    pub met: Rc<RefCell<Vec<unwind_met>>>,
    pub pid: i32,
}

impl Unwinder<'_, '_> {
    /// Whether the BPF side has woken us since the last [`Unwinder::sync`].
    pub fn woken(&self) -> bool {
        !self.met.borrow().is_empty()
    }

    /// Opens and registers the files the BPF side met (at once: a dlopen'd library may be
    /// unloaded soon), and the tables of objects mapped since the last call (every tick).
    pub fn sync(&mut self, objects: &mut Objects) {
        let mut met = std::mem::take(&mut *self.met.borrow_mut());
        // A file is met at every walk until it is opened: once each, at its latest range.
        met.reverse();
        let mut seen = std::collections::HashSet::new();
        met.retain(|ev| seen.insert((ev.dev, ev.ino)));
        for ev in &met {
            self.tables.met(self.skel, objects, self.pid, ev);
        }
        self.tables.sync_process(self.skel, objects, self.pid);
        self.tables.chase(self.skel, objects, self.pid, &met);
        self.report_failures();
    }

    /// Every tick: also the files met whose wake-up was lost (its buffer was full).
    pub fn tick(&mut self, objects: &mut Objects) {
        self.sync(objects);
        self.tables.catch_up(self.skel, objects, self.pid);
        self.report_failures();
    }

    /// At an exec stop (-c): the new executable's, its interpreter's and its libraries' tables,
    /// before it runs its first instruction.
    pub fn load_exec(&mut self, objects: &mut Objects) {
        if let Ok(exe) = std::fs::read_link(format!("/proc/{}/exe", self.pid)) {
            for p in startup_objects(&exe) {
                preload_path(&mut self.tables, self.skel, objects, &p);
            }
        }
        self.sync(objects);
    }

    /// Objects that got no table, said once each.
    pub fn report_failures(&mut self) {
        for f in self.tables.failures.drain(..) {
            errln!("memleak: {f}; its frames fall back to frame pointers");
        }
    }
}

/// Registers an object by its path (-c, before the command runs), opened as a regular file
/// without blocking.
pub fn preload_path(tables: &mut UnwindTables, skel: &MemleakSkel, objects: &mut Objects, path: &Path) -> bool {
    match crate::objfile::open_regular(path) {
        Ok(f) => tables.preload(skel, objects, f, path),
        Err(e) => {
            tables.failures.push(format!("{e:#}"));
            false
        }
    }
}

/// The objects a command will map at start: itself, its interpreter, and the libraries the
/// interpreter resolves for it (`ld.so --list`, which runs none of their code nor the program's).
pub fn startup_objects(prog: &Path) -> Vec<PathBuf> {
    let mut out = vec![prog.to_path_buf()];
    let Ok(data) = std::fs::read(prog) else { return out };
    let Ok(file) = object::File::parse(&*data) else { return out };
    let Some(interp) = interpreter(&file) else { return out };
    out.push(PathBuf::from(&interp));
    if let Ok(o) = Command::new(&interp).arg("--list").arg(prog).output() {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            // "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "\t/lib64/ld-linux... (0x...)"
            let target = line.split_once("=>").map_or(line, |(_, t)| t).trim();
            if let Some(path) = target.split_whitespace().next().filter(|p| p.starts_with('/')) {
                out.push(PathBuf::from(path));
            }
        }
    }
    out.dedup();
    out
}

fn interpreter(file: &object::File) -> Option<String> {
    use object::ObjectSection;
    let sec = file.section_by_name(".interp")?;
    let data = sec.data().ok()?;
    let s = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
    (!s.is_empty()).then(|| s.to_string())
}
