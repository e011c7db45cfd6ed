//! Symbolizer: turns stack addresses into `function+0xoff [module] (addr)` frames.
//!
//! An address is normalized to (file, file offset) while the process lives, from its
//! /proc/PID/maps; symbols then come from the file with blazesym. So a report printed after
//! the process has exited is symbolized as well as the ones before.
//!
//! With DWARF (in the file, or a separate debug file under /usr/lib/debug found by build-id or
//! .gnu_debuglink) a frame gains ` file:line`, and functions inlined at the address print as
//! frames of their own before it. C++ and Rust names are demangled. Every address is a return
//! address: it is looked up at address - 1, the call, and printed as it is.
//! Kernel mode: addresses are kernel text, symbolized from /proc/kallsyms.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use blazesym::MaybeDefault;
use blazesym::symbolize::source::{Elf, Kernel, Source};
use blazesym::symbolize::{CodeInfo, Input, Symbolized, Symbolizer as Blaze};

use crate::procmaps::{Mapping, ProcMaps};

/// Where an address lives in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File {
        /// As the process sees it (what reports print).
        path: Arc<Path>,
        /// Where memleak reads it: `path`, or an open descriptor of the mapped file.
        source: Arc<Path>,
        offset: u64,
    },
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
        Ok(())
    }
}

pub struct Symbolizer {
    pid: Option<i32>,
    /// Kernel mode: every address is symbolized from /proc/kallsyms.
    kernel: bool,
    maps: ProcMaps,
    locations: HashMap<u64, Location>,
    frames: HashMap<u64, Frame>,
    blaze: Blaze,
    /// Where each mapped file (by device and inode) is read from.
    sources: HashMap<(u64, u64), Arc<Path>>,
    /// Files that memleak cannot open by their path (another mount namespace, deleted), held
    /// open so that they stay readable after the process exits.
    held: Vec<std::fs::File>,
}

impl Symbolizer {
    pub fn new(pid: Option<i32>) -> Self {
        Symbolizer {
            pid,
            kernel: false,
            maps: ProcMaps::default(),
            locations: HashMap::new(),
            frames: HashMap::new(),
            sources: HashMap::new(),
            held: Vec::new(),
            blaze: Blaze::builder().enable_code_info(true).enable_inlined_fns(true).enable_demangling(true).build(),
        }
    }

    /// Kernel mode: frames print as `func+0xoff [kernel] (addr)`.
    pub fn kernel() -> Self {
        Symbolizer { kernel: true, ..Symbolizer::new(None) }
    }

    /// Records where each address lives, while the process is alive. Reads /proc/PID/maps again
    /// when an address is outside every mapping seen so far.
    pub fn normalize(&mut self, addrs: impl IntoIterator<Item = u64>) {
        let Some(pid) = self.pid else { return };
        let mut reread = false;
        for addr in addrs {
            if self.locations.contains_key(&addr) {
                continue;
            }
            if self.maps.find(addr).is_none() && !reread {
                self.reread_maps();
                reread = true;
            }
            let loc = match self.maps.find(addr) {
                Some(m) if m.is_file() => {
                    let m = m.clone();
                    Location::File {
                        source: self.source(pid, &m),
                        path: m.path.clone().expect("a file mapping has a path"),
                        offset: addr - m.start + m.offset,
                    }
                }
                Some(m) => Location::Other { name: m.path.clone() },
                None => Location::Unmapped,
            };
            self.locations.insert(addr, loc);
        }
    }

    /// Where to read a mapped file: its path when that names it; else the file opened through
    /// /proc/PID/map_files while the process lives, and read as /proc/self/fd/N from then on.
    fn source(&mut self, pid: i32, m: &Mapping) -> Arc<Path> {
        let shown = m.path.clone().expect("a file mapping has a path");
        if let Some(s) = self.sources.get(&(m.dev, m.inode)) {
            return s.clone();
        }
        let source = match m.openable(pid) {
            Some(p) if p.as_path() == &*shown => shown,
            Some(p) => match std::fs::File::open(&p) {
                Ok(f) => {
                    let path = crate::objfile::fd_path(&f);
                    self.held.push(f);
                    Arc::from(path.as_path())
                }
                Err(_) => shown,
            },
            None => shown,
        };
        self.sources.insert((m.dev, m.inode), source.clone());
        source
    }

