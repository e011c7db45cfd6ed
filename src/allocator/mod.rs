//! The allocator a process actually uses, found without -O: every object it maps that defines
//! a function of a known allocator family (families.rs: the C library's names, C++'s operator
//! new and delete, jemalloc, tcmalloc, mimalloc) is probed, not only the one that wins each
//! symbol; blocks are keyed by process and address, so several allocators in one process
//! coexist, and the nesting rule (memleak.bpf.c) counts a call that forwards to another probed
//! function once. The dynamic linker's symbol lookup order (the link map of a running process,
//! or memleak's own ld.so search for a command before it runs: src/ldso) decides only which
//! object binds each name, for the `Tracing ...` lines.
//!
//! The seam for the session's registry of processes: one function per situation returns the
//! objects to probe in one process with their entry points and BPF cookies, the lines to print
//! and the notes ([`ProbeSet`]); [`attach`] attaches a set; [`live::AllocProber`] does both for
//! the session (src/session/, its `Prober`).
//! - [`Allocators::check_command`]: a -c command before it runs (its load order): an error if
//!   nothing in it can be traced;
//! - [`Allocators::discover_running`]: a running process (-p, a cgroup's member, a child
//!   started by a traced process): its maps and link map;
//! - [`Allocators::discover_exec`]: at an exec stop (the new image's load order);
//! - [`Allocators::discover_linkmap`]: after the process's link map changed (dlopen): what
//!   is new.
mod candidates;
pub mod families;
pub mod linkmap;
pub mod live;
mod said;
pub mod symbols;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use libbpf_rs::Link;

use crate::ldso::LoadOrder;
use crate::objects::Objects;
use crate::probes::{self, AttachMode, EntryPoint};
use candidates::{Candidate, forwarding_targets, is_c_library, order_candidates, running_candidates};
use families::{Family, Op};
use said::{check_obj, tracing_line};
use symbols::{Found, Scan, Symtab, Wanted, scan, wanted_map};

/// A file by its identity: (st_dev, inode).
type Key = (u64, u64);

/// What the command line asks for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// -O: only this object (a path, or the soname or file name of an object the process maps).
    pub obj: Option<PathBuf>,
    /// -S: the C names carry this prefix.
    pub prefix: String,
}

/// One object to probe in one process.
pub struct ObjectProbes {
    /// Held since it was found: [`ObjectProbes::path`] names this very file.
    pub file: File,
    /// The path shown to the user.
    pub shown: PathBuf,
    pub entries: Vec<EntryPoint>,
    /// An allocator other than the C library and the executable (a jemalloc, tcmalloc or
    /// mimalloc shared object): its file as the BPF side names it (kernel dev, inode), whose
    /// own mmaps outside probed calls are its arenas, not the program's mappings.
    pub arena_owner: Option<(u32, u64)>,
    /// Its file as the kernel names it: (dev, inode).
    pub key: (u32, u64),
    /// Its file as user space names it (device, inode).
    pub file_key: Key,
}

impl ObjectProbes {
    /// What the attach opens: /proc/self/fd/N of the file held.
    pub fn path(&self) -> PathBuf {
        crate::objfile::fd_path(&self.file)
    }
}

/// What a discovery found to probe in one process, and what to say about it.
#[derive(Default)]
pub struct ProbeSet {
    pub pid: i32,
    /// Objects not probed in this process yet.
    pub objects: Vec<ObjectProbes>,
    /// `Tracing malloc, free, ... in OBJECT (pid N)`: one per probed object of the process
    /// (after an exec: every one of the new image; after a dlopen: the new ones). For stderr.
    pub lines: Vec<String>,
    /// Notes for stderr (without the "memleak: note: " prefix).
    pub notes: Vec<String>,
    /// The process's malloc is glibc's (what the reachability scan knows the heap of).
    pub glibc: bool,
    /// The functions the object never probed (the in-process capture's library), where the
    /// process maps it, forwards to, as (file, entry offset): for each name it
    /// interposes, the first definition after it in the lookup order (dlsym RTLD_NEXT's).
    pub forwarded: Vec<(Key, u64)>,
}

