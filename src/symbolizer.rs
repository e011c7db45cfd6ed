//! Symbolizer: turns stack frames into `function+0xoff [module] (addr)` lines.
//!
//! A frame the table unwinder located says which object held it and at which file offset
//! (`struct stack` locs): it is symbolized from that object, opened through
//! /proc/PID/map_files when the process mapped it and held since (src/objects.rs), whatever
//! the process maps at that address later (a library unloaded, another one loaded there). Other
//! frames (--frame-pointers, code in no file, kernel mode) are normalized to (object, file
//! offset) from /proc/PID/maps while the process lives. Either way, a report printed after the
//! process has exited is symbolized as well as the ones before.
//!
//! With DWARF (in the object, or a separate debug file found by build-id: src/debuginfo.rs) a
//! frame gains ` file:line`, and functions inlined at the address print as frames of their own
//! before it. Mangled C++ and Rust names are demangled (src/demangle.rs). Every address is a
//! return address: it is looked up at address - 1, the call, and printed as it is. A frame of
//! an object memleak could not read prints `[unknown] [module] (addr) [not readable: why]`.
//! Kernel mode: addresses are kernel text, symbolized from /proc/kallsyms.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blazesym::MaybeDefault;
use blazesym::symbolize::source::{Elf, Kernel, Source};
use blazesym::symbolize::{CodeInfo, Input, Symbolized, Symbolizer as Blaze};

use crate::debuginfo::{self, Dwarf};
use crate::demangle::demangle;
use crate::objects::{Objects, State};
use crate::procmaps::ProcMaps;
use crate::symtab::SymbolTable;

/// A frame as stored: its return address and, when the unwinder located it, its object id and
/// file offset (`id << 32 | offset`, 0 if not located).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RawFrame {
    pub ip: u64,
    pub loc: u64,
}

impl RawFrame {
    /// (object id, file offset), when located.
    fn located(&self) -> Option<(u32, u64)> {
        let id = (self.loc >> 32) as u32;
        (id != 0).then_some((id, self.loc & 0xffff_ffff))
    }
}

/// Where an address lives in its file, as /proc/PID/maps showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    /// In object `obj` (an index in [`Objects`]) at a file offset.
    File { obj: usize, offset: u64 },
    /// Mapped, but not from a file we can read (anonymous memory, JIT code, [vdso]).
    Other { name: Option<Arc<Path>> },
    /// In no mapping we saw.
    Unmapped,
}

/// A symbolized frame.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    pub addr: u64,
    /// Function and offset within it, if known.
    pub symbol: Option<(String, u64)>,
    /// The module path, or a pseudo-name.
    pub module: Option<String>,
    /// `file:line` of the call, when DWARF has it.
    pub line: Option<String>,
    /// Functions inlined at this address, innermost first, each with its own `file:line`.
    pub inlined: Vec<(String, Option<String>)>,
    /// Why its module could not be read, if it could not.
    pub unreadable: Option<String>,
    /// The address's offset in its module's file, when known (pprof mappings).
    pub file_offset: Option<u64>,
    /// The module's GNU build-id in hex, when it has one.
    pub build_id: Option<Arc<str>>,
}

impl Frame {
    /// The lines this frame prints as: its inlined functions (innermost first), then itself.
    pub fn lines(&self) -> Vec<String> {
        let module = self.module.as_deref().unwrap_or("unknown");
        let mut out: Vec<String> = self
            .inlined
            .iter()
            .map(|(name, line)| {
                let at = line.as_deref().map(|l| format!(" {l}")).unwrap_or_default();
                format!("{name} [{module}] ({:x}){at} (inlined)", self.addr)
            })
            .collect();
        out.push(self.to_string());
        out
    }
}

impl std::fmt::Display for Frame {
    /// memleak(8)'s form, `main+0x6d [/home/vagrant/allocs] (400862)`, plus ` file:line`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.symbol {
            Some((name, off)) => write!(f, "{name}+{off:#x}")?,
            None => write!(f, "[unknown]")?,
        }
        write!(f, " [{}] ({:x})", self.module.as_deref().unwrap_or("unknown"), self.addr)?;
        if let Some(line) = &self.line {
            write!(f, " {line}")?;
        }
        if let Some(why) = &self.unreadable {
            write!(f, " [not readable: {why}]")?;
        }
        Ok(())
    }
}

