//! The allocator side of a run while it traces, as the session's `Prober`: each process's
//! allocator objects found and probed (a running process, a new child, an exec's new image, a
//! dlopen), and what a report must say about a process from which no allocation call was seen.
use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use libbpf_rs::{Link, MapCore, MapFlags};

use super::{Allocators, ProbeSet, attach, calls_seen};
use crate::probes::AttachMode;
use crate::session::{At, Attached, Prober};
use crate::skel::MemleakSkel;

/// A process traced from its first instruction that has run this long without one allocation
/// call gets a WARNING in each report; any process in its final one.
const QUIET_WARNING_AFTER: Duration = Duration::from_secs(1);

pub struct AllocProber<'a, 'obj> {
    pub allocators: Allocators,
    skel: &'a MemleakSkel<'obj>,
    mode: AttachMode,
    verbose: bool,
    /// Notes said already (once per run, not once per process).
    said: HashSet<String>,
    /// -c's in-process capture: the library's file and memleak's socket name (src/preload/).
    preload: Option<((u64, u64), String)>,
    /// The processes whose image runs the library.
    preloaded: HashSet<i32>,
}

impl<'a, 'obj> AllocProber<'a, 'obj> {
    pub fn new(allocators: Allocators, skel: &'a MemleakSkel<'obj>, mode: AttachMode, verbose: bool) -> Self {
        AllocProber { allocators, skel, mode, verbose, said: HashSet::new(), preload: None, preloaded: HashSet::new() }
    }

    /// Images that can take the preload library (file `library`, socket `socket`) run it; the
    /// functions it forwards to are not probed there.
    pub fn with_preload(mut self, library: (u64, u64), socket: String) -> Self {
        self.allocators.exclude(library);
        self.preload = Some((library, socket));
        self
    }

    /// Whether process `pid` (a forked child) maps the preload library.
    fn maps_library(&self, pid: i32) -> bool {
        let Some(((dev, ino), _)) = &self.preload else { return false };
        let Ok(maps) = crate::procmaps::ProcMaps::read(pid) else { return false };
        maps.mappings.iter().any(|m| m.is_file() && m.dev == *dev && m.inode == *ino)
    }

    /// Says what a set says and attaches it: its links, and what could not be attached.
    fn apply(&mut self, set: &ProbeSet) -> (Vec<Link>, Vec<anyhow::Error>) {
        for n in &set.notes {
            if self.said.insert(n.clone()) {
                errln!("memleak: note: {n}");
            }
        }
        // Arena owners are marked before the forwarded functions are dropped (attach, linkmap).
        mark_allocation_functions(self.skel, set);
        let (links, failed) = attach(&self.skel.progs, self.mode, set);
        if self.verbose {
            for l in set.verbose_lines(self.mode) {
                errln!("memleak: {l} (pid {})", set.pid);
            }
        }
        // Another process probed in the same objects, the same way (a job's thousand
        // children): said once; -v says it for each.
        let pid_tag = format!(" (pid {})", set.pid);
        for l in &set.lines {
            if self.said.insert(l.replace(&pid_tag, "")) || self.verbose {
                errln!("{l}");
            }
        }
        (links, failed)
    }

    /// Attaches a later set (a dlopen's): what cannot be attached is said, the run goes on.
    fn apply_later(&mut self, set: &ProbeSet) -> Vec<Link> {
        let (links, failed) = self.apply(set);
        for e in failed {
            errln!("memleak: note: {e:#}: not traced");
        }
        links
    }

    /// Whether a thread of process `pid` was stopped at a link-map change and waits for memleak.
    fn held(&self, pid: i32) -> bool {
        let stops = &self.skel.maps.linkmap_stops;
        stops.keys().any(|k| {
            stops
                .lookup(&k, MapFlags::ANY)
                .ok()
                .flatten()
                .is_some_and(|v| v.get(..4).is_some_and(|b| i32::from_ne_bytes(b.try_into().unwrap()) == pid))
        })
    }

    /// At the end of the run: what -O named and never appeared.
    pub fn finish(&self) {
        for n in self.allocators.final_notes() {
            errln!("memleak: note: {n}");
        }
    }
}

impl Prober for AllocProber<'_, '_> {
    fn attach(&mut self, pid: i32, at: At) -> Result<Attached> {
        let (mut set, preload) = match at {
            // Its libraries are not mapped yet: found as its dynamic linker will find them.
            At::Exec => {
                let order = crate::ldso::load_order_after_exec(pid)?;
                let preload = match &self.preload {
                    None => false,
                    Some((lib, socket)) => match crate::preload::ineligible(pid, &order, *lib, socket) {
                        None => true,
                        Some(why) => {
                            errln!("memleak: note: pid {pid}: {why}: traced with uprobes");
                            false
                        }
                    },
                };
                (self.allocators.discover_exec(pid, &order)?, preload)
            }
            At::Forked => {
                self.allocators.forget(pid, false);
                let preload = self.maps_library(pid);
                (self.allocators.discover_running(pid, true)?, preload)
            }
            At::Running => {
                self.allocators.forget(pid, true);
                (self.allocators.discover_running(pid, false)?, false)
            }
        };
        // What the library records needs no probe (its arenas still do: marked first).
        mark_arena_owners(self.skel, &set);
        if preload {
            crate::preload::forward::drop_forwarded(&mut set);
            self.preloaded.insert(pid);
        } else {
            self.preloaded.remove(&pid);
        }
        let (links, failed) = self.apply(&set);
        if let Some(e) = failed.into_iter().next() {
            return Err(e.context("cannot attach the allocator probes"));
        }
        Ok(Attached { links, glibc: set.glibc, preload })
    }