impl ProbeSet {
    /// -v: each object's probes and where they sit (docs/probe-placement.md).
    pub fn verbose_lines(&self, mode: AttachMode) -> Vec<String> {
        let mut out = Vec::new();
        for o in &self.objects {
            out.push(format!("attached to {} ({mode:?} mode):", o.shown.display()));
            for e in &o.entries {
                let p = &e.placement;
                out.push(format!(
                    "  {:<28} entry {:#x} probe {:#x} (+{}: {}){}",
                    e.names,
                    e.entry_offset,
                    e.file_offset,
                    p.delta,
                    p.insn,
                    p.note.as_deref().map(|n| format!(", single-stepped: {n}")).unwrap_or_default()
                ));
            }
        }
        out
    }
}

/// Attaches the loaded programs to every object of `set` in its process: the links, and the
/// objects that could not be attached (each with why).
pub fn attach(progs: &crate::skel::MemleakProgs, mode: AttachMode, set: &ProbeSet) -> (Vec<Link>, Vec<anyhow::Error>) {
    let mut links = Vec::new();
    let mut failed = Vec::new();
    for o in &set.objects {
        match probes::attach(progs, mode, set.pid, &o.path(), &o.entries) {
            Ok(l) => links.extend(l),
            Err(e) => failed.push(e.context(format!("{} (pid {})", o.shown.display(), set.pid))),
        }
    }
    (links, failed)
}

/// An object probed in a process.
struct Probed {
    shown: PathBuf,
    /// Whether it has allocator functions (not only the dynamic linker's hook).
    allocator: bool,
}

struct ProcState {
    /// When memleak began tracing it.
    since: std::time::Instant,
    /// Traced from its first instruction (an exec stop, a child), not attached to midway.
    from_start: bool,
    probed: HashMap<Key, Probed>,
    /// Keys in the order they were probed.
    order: Vec<Key>,
    go: bool,
    /// The `Tracing` lines last given for the whole process (an exec that changes nothing, as
    /// a command's first, is not said twice).
    said: Vec<String>,
}

/// -O as given.
enum ObjArg {
    /// A path (it has a '/'): the file it names, or the mapping shown by that path.
    Path(PathBuf),
    /// A soname or file name of an object the process maps.
    Name(String),
}

impl Default for ProcState {
    fn default() -> Self {
        ProcState {
            since: std::time::Instant::now(),
            from_start: false,
            probed: HashMap::new(),
            order: Vec::new(),
            go: false,
            said: Vec::new(),
        }
    }
}

/// Why a discovery runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Situation {
    /// Before tracing starts: what cannot be traced is an error.
    Start,
    /// A new image: every probed object gets its line again; what cannot be traced is an
    /// error (the process is said not to be traced).
    Exec,
    /// A process started by a traced one, with its parent's image: probed quietly.
    Forked,
    /// The link map changed, noticed this long after (None: the process waited for memleak).
    LinkMap(Option<Duration>),
}

/// The allocator objects of the traced processes: what each was probed for.
pub struct Allocators {
    prefix: String,
    obj: Option<ObjArg>,
    /// The -O object was seen mapped (or in a load order) in some process.
    obj_seen: bool,
    wanted: Wanted,
    /// Each file's scan, once.
    scans: HashMap<Key, Arc<Scan>>,
    /// A file never probed (the in-process capture's library, which defines malloc too).
    exclude: Option<Key>,
    /// Names of the probed functions by id - 1 (the cookie's high half).
    functions: Vec<String>,
    procs: HashMap<i32, ProcState>,
    /// The files of running processes, opened through /proc/PID/map_files and held.
    objects: Objects,
}

impl Allocators {
    pub fn new(opts: &Options) -> Allocators {
        let obj = opts.obj.as_ref().map(|o| {
            if o.as_os_str().to_string_lossy().contains('/') {
                ObjArg::Path(o.clone())
            } else {
                ObjArg::Name(o.to_string_lossy().into_owned())
            }
        });
        Allocators {
            prefix: opts.prefix.clone(),
            obj,
            obj_seen: false,
            wanted: wanted_map(&opts.prefix),
            scans: HashMap::new(),
            exclude: None,
            functions: Vec::new(),
            procs: HashMap::new(),
            objects: Objects::default(),
        }
    }

