//! Function names by address, from an object's ELF symbol tables (its own .dynsym and .symtab,
//! and its separate debug file's .symtab): the name a frame prints, as memleak(8) prints it.
//!
//! One address often has several names. glibc's `pthread_create` is also `__pthread_create_2_1`
//! and `__GI___pthread_create`; its `__libc_start_main` is `__libc_start_main_impl` in the debug
//! file. The name users know is the exported one, so among the symbols that start at the same
//! address a global symbol wins over a local one, then the one with the fewest leading
//! underscores, then the shorter, then the first in byte order.
use std::fs::File;

use object::{Object, ObjectSymbol, SymbolKind};

#[derive(Debug, Clone)]
struct Symbol {
    start: u64,
    /// Exclusive; a symbol without a size ends where the next one starts.
    end: u64,
    name: String,
    global: bool,
}

#[derive(Debug, Default)]
pub struct SymbolTable {
    /// Sorted by start; for each start, the preferred name first.
    syms: Vec<Symbol>,
}

impl SymbolTable {
    /// The function symbols of the ELF object open as `f` (read lazily: only the tables).
    pub fn read(f: &File) -> SymbolTable {
        let cache = object::ReadCache::new(f);
        let Ok(elf) = object::File::parse(&cache) else { return SymbolTable::default() };
        let mut syms: Vec<Symbol> = elf
            .dynamic_symbols()
            .chain(elf.symbols())
            .filter(|s| s.is_definition() && s.kind() == SymbolKind::Text && s.address() != 0)
            .filter_map(|s| {
                let name = s.name().ok().filter(|n| !n.is_empty())?;
                // "name@@VERSION" in some tables: the version is not part of the name.
                let name = name.split('@').next().unwrap_or(name).to_string();
                Some(Symbol { start: s.address(), end: s.address() + s.size(), name, global: s.is_global() })
            })
            .collect();
        syms.sort_by(|a, b| a.start.cmp(&b.start).then_with(|| preference(a).cmp(&preference(b))));
        syms.dedup_by(|a, b| a.start == b.start && a.name == b.name);
        // Sizeless symbols end at the next start.
        let starts: Vec<u64> = syms.iter().map(|s| s.start).collect();
        for s in syms.iter_mut().filter(|s| s.end == s.start) {
            let next = starts.partition_point(|&x| x <= s.start);
            s.end = starts.get(next).copied().unwrap_or(u64::MAX);
        }
        SymbolTable { syms }
    }

    /// Adds the symbols of another table of the same object (its separate debug file).
    pub fn merge(&mut self, other: SymbolTable) {
        self.syms.extend(other.syms);
        self.syms.sort_by(|a, b| a.start.cmp(&b.start).then_with(|| preference(a).cmp(&preference(b))));
        self.syms.dedup_by(|a, b| a.start == b.start && a.name == b.name);
    }

    /// The function holding virtual address `vaddr` and the offset into it.
    pub fn lookup(&self, vaddr: u64) -> Option<(&str, u64)> {
        // The last start at or below vaddr; among several symbols there, the preferred one
        // that contains the address (a sized alias may be shorter than another).
        let after = self.syms.partition_point(|s| s.start <= vaddr);
        let start = self.syms.get(after.checked_sub(1)?)?.start;
        let first = self.syms[..after].partition_point(|s| s.start < start);
        self.syms[first..after].iter().find(|s| vaddr < s.end).map(|s| (s.name.as_str(), vaddr - s.start))
    }
}

/// Sort key: lower is preferred.
fn preference(s: &Symbol) -> (bool, usize, usize, String) {
    let underscores = s.name.bytes().take_while(|&b| b == b'_').count();
    (!s.global, underscores, s.name.len(), s.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(syms: &[(u64, u64, &str, bool)]) -> SymbolTable {
        let mut t = SymbolTable {
            syms: syms
                .iter()
                .map(|&(start, size, name, global)| Symbol { start, end: start + size, name: name.into(), global })
                .collect(),
        };
        t.merge(SymbolTable::default());
        t
    }

    #[test]
    fn aliases_resolve_to_the_exported_name() {
        let t = table(&[
            (0x100, 0x50, "__GI___pthread_create", false),
            (0x100, 0x50, "__pthread_create_2_1", true),
            (0x100, 0x50, "pthread_create", true),
            (0x200, 0x10, "__libc_start_main_impl", false),
            (0x200, 0x10, "__libc_start_main", true),
        ]);
        assert_eq!(t.lookup(0x120), Some(("pthread_create", 0x20)));
        assert_eq!(t.lookup(0x205), Some(("__libc_start_main", 5)));
        assert_eq!(t.lookup(0x150), None, "past the end of every symbol there");
        assert_eq!(t.lookup(0x50), None);
    }

    #[test]
    fn reads_libc_and_its_debug_file() {
        let libc = File::open("/usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        let t = SymbolTable::read(&libc);
        let (name, off) = {
            let cache = object::ReadCache::new(&libc);
            let elf = object::File::parse(&cache).unwrap();
            let s = elf.dynamic_symbols().find(|s| s.name() == Ok("malloc")).unwrap();
            (s.address(), s.size())
        };
        assert_eq!(t.lookup(name + 3), Some(("malloc", 3)));
        assert!(off > 3);
    }
}