/// How one object is read: its ELF symbols through its descriptor, its DWARF from where
/// [`debuginfo::find`] says.
struct Reader {
    elf: PathBuf,
    dwarf: Dwarf,
    /// The object's loadable segments (file offset, size, virtual address).
    segments: Vec<(u64, u64, u64)>,
    /// Function names from its own and its debug file's ELF symbol tables.
    symtab: SymbolTable,
    /// Its GNU build-id in hex (pprof mappings, JSON modules).
    build_id: Option<Arc<str>>,
}

pub struct Symbolizer {
    /// Kernel mode: every address is symbolized from /proc/kallsyms.
    kernel: bool,
    /// Each traced process's maps as last read (frames the unwinder did not locate are found
    /// there: --frame-pointers, code in no file).
    maps: HashMap<i32, ProcMaps>,
    locations: HashMap<(i32, u64), Location>,
    /// Symbolized frames by (object, file offset) or, for those in no object, by address.
    frames: HashMap<(Option<usize>, u64), Frame>,
    blaze: Blaze,
    /// Every object the process mapped that memleak opened (or could not).
    pub objects: Objects,
    readers: HashMap<usize, Reader>,
}

impl Symbolizer {
    pub fn new() -> Self {
        Symbolizer {
            kernel: false,
            maps: HashMap::new(),
            locations: HashMap::new(),
            frames: HashMap::new(),
            objects: Objects::default(),
            readers: HashMap::new(),
            // Names are demangled here, only the mangled ones (src/demangle.rs).
            blaze: Blaze::builder().enable_code_info(true).enable_inlined_fns(true).enable_demangling(false).build(),
        }
    }

    /// Kernel mode: frames print as `func+0xoff [kernel] (addr)`.
    pub fn kernel() -> Self {
        Symbolizer { kernel: true, ..Symbolizer::new() }
    }

    /// Records where each frame of process `pid` not located by the unwinder lives, while the
    /// process is alive. Reads /proc/PID/maps again when an address is outside every mapping
    /// seen so far.
    pub fn normalize(&mut self, pid: i32, frames: impl IntoIterator<Item = RawFrame>) {
        if self.kernel {
            return;
        }
        let mut reread = false;
        for f in frames {
            let addr = f.ip;
            if f.located().is_some() || self.locations.contains_key(&(pid, addr)) {
                continue;
            }
            let found = |s: &Self| s.maps.get(&pid).and_then(|m| m.find(addr)).cloned();
            if found(self).is_none() && !reread {
                self.reread_maps(pid);
                reread = true;
            }
            let loc = match found(self) {
                Some(m) if m.is_file() && m.executable => {
                    Location::File { obj: self.objects.open_mapping(pid, &m), offset: addr - m.start + m.offset }
                }
                Some(m) => Location::Other { name: m.path.clone() },
                None => Location::Unmapped,
            };
            self.locations.insert((pid, addr), loc);
        }
    }

    /// Rereads process `pid`'s maps (call while it lives, e.g. at its exit stop), and opens
    /// the files of its code while they can be opened. An exited process has no maps left:
    /// the last ones seen stay.
    pub fn reread_maps(&mut self, pid: i32) {
        let Ok(m) = ProcMaps::read(pid) else { return };
        if m.mappings.is_empty() {
            return;
        }
        for mapping in m.mappings.iter().filter(|m| m.is_file() && m.executable) {
            self.objects.open_mapping(pid, mapping);
        }
        self.maps.insert(pid, m);
    }

    /// Forgets what was kept of process `pid`'s maps (it is gone and reported).
    pub fn forget(&mut self, pid: i32) {
        self.maps.remove(&pid);
        self.locations.retain(|&(p, _), _| p != pid);
    }

    /// The frame of `f` in process `pid`; addresses never normalized nor located print as
    /// unknown.
    pub fn frame(&mut self, pid: i32, f: RawFrame) -> Frame {
        let addr = f.ip;
        if self.kernel {
            if let Some(fr) = self.frames.get(&(None, addr)) {
                return fr.clone();
            }
            let frame =
                Frame { addr, symbol: self.kernel_symbol(addr), module: Some("kernel".into()), ..Frame::default() };
            self.frames.insert((None, addr), frame.clone());
            return frame;
        }
        let place = match f.located() {
            Some((id, offset)) => match self.objects.by_id(id) {
                Some(obj) => Some((obj, offset)),
                None => {
                    return Frame { addr, unreadable: Some(crate::objects::UNMAPPED.into()), ..Frame::default() };
                }
            },
            None => match self.locations.get(&(pid, addr)) {
                Some(Location::File { obj, offset }) => Some((*obj, *offset)),
                Some(Location::Other { name }) => {
                    let module = name.as_ref().map(|n| n.to_string_lossy().into_owned()).or(Some("anon".into()));
                    return Frame { addr, module, ..Frame::default() };
                }
                Some(Location::Unmapped) | None => return Frame { addr, ..Frame::default() },
            },
        };
        let (obj, offset) = place.expect("located or normalized to a file");
        let key = (Some(obj), offset);
        let mut frame = match self.frames.get(&key) {
            Some(fr) => fr.clone(),
            None => {
                let mut fr = self.in_object(obj, offset);
                fr.file_offset = Some(offset);
                self.frames.insert(key, fr.clone());
                fr
            }
        };
        frame.addr = addr;
        frame
    }