    /// Never probes the file `key` (device, inode): the in-process capture's library.
    pub fn exclude(&mut self, key: Key) {
        self.exclude = Some(key);
    }

    /// Forgets what was probed in `pid` (its links are gone: a new image, or it exited).
    /// `keep_lines`: what was said of it stays known, so that a new image that probes the same
    /// is not said twice.
    pub fn forget(&mut self, pid: i32, keep_lines: bool) {
        let said = self.procs.remove(&pid).map(|p| p.said).unwrap_or_default();
        if keep_lines {
            self.procs.entry(pid).or_default().said = said;
        }
    }

    /// How long `pid` has been traced, and whether from its first instruction.
    pub fn traced_for(&self, pid: i32) -> (std::time::Duration, bool) {
        self.procs.get(&pid).map(|p| (p.since.elapsed(), p.from_start)).unwrap_or_default()
    }

    /// The probed function with this id (the high half of its cookie, `trace_event.fn`).
    pub fn function(&self, id: u32) -> Option<&str> {
        self.functions.get((id as usize).checked_sub(1)?).map(String::as_str)
    }

    /// A running process: every object it maps, in its link map's order. `forked`: started by
    /// a traced process, whose image it has (nothing said again).
    pub fn discover_running(&mut self, pid: i32, forked: bool) -> Result<ProbeSet> {
        let mut notes = Vec::new();
        let cands = running_candidates(pid, &mut self.objects, &mut notes)?;
        let situation = if forked { Situation::Forked } else { Situation::Start };
        self.plan(pid, cands, situation, false, notes)
    }

    /// A -c command before it runs: the objects of its load order (`order`, from
    /// `ldso::load_order`): an error if nothing in it can be traced (its probes come at its
    /// exec stop).
    pub fn check_command(&mut self, order: &LoadOrder) -> Result<()> {
        let cands = order_candidates(order);
        let r = self.plan(0, cands, Situation::Start, true, Vec::new());
        self.procs.remove(&0);
        r.map(|_| ())
    }

    /// At an exec stop: the new image's load order (`ldso::load_order_after_exec`), every
    /// object of it (the old image's links are dropped). An error says why nothing in it can
    /// be traced.
    pub fn discover_exec(&mut self, pid: i32, order: &LoadOrder) -> Result<ProbeSet> {
        self.forget(pid, true);
        let cands = order_candidates(order);
        self.plan(pid, cands, Situation::Exec, true, Vec::new())
    }

    /// After a link-map change (dlopen): the objects mapped since. `late`: how long after the
    /// change memleak looked (None when the process was held until now).
    pub fn discover_linkmap(&mut self, pid: i32, late: Option<Duration>) -> ProbeSet {
        let mut notes = Vec::new();
        let cands = match running_candidates(pid, &mut self.objects, &mut notes) {
            Ok(c) => c,
            // Gone meanwhile: nothing to probe.
            Err(_) => return ProbeSet { pid, ..ProbeSet::default() },
        };
        self.plan(pid, cands, Situation::LinkMap(late), false, notes).unwrap_or_else(|e| ProbeSet {
            pid,
            notes: vec![format!("{e:#}")],
            ..ProbeSet::default()
        })
    }

    fn scan_of(&mut self, c: &Candidate, symtab: Symtab) -> Result<Arc<Scan>> {
        // The -O object is scanned with every symbol table; keyed apart.
        let key = if symtab == Symtab::Any { (c.key.0 ^ u64::MAX, c.key.1) } else { c.key };
        if let Some(s) = self.scans.get(&key) {
            return Ok(s.clone());
        }
        let s = Arc::new(scan(&c.file, &c.shown, &self.wanted, symtab)?);
        self.scans.insert(key, s.clone());
        Ok(s)
    }

