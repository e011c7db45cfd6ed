//! The allocator side of a run while it traces: probes attached as objects appear (an exec's
//! new image, a dlopen), the links held, and what the report must say about a process from
//! which no allocation call was seen.
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Result;
use libbpf_rs::{Link, MapCore, MapFlags};

use super::{Allocators, ProbeSet, attach, calls_seen};
use crate::objects::Objects;
use crate::probes::AttachMode;
use crate::skel::MemleakSkel;
use crate::skel::types::linkmap_event;

/// A process that has been traced this long without one allocation call gets a WARNING in
/// each report (at its exit, whatever the time).
const QUIET_WARNING_AFTER: Duration = Duration::from_secs(1);

pub struct Live<'a, 'obj> {
    pub allocators: Allocators,
    skel: &'a MemleakSkel<'obj>,
    mode: AttachMode,
    links: Vec<Link>,
    /// Link-map changes the BPF side reported (its ring buffer), not handled yet.
    pub events: Rc<RefCell<Vec<linkmap_event>>>,
    started: Instant,
    verbose: bool,
}

impl<'a, 'obj> Live<'a, 'obj> {
    /// Attaches the first set (a failure is the run's error) and prints its lines.
    pub fn start(
        allocators: Allocators,
        skel: &'a MemleakSkel<'obj>,
        mode: AttachMode,
        set: ProbeSet,
        verbose: bool,
    ) -> Result<Live<'a, 'obj>> {
        mark_arena_owners(skel, &set);
        let (links, failed) = attach(&skel.progs, mode, &set);
        if let Some(e) = failed.into_iter().next() {
            return Err(e.context("cannot attach the allocator probes"));
        }
        let live = Live {
            allocators,
            skel,
            mode,
            links,
            events: Rc::new(RefCell::new(Vec::new())),
            started: Instant::now(),
            verbose,
        };
        live.say(&set);
        Ok(live)
    }

    fn say(&self, set: &ProbeSet) {
        for n in &set.notes {
            errln!("memleak: note: {n}");
        }
        if self.verbose {
            for l in set.verbose_lines(self.mode) {
                errln!("memleak: {l}");
            }
        }
        for l in &set.lines {
            errln!("{l}");
        }
    }

    /// Attaches a later set; what cannot be attached is said, and the run goes on.
    pub fn apply(&mut self, set: ProbeSet) {
        mark_arena_owners(self.skel, &set);
        let (links, failed) = attach(&self.skel.progs, self.mode, &set);
        self.links.extend(links);
        self.say(&set);
        for e in failed {
            errln!("memleak: note: {e:#}: not traced");
        }
    }

    /// At an exec stop of `pid` (a ptraced command): the new image's objects, probed before it
    /// runs its first instruction.
    pub fn on_exec(&mut self, pid: i32) {
        match crate::ldso::load_order_after_exec(pid) {
            Ok(order) => {
                let set = self.allocators.discover_exec(pid, &order);
                self.apply(set);
            }
            Err(e) => errln!("memleak: note: pid {pid} exec'd a program whose objects memleak cannot find: {e:#}"),
        }
    }

    /// The ring buffer the BPF side reports link-map changes in.
    pub fn linkmap_events(&self) -> &'a libbpf_rs::MapMut<'obj> {
        &self.skel.maps.linkmap_events
    }

    /// Whether link-map changes wait to be handled.
    pub fn woken(&self) -> bool {
        !self.events.borrow().is_empty()
    }

    /// Probes what the processes that changed their link map have mapped since.
    pub fn on_linkmap(&mut self, objects: &mut Objects) {
        let events = std::mem::take(&mut *self.events.borrow_mut());
        let now = monotonic_ns();
        let mut done: Vec<u32> = Vec::new();
        // The latest change of each process: what it maps now is what counts.
        for ev in events.iter().rev() {
            if done.contains(&ev.pid) {
                continue;
            }
            done.push(ev.pid);
            // The earliest change not handled yet: how long calls could go unseen.
            let first = events.iter().filter(|e| e.pid == ev.pid).map(|e| e.time_ns).min().unwrap_or(ev.time_ns);
            let late = Duration::from_nanos(now.saturating_sub(first));
            // A thread the BPF side stopped waits for this: nothing was missed.
            let held = events.iter().filter(|e| e.pid == ev.pid).any(|e| self.held(e.tid));
            let set = self.allocators.discover_linkmap(ev.pid as i32, objects, (!held).then_some(late));
            self.apply(set);
        }
    }

    /// Whether thread `tid` was stopped at a link-map change and waits for memleak.
    fn held(&self, tid: u32) -> bool {
        self.skel.maps.linkmap_stops.lookup(&tid.to_ne_bytes(), MapFlags::ANY).ok().flatten().is_some()
    }

    /// A SIGSTOP reached memleak's ptrace of thread `tid`: if the BPF side sent it at a link-map
    /// change, probes what the process maps now, while it waits, and says the signal is to be
    /// suppressed (true).
    pub fn on_stop(&mut self, tid: i32, objects: &mut Objects) -> bool {
        let key = (tid as u32).to_ne_bytes();
        let stops = &self.skel.maps.linkmap_stops;
        let Some(pid) = stops.lookup(&key, MapFlags::ANY).ok().flatten() else { return false };
        let _ = stops.delete(&key);
        let pid = i32::from_ne_bytes(pid[..4].try_into().unwrap_or_default());
        // Its ring buffer event says the same: handled here, not later as a late one.
        self.events.borrow_mut().retain(|e| e.pid as i32 != pid);
        let set = self.allocators.discover_linkmap(pid, objects, None);
        self.apply(set);
        true
    }

    /// WARNING lines for `pid`'s report: no allocation call seen from it, once it has been
    /// traced a while or has exited.
    pub fn warnings(&self, pid: u32, exited: bool) -> Vec<String> {
        if !exited && self.started.elapsed() < QUIET_WARNING_AFTER {
            return Vec::new();
        }
        if calls_seen(&self.skel.maps.heap_seen, pid).is_some() {
            return Vec::new();
        }
        vec![self.allocators.unseen_warning(pid as i32)]
    }

    /// At the end of the run: what -O named and never appeared; with -v, which allocator
    /// function `pid` called first.
    pub fn finish(&self, pid: u32) {
        for n in self.allocators.final_notes() {
            errln!("memleak: note: {n}");
        }
        if self.verbose
            && let Some(f) = calls_seen(&self.skel.maps.heap_seen, pid).and_then(|id| self.allocators.function(id))
        {
            errln!("memleak: pid {pid}'s first allocation call: {f}");
        }
    }
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

/// CLOCK_MONOTONIC in nanoseconds, bpf_ktime_get_ns's clock.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