    /// The frames of a stack, innermost first. A kernel stack starts inside the tracing
    /// machinery (the BPF program, the tracepoint's runner): those frames are left out.
    pub fn stack(&mut self, pid: i32, frames: &[RawFrame]) -> Vec<Frame> {
        let mut out: Vec<Frame> = frames.iter().map(|&f| self.frame(pid, f)).collect();
        if self.kernel {
            let skip = out
                .iter()
                .take_while(|f| f.symbol.as_ref().is_some_and(|(name, _)| is_tracing_machinery(name)))
                .count();
            out.drain(..skip);
        }
        out
    }

    /// The frame at `offset` in object `obj` (its address left to fill).
    fn in_object(&mut self, obj: usize, offset: u64) -> Frame {
        let o = self.objects.get(obj);
        let module = Some(o.display_name());
        let why = match &o.state {
            State::Open(_) => None,
            State::Unreadable { why, .. } => Some(why.clone()),
        };
        if why.is_some() {
            return Frame { module, unreadable: why, ..Frame::default() };
        }
        if !self.readers.contains_key(&obj) {
            let file = self.objects.get(obj).file().expect("open");
            let dwarf = debuginfo::find(file);
            let mut symtab = SymbolTable::read(file);
            if let Dwarf::Separate { file: debug, .. } = &dwarf {
                symtab.merge(SymbolTable::read(debug));
            }
            let segments = debuginfo::segments(file);
            let build_id = debuginfo::build_id(file).map(Arc::from);
            let reader = Reader { elf: crate::objfile::fd_path(file), dwarf, segments, symtab, build_id };
            self.readers.insert(obj, reader);
        }
        let reader = &self.readers[&obj];
        let mut frame = self.symbol_in_file(reader, offset).unwrap_or_default();
        frame.module = module;
        frame.build_id = reader.build_id.clone();
        frame
    }

    fn kernel_symbol(&self, addr: u64) -> Option<(String, u64)> {
        let src = Source::Kernel(Kernel {
            kallsyms: MaybeDefault::Default,
            // No vmlinux search: kallsyms has every function symbol the report prints.
            vmlinux: MaybeDefault::None,
            debug_syms: false,
            ..Default::default()
        });
        match self.blaze.symbolize_single(&src, Input::AbsAddr(addr)) {
            Ok(Symbolized::Sym(sym)) => Some((sym.name.into_owned(), sym.offset as u64)),
            _ => None,
        }
    }

    /// The symbol, line and inlined functions of the call before the return address at
    /// `offset`.
    fn symbol_in_file(&self, r: &Reader, offset: u64) -> Option<Frame> {
        let call = offset.checked_sub(1)?;
        let lookup = |path: &Path, debug_syms: bool, input: Input<u64>| {
            let mut elf = Elf::new(path);
            elf.debug_syms = debug_syms;
            match self.blaze.symbolize_single(&Source::Elf(elf), input) {
                Ok(Symbolized::Sym(sym)) => Some(sym),
                _ => None,
            }
        };
        // A separate debug file has the full symbol table (locals too): asked first.
        let separate = match &r.dwarf {
            Dwarf::Separate { file, segments } => {
                debuginfo::vaddr(segments, call).map(|va| (crate::objfile::fd_path(file), va))
            }
            _ => None,
        };
        let sym = match (&r.dwarf, &separate) {
            (Dwarf::Own, _) => lookup(&r.elf, true, Input::FileOffset(call)),
            (Dwarf::Separate { .. }, Some((path, va))) => lookup(path, true, Input::VirtOffset(*va)),
            _ => None,
        };
        // The name from the ELF symbol tables, as memleak(8) prints it (symtab.rs: the
        // exported alias); DWARF's only where no symbol holds the address, and then only when
        // the address lies inside the function DWARF names (debug info can give a function
        // without its address, or the start of a function whose cold part, far away, holds
        // the address). The lines and inlined functions come from DWARF.
        let inside = |s: &blazesym::symbolize::Sym| s.addr != 0 && s.size.is_none_or(|size| s.offset < size);
        let (name, off) = match debuginfo::vaddr(&r.segments, call).and_then(|va| r.symtab.lookup(va)) {
            Some((name, off)) => (demangle(name).into_owned(), off as usize),
            None => {
                let s = sym.as_ref().filter(|s| inside(s))?;
                (demangle(&s.name).into_owned(), s.offset)
            }
        };
        let line = |c: &CodeInfo| c.line.map(|l| format!("{}:{l}", c.to_path().display()));
        Some(Frame {
            addr: 0,
            symbol: Some((name, off as u64 + 1)),
            module: None,
            line: sym.as_ref().and_then(|s| s.code_info.as_deref()).and_then(line),
            inlined: sym
                .iter()
                .flat_map(|s| s.inlined.iter())
                .rev()
                .map(|f| (demangle(&f.name).into_owned(), f.code_info.as_ref().and_then(line)))
                .collect(),
            ..Frame::default()
        })
    }
}