    /// Whether candidate `c` is the object -O names.
    fn is_obj(&self, c: &Candidate, scan: Option<&Scan>) -> bool {
        match &self.obj {
            None => false,
            Some(ObjArg::Path(p)) => c.shown == *p || std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == c.key),
            Some(ObjArg::Name(n)) => {
                c.shown.file_name().is_some_and(|f| f.to_string_lossy() == *n)
                    || scan.and_then(|s| s.soname.as_deref()).is_some_and(|s| s == n)
            }
        }
    }

    fn plan(
        &mut self,
        pid: i32,
        mut cands: Vec<Candidate>,
        situation: Situation,
        command: bool,
        mut notes: Vec<String>,
    ) -> Result<ProbeSet> {
        // Symbol lookup order: the global scope first, in order; then the others as met.
        cands.sort_by_key(|c| c.scope.unwrap_or(usize::MAX));
        // The in-process capture's library is never probed; where it is in the order is kept.
        let excluded_scope = cands.iter().find(|c| Some(c.key) == self.exclude).and_then(|c| c.scope);
        cands.retain(|c| Some(c.key) != self.exclude);
        let mut scans: Vec<Option<Arc<Scan>>> = Vec::with_capacity(cands.len());
        for c in &cands {
            let symtab = if c.executable { Symtab::Global } else { Symtab::No };
            match self.scan_of(c, symtab) {
                Ok(s) => scans.push(Some(s)),
                Err(e) => {
                    if situation == Situation::Start && self.obj.is_none() {
                        notes.push(format!("{}: {e:#}: not probed", c.shown.display()));
                    }
                    scans.push(None);
                }
            }
        }
        // -O: that object alone (with every symbol table), plus the dynamic linker's hook
        // while it has not appeared, to find it when it is loaded.
        let obj_at =
            self.obj.as_ref().and_then(|_| (0..cands.len()).find(|&i| self.is_obj(&cands[i], scans[i].as_deref())));
        if self.obj.is_some() {
            match obj_at {
                Some(i) => {
                    if cands[i].mapped {
                        self.obj_seen = true;
                    }
                    scans[i] = Some(self.scan_of(&cands[i], Symtab::Any)?);
                }
                None => {
                    if situation == Situation::Start {
                        let o = self.obj.as_ref().unwrap();
                        if !command {
                            return Err(self.obj_not_mapped(pid, o));
                        }
                        // A command that may load it later: probed by path now if it is one.
                        if let ObjArg::Path(p) = o {
                            let p = p.clone();
                            let file = check_obj(&p)?;
                            let md = file.metadata()?;
                            cands.push(Candidate {
                                key: (md.dev(), md.ino()),
                                shown: p,
                                file,
                                scope: None,
                                executable: false,
                                mapped: false,
                            });
                            let last = cands.len() - 1;
                            scans.push(Some(self.scan_of(&cands[last], Symtab::Any)?));
                        }
                    }
                }
            }
        }
        let obj_at =
            self.obj.as_ref().and_then(|_| (0..cands.len()).find(|&i| self.is_obj(&cands[i], scans[i].as_deref())));
        let hook_needed = self.obj.is_some() && !self.obj_seen;

        // What each object is probed for.
        let mut chosen: Vec<(usize, Vec<Found>)> = Vec::new();
        for (i, s) in scans.iter().enumerate() {
            let Some(s) = s else { continue };
            let found: Vec<Found> = if self.obj.is_some() {
                if Some(i) == obj_at {
                    s.found.clone()
                } else if hook_needed {
                    s.found.iter().filter(|f| f.spec.op == Op::LinkMap).cloned().collect()
                } else {
                    Vec::new()
                }
            } else {
                s.found.clone()
            };
            if !found.is_empty() {
                chosen.push((i, found));
            }
        }
        let has_allocator = |found: &[Found]| found.iter().any(|f| f.spec.op != Op::LinkMap);
        let exe = cands.iter().position(|c| c.executable);
        let go = exe.and_then(|i| scans[i].as_ref()).is_some_and(|s| s.go);
        let any_allocator = chosen.iter().any(|(_, f)| has_allocator(f));
        if !any_allocator {
            let why = self.nothing_to_trace(pid, &cands, exe, &scans, go, command, obj_at);
            if matches!(situation, Situation::Start | Situation::Exec | Situation::Forked)
                && !(command && self.obj.is_some() && obj_at.is_none())
            {
                bail!("{why}");
            }
        } else if go && !self.procs.get(&pid).is_some_and(|p| p.go) {
            notes.push(format!(
                "{} is a Go program: Go's own allocator is not traced (cgo's malloc is)",
                cands[exe.unwrap()].shown.display()
            ));
        }

        let state = self.procs.entry(pid).or_default();
        state.go |= go;
        state.from_start |= matches!(situation, Situation::Exec | Situation::Forked);
        // glibc's malloc is the one in use: it binds malloc (or -O names it).
        let malloc_at = match obj_at {
            Some(i) => Some(i),
            None if self.obj.is_none() => (0..cands.len())
                .find(|&i| scans[i].as_ref().is_some_and(|s| s.found.iter().any(|f| f.symbol == "malloc"))),
            None => None,
        };
        let glibc = self.prefix.is_empty()
            && malloc_at.is_some_and(|i| {
                is_c_library(&cands[i].shown, scans[i].as_ref().and_then(|s| s.soname.as_deref()))
                    && !cands[i].shown.to_string_lossy().contains("musl")
            });
        let forwarded = excluded_scope.map(|lib| forwarding_targets(lib, &cands, &scans)).unwrap_or_default();
        let mut set = ProbeSet { pid, notes, glibc, forwarded, ..ProbeSet::default() };
        let mut conflicts = Vec::new();
        for (i, found) in &chosen {
            let c = &cands[*i];
            let state = self.procs.get_mut(&pid).unwrap();
            let new = !state.probed.contains_key(&c.key);
            if new {
                let file = c.file.try_clone()?;
                let shown = c.shown.clone();
                let functions = &mut self.functions;
                let entries = probes::entry_points(
                    &file,
                    found,
                    |_, display| {
                        functions.push(format!("{display} in {}", shown.display()));
                        functions.len() as u32
                    },
                    &mut conflicts,
                );
                for conflict in conflicts.drain(..) {
                    set.notes.push(format!("{}: {conflict}: its alias means another call", shown.display()));
                }
                let state = self.procs.get_mut(&pid).unwrap();
                state.probed.insert(c.key, Probed { shown: shown.clone(), allocator: has_allocator(found) });
                state.order.push(c.key);
                if (self.obj.is_some() || !self.prefix.is_empty())
                    && let Some(note) = self.missing_note(&shown, found, Some(*i) == obj_at || self.obj.is_none())
                {
                    set.notes.push(note);
                }
                let arena_owner = (!c.executable
                    && !is_c_library(&c.shown, scans[*i].as_ref().and_then(|s| s.soname.as_deref()))
                    && found.iter().any(|f| f.spec.op == Op::Alloc && f.spec.family != Family::Cxx))
                .then(|| (crate::procmaps::kernel_dev(c.key.0), c.key.1));
                let key = (crate::procmaps::kernel_dev(c.key.0), c.key.1);
                set.objects.push(ObjectProbes { file, shown, entries, arena_owner, key, file_key: c.key });
            }
            let print = match situation {
                Situation::Start | Situation::Exec => true,
                Situation::Forked => false,
                Situation::LinkMap(_) => new,
            };
            if print && has_allocator(found) {
                let mut line = tracing_line(pid, *i, found, &cands, &scans, self.obj.is_some());
                if let (true, Situation::LinkMap(Some(late))) = (new, situation) {
                    line.push_str(&format!(
                        ", from {:.1} ms after it was loaded (calls before were not seen)",
                        late.as_secs_f64() * 1e3
                    ));
                }
                if !c.mapped {
                    line.push_str(", if it is loaded");
                }
                set.lines.push(line);
            }
        }
        if matches!(situation, Situation::Start | Situation::Exec) {
            let state = self.procs.get_mut(&pid).unwrap();
            if state.said == set.lines {
                set.lines.clear();
            } else {
                state.said = set.lines.clone();
            }
        }
        Ok(set)
    }
}

/// CLOCK_MONOTONIC in nanoseconds, bpf_ktime_get_ns's clock.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether process `pid` made an allocation call through a probed function since tracing
/// began (or since its last exec): the `heap_seen` map of the BPF object.
/// The value: the id of the first function called.
pub fn calls_seen(heap_seen: &impl libbpf_rs::MapCore, pid: u32) -> Option<u32> {
    let v = heap_seen.lookup(&pid.to_ne_bytes(), libbpf_rs::MapFlags::ANY).ok().flatten()?;
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}
