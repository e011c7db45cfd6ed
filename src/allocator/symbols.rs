//! What one ELF object defines of the allocator functions memleak knows (families.rs), read
//! through a descriptor held since the object was found, a few pages at a time: a large library
//! is not read whole to learn that it defines no malloc.
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};
use object::read::ReadCache;
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

use super::families::Spec;

/// Which symbol tables are searched besides the dynamic one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symtab {
    /// Only `.dynsym`: what a library exports, the names the dynamic linker binds.
    No,
    /// Also the global symbols of `.symtab`: an executable's own allocator (linked in
    /// statically, maybe under a prefix such as `je_`), which it need not export.
    Global,
    /// Also local ones: the object was named with -O.
    Any,
}

/// One function found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub symbol: String,
    /// Its row in the table (families.rs): aliases are named in table order.
    pub rank: usize,
    pub spec: Spec,
    /// File offset of its first instruction.
    pub offset: u64,
    /// Its size in bytes (0: unknown).
    pub size: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub found: Vec<Found>,
    pub soname: Option<String>,
    /// A Go program (its build-id note or build info section).
    pub go: bool,
    /// Has a PT_INTERP: started by a dynamic linker (false: a static executable, or a library
    /// that is not also a program).
    pub interp: bool,
}

/// The functions looked for: symbol → (row, meaning).
pub type Wanted = HashMap<String, (usize, Spec)>;

/// [`families::wanted`](super::families::wanted) by symbol.
pub fn wanted_map(prefix: &str) -> Wanted {
    super::families::wanted(prefix).into_iter().enumerate().map(|(i, (n, s))| (n, (i, s))).collect()
}

/// What `file` (shown as `what`) defines of `wanted`, in table order.
pub fn scan(file: &File, what: &Path, wanted: &Wanted, symtab: Symtab) -> Result<Scan> {
    let cache = ReadCache::new(file.try_clone().context("dup")?);
    let elf = object::File::parse(&cache).with_context(|| format!("{} is not an ELF object", what.display()))?;
    let mut scan = Scan {
        go: elf.section_by_name(".go.buildinfo").is_some() || elf.section_by_name(".note.go.buildid").is_some(),
        soname: soname(&elf),
        interp: interp(&elf),
        ..Scan::default()
    };
    let mut seen = std::collections::HashSet::new();
    let mut take = |s: &object::Symbol<'_, '_, &ReadCache<File>>, scan: &mut Scan| {
        if !s.is_definition() || s.kind() != SymbolKind::Text {
            return;
        }
        let Ok(name) = s.name() else { return };
        let Some(&(rank, spec)) = wanted.get(name) else { return };
        if !seen.insert(name.to_string()) {
            return; // the dynamic table's entry comes first
        }
        if let Some(offset) = vaddr_to_offset(&elf, s.address()) {
            scan.found.push(Found { symbol: name.to_string(), rank, spec, offset, size: s.size() });
        }
    };
    for s in elf.dynamic_symbols() {
        take(&s, &mut scan);
    }
    if symtab != Symtab::No {
        for s in elf.symbols() {
            if symtab == Symtab::Any || s.is_global() {
                take(&s, &mut scan);
            }
        }
    }
    scan.found.sort_by_key(|f| f.rank);
    Ok(scan)
}

fn soname<'d>(elf: &object::File<'d, &'d ReadCache<File>>) -> Option<String> {
    // DT_SONAME lives in the dynamic section; object's ELF reader gives it through the
    // section's entries.
    use object::elf::{DT_SONAME, FileHeader64};
    use object::read::elf::{Dyn, ElfFile64, FileHeader};
    let object::File::Elf64(e) = elf else { return None };
    let e: &ElfFile64<'d, object::Endianness, &'d ReadCache<File>> = e;
    let endian = e.endian();
    let header: &FileHeader64<object::Endianness> = e.elf_header();
    let data = e.data();
    let sections = header.sections(endian, data).ok()?;
    let (dynamic, link) = sections.dynamic(endian, data).ok()??;
    let strings = sections.strings(endian, data, link).ok()?;
    for d in dynamic {
        if d.d_tag(endian) as u32 == DT_SONAME {
            let name = strings.get(d.d_val(endian).try_into().ok()?).ok()?;
            return Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    None
}

fn interp<'d>(elf: &object::File<'d, &'d ReadCache<File>>) -> bool {
    use object::read::elf::ProgramHeader;
    let object::File::Elf64(e) = elf else { return false };
    let endian = e.endian();
    e.elf_program_headers().iter().any(|p| p.p_type(endian) == object::elf::PT_INTERP)
}

/// The file offset of virtual address `vaddr`.
pub fn vaddr_to_offset<'d, R: object::ReadRef<'d>>(elf: &object::File<'d, R>, vaddr: u64) -> Option<u64> {
    elf.segments().find_map(|seg| {
        let (off, size) = seg.file_range();
        (vaddr >= seg.address() && vaddr < seg.address() + size).then(|| vaddr - seg.address() + off)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libc_defines_the_c_names_and_the_linker_its_hook() {
        let libc = File::open("/usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        let s = scan(&libc, Path::new("libc.so.6"), &wanted_map(""), Symtab::No).unwrap();
        let names: Vec<&str> = s.found.iter().map(|f| f.symbol.as_str()).collect();
        for n in ["malloc", "free", "calloc", "realloc", "mmap", "munmap", "mprotect", "__libc_malloc"] {
            assert!(names.contains(&n), "{n} not in {names:?}");
        }
        assert!(!names.contains(&"_Znwm"));
        assert_eq!(s.soname.as_deref(), Some("libc.so.6"));
        assert!(!s.go);
        let ld = File::open("/lib64/ld-linux-x86-64.so.2").unwrap();
        let s = scan(&ld, Path::new("ld.so"), &wanted_map(""), Symtab::No).unwrap();
        let names: Vec<&str> = s.found.iter().map(|f| f.symbol.as_str()).collect();
        assert_eq!(names, ["_dl_debug_state"]);
    }

    #[test]
    fn a_prefix_finds_only_prefixed_names() {
        let libc = File::open("/usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        let s = scan(&libc, Path::new("libc.so.6"), &wanted_map("je_"), Symtab::No).unwrap();
        assert!(s.found.is_empty(), "{:?}", s.found);
    }
}
