//! What the dynamic linker reads of an object: its ELF header, checked as glibc 2.36's
//! open_verify checks it (an object of another class or machine is skipped, a broken one is an
//! error), its PT_INTERP, and the DT_NEEDED, DT_SONAME, DT_RPATH, DT_RUNPATH and DT_FLAGS_1 of
//! its PT_DYNAMIC. Only those bytes are read (pread, each bounded), not the whole file.
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileExt;

use object::LittleEndian as LE;
use object::elf;
use object::pod;

/// Longest PT_INTERP or dynamic string read (PATH_MAX).
const MAX_STRING: usize = 4096;
/// Most program headers read (e_phnum is 16 bits; PN_XNUM objects are refused).
const MAX_PHNUM: usize = 0xffff;
/// Largest PT_DYNAMIC read: 64 Ki entries.
const MAX_DYNAMIC: u64 = 1 << 20;

pub const DF_1_NODEFLIB: u64 = 0x800;

/// The dynamic-linking facts of one object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dynamic {
    /// PT_INTERP, for an executable the kernel starts through a dynamic linker.
    pub interp: Option<OsString>,
    /// Whether it has a PT_DYNAMIC segment.
    pub dynamic: bool,
    pub needed: Vec<OsString>,
    pub soname: Option<OsString>,
    pub rpath: Option<OsString>,
    pub runpath: Option<OsString>,
    pub flags_1: u64,
    /// Whether it has DT_FILTER or DT_AUXILIARY entries (filter objects).
    pub filters: bool,
}

/// Why an object cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// A 32-bit object, or one for another machine: ld.so skips it and searches on.
    Skip(&'static str),
    /// Anything else: ld.so stops with this error (the program does not start).
    Fatal(String),
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Reject::Skip(s) => f.write_str(s),
            Reject::Fatal(s) => f.write_str(s),
        }
    }
}

fn fatal(s: impl Into<String>) -> Reject {
    Reject::Fatal(s.into())
}

fn read_at(f: &File, off: u64, len: usize) -> Result<Vec<u8>, Reject> {
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, off).map_err(|e| fatal(format!("cannot read file data: {e}")))?;
    Ok(buf)
}

/// The NUL-terminated string at `off`, read in growing chunks up to MAX_STRING bytes.
fn string_at(f: &File, off: u64) -> Result<OsString, Reject> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 256];
    while out.len() < MAX_STRING {
        let n =
            f.read_at(&mut chunk, off + out.len() as u64).map_err(|e| fatal(format!("cannot read file data: {e}")))?;
        if n == 0 {
            break;
        }
        if let Some(end) = chunk[..n].iter().position(|&b| b == 0) {
            out.extend_from_slice(&chunk[..end]);
            return Ok(OsString::from_vec(out));
        }
        out.extend_from_slice(&chunk[..n]);
    }
    Err(fatal("a dynamic string runs past the end of the file or over 4096 bytes"))
}

/// Checks an object's header as ld.so checks a library it opens, and reads what dynamic
/// linking needs of it.
pub fn read(f: &File) -> Result<Dynamic, Reject> {
    read_checked(f, true)
}

/// Reads what dynamic linking needs of an executable or interpreter the kernel maps (after
/// objfile::check_elf, which checks what the kernel checks): ld.so does not verify those.
pub fn read_mapped(f: &File) -> Result<Dynamic, Reject> {
    read_checked(f, false)
}