/// Kernel functions a tracepoint program runs under, above the tracepoint's call site.
fn is_tracing_machinery(name: &str) -> bool {
    ["bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_"].iter().any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_print_in_memleak8_form() {
        let f = Frame {
            addr: 0x400862,
            symbol: Some(("main".into(), 0x6d)),
            module: Some("/home/vagrant/allocs".into()),
            ..Frame::default()
        };
        assert_eq!(f.to_string(), "main+0x6d [/home/vagrant/allocs] (400862)");
        let f = Frame { addr: 0x7f00dead, module: Some("[anon:jit]".into()), ..Frame::default() };
        assert_eq!(f.to_string(), "[unknown] [[anon:jit]] (7f00dead)");
        let f = Frame { addr: 0x10, ..Frame::default() };
        assert_eq!(f.to_string(), "[unknown] [unknown] (10)");
        let f = Frame {
            addr: 0x7f00,
            module: Some("/a/lib.so".into()),
            unreadable: Some("not a regular file".into()),
            ..Frame::default()
        };
        assert_eq!(f.to_string(), "[unknown] [/a/lib.so] (7f00) [not readable: not a regular file]");
        let f = Frame {
            addr: 0x400862,
            symbol: Some(("main".into(), 0x6d)),
            module: Some("/a/allocs".into()),
            line: Some("/src/allocs.c:12".into()),
            inlined: vec![("helper".into(), Some("/src/allocs.c:5".into()))],
            ..Frame::default()
        };
        assert_eq!(
            f.lines(),
            [
                "helper [/a/allocs] (400862) /src/allocs.c:5 (inlined)",
                "main+0x6d [/a/allocs] (400862) /src/allocs.c:12"
            ]
        );
    }

    #[test]
    fn symbolizes_kernel_text_from_kallsyms() {
        // A function's own address from kallsyms (root sees real addresses; others see 0s).
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").expect("/proc/kallsyms");
        let addr = kallsyms
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                let (a, t, name) = (f.next()?, f.next()?, f.next()?);
                (name == "kfree" && t.eq_ignore_ascii_case("t")).then(|| u64::from_str_radix(a, 16).ok())?
            })
            .expect("kfree in kallsyms");
        if addr == 0 {
            errln!("skipped: kallsyms addresses are hidden (not root)");
            return;
        }
        let mut s = Symbolizer::kernel();
        let f = s.frame(0, RawFrame { ip: addr + 4, loc: 0 });
        assert_eq!(f.symbol, Some(("kfree".to_string(), 4)));
        assert_eq!(f.to_string(), format!("kfree+0x4 [kernel] ({:x})", addr + 4));
    }

    #[inline(never)]
    fn a_known_function() -> u64 {
        std::hint::black_box(7)
    }

    #[test]
    fn symbolizes_own_function_by_file_offset() {
        let me = std::process::id() as i32;
        let addr = a_known_function as *const () as u64 + 2;
        let mut s = Symbolizer::new();
        s.normalize(me, [RawFrame { ip: addr, loc: 0 }]);
        let f = s.frame(me, RawFrame { ip: addr, loc: 0 });
        let (name, off) = f.symbol.expect("own symbol found");
        assert!(name.contains("a_known_function"), "{name}");
        assert_eq!(off, 2);
        assert!(
            f.module
                .expect("module")
                .ends_with(std::env::current_exe().unwrap().file_name().unwrap().to_str().unwrap())
        );
    }
}
