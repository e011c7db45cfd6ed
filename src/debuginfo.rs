//! Where an object's DWARF (file:line, inlined functions) is read from: chosen here, never by
//! blazesym's own search. Given a path, blazesym follows an object's `.gnu_debuglink`,
//! `.gnu_debugaltlink` and `.debug_sup` by itself: it resolves /proc/self/fd/N back to the
//! path the process mapped (realpath), reads that file again for its build-id, and opens files
//! in that directory and at the absolute paths the sections name: paths the traced process
//! controls (a FIFO there would block memleak, a symlink to a root-only file would print its
//! contents). So blazesym reads DWARF only from
//! - the object itself, through its descriptor, when it names no other file; or
//! - a separate debug file found by the object's build-id under the root-owned
//!   /usr/lib/debug/.build-id (and /lib/debug/.build-id), opened here as a regular file whose
//!   build-id matches, and read at virtual addresses (its own file offsets mean nothing).
//!
//! `.gnu_debuglink` names are not followed: Debian, Ubuntu and Fedora install every debug file
//! under its build-id too.
use std::fs::File;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection, ObjectSegment};

/// Directories blazesym searches by default; only their build-id trees are used here.
const DEBUG_DIRS: [&str; 2] = ["/usr/lib/debug", "/lib/debug"];

/// Sections that make blazesym open another file by a name the object chose.
const LINKS: [&str; 3] = [".gnu_debuglink", ".gnu_debugaltlink", ".debug_sup"];

pub enum Dwarf {
    /// In the object itself.
    Own,
    /// In a separate debug file, held open; addresses are translated by the object's
    /// loadable segments: (file offset, size, virtual address).
    Separate { file: File, segments: Vec<(u64, u64, u64)> },
    /// None: the ELF symbol tables only.
    None,
}

/// Where the DWARF of the object open as `f` is.
pub fn find(f: &File) -> Dwarf {
    find_in(f, &DEBUG_DIRS.map(PathBuf::from))
}

fn find_in(f: &File, dirs: &[PathBuf]) -> Dwarf {
    let cache = object::ReadCache::new(f);
    let Ok(elf) = object::File::parse(&cache) else { return Dwarf::None };
    let has = |name: &str| elf.section_by_name(name).is_some_and(|s| s.file_range().is_some_and(|(_, n)| n > 0));
    let links = LINKS.iter().any(|l| elf.section_by_name(l).is_some());
    if has(".debug_info") && !links {
        return Dwarf::Own;
    }
    let Ok(Some(id)) = elf.build_id() else { return Dwarf::None };
    // Build-ids shorter than this are bogus (as blazesym and gdb also judge).
    if id.len() < 8 {
        return Dwarf::None;
    }
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let rel = Path::new(".build-id").join(&hex[..2]).join(format!("{}.debug", &hex[2..]));
    let segments = segments_of(&elf);
    for dir in dirs {
        let Ok(file) = crate::objfile::open_regular(&dir.join(&rel)) else { continue };
        let same = {
            let cache = object::ReadCache::new(&file);
            object::File::parse(&cache).ok().and_then(|d| d.build_id().ok().flatten().map(|b| b == id)) == Some(true)
        };
        if same {
            return Dwarf::Separate { file, segments };
        }
    }
    Dwarf::None
}

/// The loadable segments of the object open as `f`: (file offset, size, virtual address).
pub fn segments(f: &File) -> Vec<(u64, u64, u64)> {
    let cache = object::ReadCache::new(f);
    object::File::parse(&cache).map(|elf| segments_of(&elf)).unwrap_or_default()
}

fn segments_of<'d, R: object::ReadRef<'d>>(elf: &object::File<'d, R>) -> Vec<(u64, u64, u64)> {
    elf.segments()
        .map(|s| {
            let (off, size) = s.file_range();
            (off, size, s.address())
        })
        .collect()
}

/// The GNU build-id of the object open as `f`, in hex.
pub fn build_id(f: &File) -> Option<String> {
    let cache = object::ReadCache::new(f);
    let elf = object::File::parse(&cache).ok()?;
    let id = elf.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// The virtual address of file offset `off`, by the object's segments.
pub fn vaddr(segments: &[(u64, u64, u64)], off: u64) -> Option<u64> {
    segments.iter().find(|&&(o, n, _)| off >= o && off < o + n).map(|&(o, _, va)| va + (off - o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_dwarf_when_no_link_else_by_build_id_in_fixed_dirs_only() {
        // gcc -g: its own DWARF, no debug link.
        let dir = std::env::temp_dir().join(format!("memleak-debuginfo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, exe) = (dir.join("a.c"), dir.join("a"));
        std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
        let st = std::process::Command::new("gcc").args(["-g", "-o"]).arg(&exe).arg(&src).status().unwrap();
        assert!(st.success());
        assert!(matches!(find(&File::open(&exe).unwrap()), Dwarf::Own));
        // Its debug info moved out and linked: not Own (the link is not followed).
        let st = std::process::Command::new("objcopy").arg("--add-gnu-debuglink").arg(&src).arg(&exe).status().unwrap();
        assert!(st.success());
        assert!(!matches!(find(&File::open(&exe).unwrap()), Dwarf::Own));
        std::fs::remove_dir_all(&dir).unwrap();
        // libc (Debian) names its debug file with .gnu_debuglink: never Own.
        let libc = File::open("/usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        assert!(matches!(find(&libc), Dwarf::Separate { .. }), "libc6-dbg has libc's debug file by build-id");
        // A directory without the build-id tree: nothing is found there.
        assert!(matches!(find_in(&libc, &[std::env::temp_dir()]), Dwarf::None));
        assert_eq!(vaddr(&[(0x1000, 0x2000, 0x401000)], 0x1800), Some(0x401800));
        assert_eq!(vaddr(&[(0x1000, 0x2000, 0x401000)], 0x3000), None);
    }
}