    /// Rereads the process's maps (call while it lives, e.g. at its exit stop), and opens what
    /// their files need while they can be opened. An exited process has no maps left: the last
    /// ones seen stay.
    pub fn reread_maps(&mut self) {
        let Some(pid) = self.pid else { return };
        let Ok(m) = ProcMaps::read(pid) else { return };
        if m.mappings.is_empty() {
            return;
        }
        for mapping in m.mappings.iter().filter(|m| m.is_file()) {
            self.source(pid, mapping);
        }
        self.maps = m;
    }

    /// The frame for `addr`; addresses never normalized print as unknown.
    pub fn frame(&mut self, addr: u64) -> Frame {
        if let Some(f) = self.frames.get(&addr) {
            return f.clone();
        }
        if self.kernel {
            let frame =
                Frame { addr, symbol: self.kernel_symbol(addr), module: Some("kernel".into()), ..Frame::default() };
            self.frames.insert(addr, frame.clone());
            return frame;
        }
        let frame = match self.locations.get(&addr).cloned() {
            Some(Location::File { path, source, offset }) => {
                let mut frame = self.symbol_in_file(&source, offset).unwrap_or_default();
                frame.addr = addr;
                frame.module = Some(path.to_string_lossy().into_owned());
                frame
            }
            Some(Location::Other { name }) => Frame {
                addr,
                module: name.map(|n| n.to_string_lossy().into_owned()).or(Some("anon".into())),
                ..Frame::default()
            },
            Some(Location::Unmapped) | None => Frame { addr, ..Frame::default() },
        };
        self.frames.insert(addr, frame.clone());
        frame
    }

    /// The frames of a stack, innermost first. A kernel stack starts inside the tracing
    /// machinery (the BPF program, the tracepoint's runner): those frames are left out.
    pub fn stack(&mut self, addrs: &[u64]) -> Vec<Frame> {
        let mut frames: Vec<Frame> = addrs.iter().map(|&a| self.frame(a)).collect();
        if self.kernel {
            let skip = frames
                .iter()
                .take_while(|f| f.symbol.as_ref().is_some_and(|(name, _)| is_tracing_machinery(name)))
                .count();
            frames.drain(..skip);
        }
        frames
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
    fn symbol_in_file(&self, path: &Path, offset: u64) -> Option<Frame> {
        let call = offset.checked_sub(1)?;
        let lookup = |debug_syms: bool| {
            let mut elf = Elf::new(path);
            elf.debug_syms = debug_syms;
            match self.blaze.symbolize_single(&Source::Elf(elf), Input::FileOffset(call)) {
                Ok(Symbolized::Sym(sym)) => Some(sym),
                _ => None,
            }
        };
        let sym = lookup(true)?;
        // Debug info (e.g. libc6-dbg) can give a function without its address (addr 0,
        // offset = the whole file offset; seen inside glibc's pthread_create): the ELF
        // symbol tables then know the name and offset better; the lines still come from DWARF.
        let (name, off) =
            match (sym.addr == 0 || sym.size.is_some_and(|size| sym.offset >= size)).then(|| lookup(false)).flatten() {
                Some(elf) => (elf.name.to_string(), elf.offset),
                None => (sym.name.to_string(), sym.offset),
            };
        let line = |c: &CodeInfo| c.line.map(|l| format!("{}:{l}", c.to_path().display()));
        Some(Frame {
            addr: 0,
            symbol: Some((name, off as u64 + 1)),
            module: None,
            line: sym.code_info.as_deref().and_then(line),
            inlined: sym
                .inlined
                .iter()
                .rev()
                .map(|f| (f.name.to_string(), f.code_info.as_ref().and_then(line)))
                .collect(),
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
            addr: 0x400862,
            symbol: Some(("main".into(), 0x6d)),
            module: Some("/a/allocs".into()),
            line: Some("/src/allocs.c:12".into()),
            inlined: vec![("helper".into(), Some("/src/allocs.c:5".into()))],
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
        let f = s.frame(addr + 4);
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
        let mut s = Symbolizer::new(Some(me));
        s.normalize([addr]);
        let f = s.frame(addr);
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
