//! The unwind tables the preload library walks: the BPF maps' rules, pages and rows
//! (docs/unwinding.md's format, src/unwind/ builds them), mirrored at the same indexes into a
//! memfd every process maps read-only. An object's `unwind_object` in the BPF map then describes
//! its table here too.
use std::cell::RefCell;
use std::rc::Rc;

use anyhow::Result;

use super::layout::{Page, Rule, TABLES_MAGIC, TablesHeader};
use super::shm::Shm;
use crate::skel::types::{unwind_page, unwind_rule};

/// Capacities: those of the BPF maps (src/bpf/unwind.bpf.h).
pub const MAX_RULES: u32 = 65536;
pub const MAX_PAGES: u32 = 65536;
pub const MAX_ROWS: u32 = 1 << 21;

const fn align(n: usize) -> usize {
    n.next_multiple_of(4096)
}

const RULES_OFF: usize = 4096;
const PAGES_OFF: usize = RULES_OFF + align(MAX_RULES as usize * size_of::<Rule>());
const ROWS_OFF: usize = PAGES_OFF + align(MAX_PAGES as usize * size_of::<Page>());
const SIZE: usize = ROWS_OFF + align(MAX_ROWS as usize * 4);

pub struct Tables {
    pub shm: Shm,
}

impl Tables {
    pub fn new() -> Result<Tables> {
        // Shared by every process: none can write it, even by reopening its read-only
        // descriptor through /proc.
        let shm = Shm::new(c"memleak-unwind-tables", SIZE, libc::F_SEAL_FUTURE_WRITE)?;
        // SAFETY: the header at the start of the fresh zeroed mapping, ours alone so far.
        let h = unsafe { &mut *(shm.ptr as *mut TablesHeader) };
        h.magic = TABLES_MAGIC;
        h.max_rules = MAX_RULES;
        h.max_pages = MAX_PAGES;
        h.max_rows = MAX_ROWS;
        h.rules_off = RULES_OFF as u64;
        h.pages_off = PAGES_OFF as u64;
        h.rows_off = ROWS_OFF as u64;
        h.size = SIZE as u64;
        Ok(Tables { shm })
    }

    /// Writes `vals` at index `first` of the array of `cap` elements at `off` (what does not
    /// fit is left out: the BPF maps refused it already).
    fn write<T: Copy>(&self, off: usize, cap: u32, first: u32, vals: &[T]) {
        let n = (cap.saturating_sub(first) as usize).min(vals.len());
        // SAFETY: [first, first + n) lies inside the array; processes only read it.
        unsafe {
            let dst = self.shm.ptr.add(off).cast::<T>().add(first as usize);
            std::ptr::copy_nonoverlapping(vals.as_ptr(), dst, n);
        }
    }
}

/// The mirror src/unwind/maps.rs writes into.
pub struct Mirror(pub Rc<RefCell<Tables>>);

impl crate::unwind::maps::Mirror for Mirror {
    fn rule(&mut self, index: u32, r: &unwind_rule) {
        let v = Rule { cfa: r.cfa, rbp: r.rbp, aux: r.aux, pad: 0, cfa_off: r.cfa_off, rbp_off: r.rbp_off };
        self.0.borrow().write(RULES_OFF, MAX_RULES, index, &[v]);
    }

    fn pages(&mut self, first: u32, pages: &[unwind_page]) {
        let v: Vec<Page> = pages.iter().map(|p| Page { first_row: p.first_row, nrows: p.nrows }).collect();
        self.0.borrow().write(PAGES_OFF, MAX_PAGES, first, &v);
    }

    fn rows(&mut self, first: u32, rows: &[u32]) {
        self.0.borrow().write(ROWS_OFF, MAX_ROWS, first, rows);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_layout_is_page_aligned_and_holds_the_bpf_capacities() {
        let offs = [RULES_OFF, PAGES_OFF, ROWS_OFF, SIZE];
        assert!(offs.windows(2).all(|w| w[0] < w[1]));
        assert!(offs.iter().all(|o| o % 4096 == 0));
        assert!(PAGES_OFF - RULES_OFF >= MAX_RULES as usize * 12);
        assert!(SIZE - ROWS_OFF >= MAX_ROWS as usize * 4);
    }
}
