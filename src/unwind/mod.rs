//! Unwind tables for stacks without frame pointers: built from each object's `.eh_frame`
//! (`table`), loaded into the BPF maps per mapped object and kept current (`maps`).
pub mod maps;
pub mod table;

use std::cell::Cell;
use std::rc::Rc;

pub use maps::UnwindTables;

use crate::skel::MemleakSkel;

/// The unwind tables of a run and the BPF object they feed.
pub struct Unwinder<'a, 'obj> {
    pub skel: &'a MemleakSkel<'obj>,
    pub tables: UnwindTables,
    /// Set when the BPF side met code of an object without a table (its wake-up ring buffer).
    pub wakeup: Rc<Cell<bool>>,
    pub pid: i32,
}

impl Unwinder<'_, '_> {
    /// Loads the tables of objects mapped since the last call: every tick, and at once when
    /// the BPF side met code of an object without a table (dlopen, exec of a -p process).
    pub fn sync(&mut self) {
        self.tables.sync_process(self.skel, self.pid);
        self.report_failures();
    }

    /// At an exec stop (-c): the new executable's, its interpreter's and its libraries' tables,
    /// before it runs its first instruction.
    pub fn load_exec(&mut self) {
        // Found as its dynamic linker will find them (with the new image's environment), not
        // by running anything. If that fails, the tables still come as the objects get mapped.
        if let Ok(order) = crate::ldso::load_order_after_exec(self.pid) {
            self.preload(&order);
        }
        self.sync();
    }

    /// The tables of the objects a program maps at start, before it runs.
    pub fn preload(&mut self, order: &crate::ldso::LoadOrder) {
        for o in order.startup_objects() {
            // Through the descriptor held since the object was found: the very file.
            self.tables.preload(self.skel, &crate::objfile::fd_path(&o.file));
        }
    }

    /// Objects that got no table, said once each.
    pub fn report_failures(&mut self) {
        for f in self.tables.failures.drain(..) {
            errln!("memleak: {f}; its frames fall back to frame pointers");
        }
    }
}
