//! Unwind tables for stacks without frame pointers: built from each object's `.eh_frame`
//! (`table`), loaded into the BPF maps per mapped object and kept current (`maps`).
pub mod maps;
pub mod table;

use std::cell::RefCell;
use std::rc::Rc;

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
}

impl Unwinder<'_, '_> {
    /// Whether the BPF side has woken us since the last [`Unwinder::sync`].
    pub fn woken(&self) -> bool {
        !self.met.borrow().is_empty()
    }

    /// Opens and registers the files the BPF side met (at once: a dlopen'd library may be
    /// unloaded soon), and the tables of objects the processes `pids` mapped since the last
    /// call (every tick).
    pub fn sync(&mut self, objects: &mut Objects, pids: &[i32]) {
        let mut met = std::mem::take(&mut *self.met.borrow_mut());
        // A file is met at every walk until it is opened: once each, at its latest range.
        met.reverse();
        let mut seen = std::collections::HashSet::new();
        met.retain(|ev| seen.insert((ev.dev, ev.ino)));
        for ev in &met {
            self.tables.met(self.skel, objects, ev);
        }
        for &pid in pids {
            self.tables.sync_process(self.skel, objects, pid);
        }
        self.tables.chase(self.skel, objects, &met);
        self.report_failures();
    }

    /// Every tick: also the files met whose wake-up was lost (its buffer was full).
    pub fn tick(&mut self, objects: &mut Objects, pids: &[i32]) {
        self.sync(objects, pids);
        self.tables.catch_up(self.skel, objects, pids);
        self.report_failures();
    }

    /// At an exec stop of process `pid`: the new executable's, its interpreter's and its
    /// libraries' tables, before it runs its first instruction.
    pub fn load_exec(&mut self, objects: &mut Objects, pid: i32) {
        // Found as its dynamic linker will find them (with the new image's environment), not
        // by running anything. If that fails, the tables still come as the objects get mapped.
        if let Ok(order) = crate::ldso::load_order_after_exec(pid) {
            self.preload(objects, &order);
        }
        self.sync(objects, &[pid]);
    }

    /// Forgets what was kept of process `pid` (it is gone).
    pub fn forget(&mut self, pid: i32) {
        self.tables.forget(pid);
    }

    /// The tables of the objects a program maps at start, before it runs; the objects are
    /// held for symbols too.
    pub fn preload(&mut self, objects: &mut Objects, order: &crate::ldso::LoadOrder) {
        for o in order.startup_objects() {
            // Through the descriptor held since the object was found: the very file.
            match o.file.try_clone() {
                Ok(f) => {
                    self.tables.preload(self.skel, objects, f, &o.path);
                }
                Err(e) => self.tables.failures.push(format!("{}: {e}", o.path.display())),
            }
        }
    }

    /// Objects that got no table, said once each.
    pub fn report_failures(&mut self) {
        for f in self.tables.failures.drain(..) {
            errln!("memleak: {f}; its frames fall back to frame pointers");
        }
    }
}