    fn set_traced(&self, pid: i32, on: bool) {
        crate::report::Reporter::set_traced(&self.skel.maps.traced, pid as u32, on);
        if !on {
            if self.verbose
                && let Some(f) =
                    calls_seen(&self.skel.maps.heap_seen, pid as u32).and_then(|id| self.allocators.function(id))
            {
                errln!("memleak: pid {pid}'s first allocation call: {f}");
            }
            let _ = self.skel.maps.heap_seen.delete(&(pid as u32).to_ne_bytes());
        }
    }

    fn linkmap(&mut self, pid: i32, late: Option<Duration>) -> Vec<Link> {
        // A thread the BPF side stopped waits for this: nothing is missed.
        let late = if self.held(pid) { None } else { late };
        let mut set = self.allocators.discover_linkmap(pid, late);
        mark_arena_owners(self.skel, &set);
        if self.preloaded.contains(&pid) {
            crate::preload::forward::drop_forwarded(&mut set);
        }
        self.apply_later(&set)
    }

    fn own_stop(&mut self, tid: i32) -> Option<(i32, Vec<Link>)> {
        let key = (tid as u32).to_ne_bytes();
        let stops = &self.skel.maps.linkmap_stops;
        let pid = stops.lookup(&key, MapFlags::ANY).ok().flatten()?;
        let _ = stops.delete(&key);
        let pid = i32::from_ne_bytes(pid.get(..4)?.try_into().ok()?);
        let mut set = self.allocators.discover_linkmap(pid, None);
        mark_arena_owners(self.skel, &set);
        if self.preloaded.contains(&pid) {
            crate::preload::forward::drop_forwarded(&mut set);
        }
        Some((pid, self.apply_later(&set)))
    }

    fn warnings(&self, pid: i32, exited: bool) -> Vec<String> {
        // A process attached to midway may just be idle: said only in its final report.
        let (time, from_start) = self.allocators.traced_for(pid);
        if !exited && (!from_start || time < QUIET_WARNING_AFTER) {
            return Vec::new();
        }
        if calls_seen(&self.skel.maps.heap_seen, pid as u32).is_some() {
            return Vec::new();
        }
        vec![self.allocators.unseen_warning(pid)]
    }
}

/// Tells the BPF side where each object's allocation functions are (memleak.h, struct
/// alloc_fn_ranges): a sampled call made from inside one is nested in it.
fn mark_allocation_functions(skel: &MemleakSkel, set: &ProbeSet) {
    use crate::skel::types::{alloc_fn_ranges, unwind_obj_key};
    for o in &set.objects {
        let mut ranges: Vec<(u32, u32)> = o
            .entries
            .iter()
            .filter(|e| e.needs_return() && e.size > 0)
            .filter_map(|e| Some((u32::try_from(e.entry_offset).ok()?, u32::try_from(e.entry_offset + e.size).ok()?)))
            .collect();
        ranges.sort();
        ranges.dedup();
        let mut value = alloc_fn_ranges::default();
        if ranges.len() > value.r.len() {
            errln!(
                "memleak: note: {}: {} allocation functions, {} kept for sampling's nesting check",
                o.shown.display(),
                ranges.len(),
                value.r.len()
            );
        }
        for (slot, (start, end)) in value.r.iter_mut().zip(&ranges) {
            (slot.start, slot.end) = (*start, *end);
        }
        value.n = ranges.len().min(value.r.len()) as u32;
        let key = unwind_obj_key { dev: o.key.0, pad: 0, ino: o.key.1 };
        if let Err(e) = skel.maps.alloc_fns.update(pod(&key), pod(&value), MapFlags::ANY) {
            errln!("memleak: note: cannot note where {}'s allocation functions are: {e}", o.shown.display());
        }
    }
}

fn pod<T>(v: &T) -> &[u8] {
    // SAFETY: a plain C struct from the shared header, read as its bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// Tells the BPF side which files are allocators whose own mmaps are their arenas.
fn mark_arena_owners(skel: &MemleakSkel, set: &ProbeSet) {
    use crate::skel::types::unwind_obj_key;
    for (dev, ino) in set.objects.iter().filter_map(|o| o.arena_owner) {
        let key = unwind_obj_key { dev, pad: 0, ino };
        // SAFETY: a plain C struct from the shared header, read as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&key as *const unwind_obj_key).cast::<u8>(), std::mem::size_of_val(&key))
        };
        if let Err(e) = skel.maps.allocator_files.update(bytes, &[1], MapFlags::ANY) {
            errln!("memleak: note: cannot mark an allocator's file: {e}: its own mappings may show as the program's");
        }
    }
}