fn read_checked(f: &File, verify: bool) -> Result<Dynamic, Reject> {
    let mut head = [0u8; 64];
    let n = f.read_at(&mut head, 0).map_err(|e| fatal(format!("cannot read file data: {e}")))?;
    if n < head.len() {
        return Err(fatal("file too short"));
    }
    let (h, _) = pod::from_bytes::<elf::FileHeader64<LE>>(&head).map_err(|_| fatal("file too short"))?;
    let id = &h.e_ident;
    if id.magic != elf::ELFMAG {
        return Err(fatal("invalid ELF header"));
    }
    if id.class != elf::ELFCLASS64 {
        return Err(Reject::Skip("a 32-bit object"));
    }
    // Debian's ld.so checks the machine before the byte order (its machine-mismatch patch).
    if u16::from_le_bytes([head[18], head[19]]) != elf::EM_X86_64 {
        return Err(Reject::Skip("an object for another machine"));
    }
    if !verify {
        return read_dynamic(f, &head);
    }
    if id.data != elf::ELFDATA2LSB {
        return Err(fatal("ELF file data encoding not little-endian"));
    }
    if id.version != elf::EV_CURRENT {
        return Err(fatal("ELF file version ident does not match current one"));
    }
    // Linux's ld.so takes System V and GNU objects (ABI version: 0, or small for GNU).
    let abi_ok = match id.os_abi {
        elf::ELFOSABI_SYSV => id.abi_version == 0,
        elf::ELFOSABI_GNU => id.abi_version < 16,
        _ => return Err(fatal("ELF file OS ABI invalid")),
    };
    if !abi_ok {
        return Err(fatal("ELF file ABI version invalid"));
    }
    if id.padding.iter().any(|&b| b != 0) {
        return Err(fatal("nonzero padding in e_ident"));
    }
    if h.e_version.get(LE) != u32::from(elf::EV_CURRENT) {
        return Err(fatal("ELF file version does not match current one"));
    }
    let e_type = h.e_type.get(LE);
    if e_type != elf::ET_DYN && e_type != elf::ET_EXEC {
        return Err(fatal("only ET_DYN and ET_EXEC can be loaded"));
    }
    read_dynamic(f, &head)
}

