//! Which objects a program loads and in which order, found the way glibc's ld.so finds them,
//! without running anything (docs/discovery.md).
//!
//! memleak runs as root beside programs it does not trust: it never runs a program's
//! interpreter (PT_INTERP) to ask it, as `ldd` or `ld.so --list` would. It reads the ELF
//! headers and applies glibc 2.36's rules itself (x86-64, Debian's directories): the `#!`
//! chain, the executable, LD_PRELOAD and /etc/ld.so.preload, then DT_NEEDED breadth-first,
//! each name searched in DT_RPATH, LD_LIBRARY_PATH, DT_RUNPATH, /etc/ld.so.cache and the
//! default directories, with glibc-hwcaps subdirectories and secure-mode restrictions. Every
//! file is opened as the program's user, without blocking, and held: callers read the very
//! file found (`objfile::fd_path`).
pub mod cache;
pub mod cpu;
pub mod elf;
pub mod launch;
mod paths;
mod search;
#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use launch::{Credentials, Launch};

/// How an object was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The program itself (after `#!` scripts).
    Executable,
    /// Its PT_INTERP.
    Interpreter,
    /// A name with a '/', used as a path.
    Path,
    Rpath,
    LdLibraryPath,
    Runpath,
    Cache,
    DefaultDirs,
}

impl Found {
    pub fn describe(self) -> &'static str {
        match self {
            Found::Executable => "the executable",
            Found::Interpreter => "PT_INTERP",
            Found::Path => "a path",
            Found::Rpath => "DT_RPATH",
            Found::LdLibraryPath => "LD_LIBRARY_PATH",
            Found::Runpath => "DT_RUNPATH",
            Found::Cache => "ld.so.cache",
            Found::DefaultDirs => "the default directories",
        }
    }
}

/// An object the program loads, held open.
#[derive(Debug)]
pub struct Object {
    /// The path it was found at (absolute: a relative one is taken from the program's
    /// directory). Shown to users; read the object through `file`.
    pub path: PathBuf,
    pub file: File,
    pub found: Found,
    /// Whether it came from LD_PRELOAD or /etc/ld.so.preload.
    pub preload: bool,
    /// The names it was asked for (DT_NEEDED, LD_PRELOAD entries, PT_INTERP).
    pub names: Vec<OsString>,
    pub soname: Option<OsString>,
    /// Its DT_NEEDED entries, in order.
    pub needed: Vec<OsString>,
}

impl Object {
    fn try_clone(&self) -> Result<Object> {
        Ok(Object {
            path: self.path.clone(),
            file: self.file.try_clone().context("dup")?,
            found: self.found,
            preload: self.preload,
            names: self.names.clone(),
            soname: self.soname.clone(),
            needed: self.needed.clone(),
        })
    }

    /// (device, inode) of the file.
    pub fn file_id(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }
}

/// A name the dynamic linker will not find (or refuse): the program does not start when a
/// DT_NEEDED entry is missing; a missing preload is ignored with an error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub name: OsString,
    /// The object that needs it, or "LD_PRELOAD" / "/etc/ld.so.preload".
    pub needed_by: PathBuf,
    pub preload: bool,
    pub why: String,
}

/// What a program loads at start.
#[derive(Debug)]
pub struct LoadOrder {
    /// The `#!` scripts the kernel passes through before the executable.
    pub scripts: Vec<PathBuf>,
    /// The global scope in symbol lookup order: the executable, the preloaded objects, then
    /// DT_NEEDED breadth-first, each object once (the interpreter where something needs it).
    pub objects: Vec<Object>,
    /// The PT_INTERP dynamic linker; None for a static executable.
    pub interpreter: Option<Object>,
    pub missing: Vec<Missing>,
    /// Whether it runs in secure mode (AT_SECURE).
    pub secure: bool,
    /// What the search met and could not follow exactly (said to the user).
    pub notes: Vec<String>,
}

impl LoadOrder {
    pub fn executable(&self) -> &Object {
        &self.objects[0]
    }

    /// Every object mapped at start: the global scope, plus the interpreter if it is not in it.
    pub fn startup_objects(&self) -> impl Iterator<Item = &Object> {
        let interp = self.interpreter.as_ref().filter(|i| {
            let id = i.file_id();
            !self.objects.iter().any(|o| o.found == Found::Interpreter || (id.is_some() && o.file_id() == id))
        });
        self.objects.iter().chain(interp)
    }
}

/// The objects `prog` (a path, as execve takes it) loads when started as `launch` says.
pub fn load_order(prog: &Path, launch: &Launch) -> Result<LoadOrder> {
    launch::as_user(launch.creds.as_ref(), || {
        let program = launch::follow_scripts(prog, launch)?;
        search::run(program, launch)
    })
}

/// The objects the process `pid`, stopped right after an exec, loads: its new image's
/// executable (/proc/PID/exe) with the environment, directory and AT_SECURE it got.
pub fn load_order_after_exec(pid: i32) -> Result<LoadOrder> {
    let launch = Launch::of_process(pid)?;
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    let path = std::fs::read_link(&exe).with_context(|| format!("cannot read {}", exe.display()))?;
    let file = crate::objfile::open_regular(&exe)?;
    launch::as_user(launch.creds.as_ref(), || search::run(launch::Program { scripts: vec![], path, file }, &launch))
}