fn read_dynamic(f: &File, head: &[u8; 64]) -> Result<Dynamic, Reject> {
    let (h, _) = pod::from_bytes::<elf::FileHeader64<LE>>(head).map_err(|_| fatal("file too short"))?;
    if usize::from(h.e_phentsize.get(LE)) != std::mem::size_of::<elf::ProgramHeader64<LE>>() {
        return Err(fatal("ELF file's phentsize not the expected size"));
    }
    let phnum = usize::from(h.e_phnum.get(LE)).min(MAX_PHNUM);
    let raw = read_at(f, h.e_phoff.get(LE), phnum * std::mem::size_of::<elf::ProgramHeader64<LE>>())?;
    let (phdrs, _) =
        pod::slice_from_bytes::<elf::ProgramHeader64<LE>>(&raw, phnum).map_err(|_| fatal("cannot read file data"))?;

    let mut out = Dynamic::default();
    let mut dynamic = None;
    for ph in phdrs {
        match ph.p_type.get(LE) {
            elf::PT_INTERP => {
                let s = string_at(f, ph.p_offset.get(LE))?;
                out.interp = Some(s);
            }
            elf::PT_DYNAMIC => dynamic = Some((ph.p_offset.get(LE), ph.p_filesz.get(LE))),
            _ => {}
        }
    }
    let Some((off, size)) = dynamic else { return Ok(out) };
    out.dynamic = true;
    if size > MAX_DYNAMIC {
        return Err(fatal(format!("a dynamic section of {size} bytes")));
    }
    let count = size as usize / std::mem::size_of::<elf::Dyn64<LE>>();
    let raw = read_at(f, off, count * std::mem::size_of::<elf::Dyn64<LE>>())?;
    let (dyns, _) = pod::slice_from_bytes::<elf::Dyn64<LE>>(&raw, count).map_err(|_| fatal("cannot read file data"))?;
    let mut strtab = None;
    let mut needed = Vec::new();
    let (mut soname, mut rpath, mut runpath) = (None, None, None);
    for d in dyns {
        let (tag, val) = (d.d_tag.get(LE), d.d_val.get(LE));
        match u32::try_from(tag).unwrap_or(u32::MAX) {
            elf::DT_NULL => break,
            elf::DT_NEEDED => needed.push(val),
            elf::DT_SONAME => soname = Some(val),
            elf::DT_RPATH => rpath = Some(val),
            elf::DT_RUNPATH => runpath = Some(val),
            elf::DT_STRTAB => strtab = Some(val),
            elf::DT_FLAGS_1 => out.flags_1 = val,
            elf::DT_AUXILIARY | elf::DT_FILTER => out.filters = true,
            _ => {}
        }
    }
    if needed.is_empty() && soname.is_none() && rpath.is_none() && runpath.is_none() {
        return Ok(out);
    }
    // DT_STRTAB is an address: the file offset is found through the PT_LOAD that holds it.
    let strtab = strtab.ok_or_else(|| fatal("a dynamic section without DT_STRTAB"))?;
    let base = phdrs
        .iter()
        .filter(|ph| ph.p_type.get(LE) == elf::PT_LOAD)
        .find(|ph| {
            let (va, sz) = (ph.p_vaddr.get(LE), ph.p_filesz.get(LE));
            strtab >= va && strtab - va < sz
        })
        .map(|ph| strtab - ph.p_vaddr.get(LE) + ph.p_offset.get(LE))
        .ok_or_else(|| fatal("DT_STRTAB outside the file's loaded segments"))?;
    let s = |v: u64| string_at(f, base.saturating_add(v));
    out.needed = needed.into_iter().map(s).collect::<Result<_, _>>()?;
    out.soname = soname.map(s).transpose()?;
    out.rpath = rpath.map(s).transpose()?;
    out.runpath = runpath.map(s).transpose()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(p: &str) -> File {
        File::open(p).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    #[test]
    fn reads_a_system_programs_dynamic_section() {
        let d = read(&open("/bin/ls")).expect("ls is a dynamic executable");
        assert_eq!(d.interp.as_deref(), Some(std::ffi::OsStr::new("/lib64/ld-linux-x86-64.so.2")));
        assert!(d.dynamic);
        assert!(d.needed.iter().any(|n| n == "libc.so.6"), "{d:?}");
        let libc = read(&open("/lib/x86_64-linux-gnu/libc.so.6")).expect("libc");
        assert_eq!(libc.soname.as_deref(), Some(std::ffi::OsStr::new("libc.so.6")));
        assert!(libc.needed.iter().any(|n| n == "ld-linux-x86-64.so.2"), "{libc:?}");
        assert_eq!(libc.interp.as_deref(), Some(std::ffi::OsStr::new("/lib64/ld-linux-x86-64.so.2")));
    }

    #[test]
    fn other_classes_and_machines_are_skipped_broken_files_are_fatal() {
        let dir = std::env::temp_dir().join(format!("memleak-ldso-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut bytes = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        bytes.truncate(1 << 16);
        let write = |name: &str, b: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, b).unwrap();
            File::open(p).unwrap()
        };
        let mut c32 = bytes.clone();
        c32[4] = elf::ELFCLASS32;
        assert_eq!(read(&write("c32", &c32)), Err(Reject::Skip("a 32-bit object")));
        let mut arm = bytes.clone();
        arm[18..20].copy_from_slice(&elf::EM_AARCH64.to_le_bytes());
        assert_eq!(read(&write("arm", &arm)), Err(Reject::Skip("an object for another machine")));
        let script = b"/* GNU ld script: a text file, as libc.so is */\nGROUP ( /lib/x86_64-linux-gnu/libc.so.6 )\n";
        assert_eq!(read(&write("text", script)), Err(fatal("invalid ELF header")));
        assert_eq!(read(&write("short", &bytes[..20])), Err(fatal("file too short")));
        let mut rel = bytes.clone();
        rel[16..18].copy_from_slice(&elf::ET_REL.to_le_bytes());
        assert_eq!(read(&write("rel", &rel)), Err(fatal("only ET_DYN and ET_EXEC can be loaded")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
