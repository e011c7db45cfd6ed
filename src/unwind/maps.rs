//! Feeds the unwind tables of a process's executable mappings into the BPF maps, and keeps
//! them current as objects are mapped (dlopen, exec). Each object is processed once per run,
//! keyed by build-id; the BPF side finds it by the (dev, inode) of the file its code maps.
//! Files are read through the descriptors of the run's objects (src/objects.rs), and every
//! file registered gets its id in stack frames, with or without a table.
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use libbpf_rs::{MapCore, MapFlags};
use object::Object;

use super::table::{self, Rule};
use crate::objects::{Key, Objects, State};
use crate::procmaps::{Mapping, ProcMaps};
use crate::skel::MemleakSkel;
use crate::skel::types::{unwind_met, unwind_obj_key, unwind_object, unwind_object_state, unwind_page};

/// Capacities of the maps (src/bpf/unwind.bpf.h sets the same).
const MAX_ROWS: u32 = 1 << 21;
const MAX_PAGES: u32 = 65536;
const MAX_RULES: u32 = 65536;
const PAGE_SHIFT: u32 = 16;

/// What one object's table takes in the maps.
#[derive(Debug, Clone, Copy)]
struct Placed {
    obj: unwind_object,
    rows: u32,
    /// Bytes of code whose rule is outside the model: unwinds through them stop there.
    unsupported_bytes: u64,
}

/// A second home for the tables (the in-process capture's shared memory, src/preload/): every
/// rule, page and row written to the BPF maps is written there too, at the same index, so that
/// an object's `unwind_object` describes its table in either.
pub trait Mirror {
    fn rule(&mut self, index: u32, rule: &crate::skel::types::unwind_rule);
    fn pages(&mut self, first: u32, pages: &[unwind_page]);
    fn rows(&mut self, first: u32, rows: &[u32]);
}

/// An object's identity for "process once": its build-id, or its path and size and mtime.
type ObjectId = Vec<u8>;

pub struct UnwindTables {
    rules: HashMap<Rule, u16>,
    next_row: u32,
    next_page: u32,
    /// Objects placed (or that failed: None) by identity.
    by_build_id: HashMap<ObjectId, Option<Placed>>,
    /// Files registered in the BPF objects map for good: opened (with or without a table), or
    /// unreadable for a reason that will not pass.
    registered: HashSet<Key>,
    /// How often each file met was chased (see [`UnwindTables::chase`]).
    chases: HashMap<Key, u32>,
    /// Each process's /proc/PID/maps as last read: an unchanged one is skipped.
    last_maps: HashMap<i32, String>,
    verbose: bool,
    generation: u32,
    /// Stats for the report and docs: objects built, rows, time spent.
    pub built: u32,
    pub rows_total: u64,
    pub build_secs: f64,
    /// Objects that got no table and why (shown once).
    pub failures: Vec<String>,
    mirror: Option<Box<dyn Mirror>>,
}

impl UnwindTables {
    pub fn new(skel: &MemleakSkel, verbose: bool) -> Result<Self> {
        let mut t = UnwindTables {
            rules: HashMap::new(),
            next_row: 0,
            next_page: 0,
            by_build_id: HashMap::new(),
            registered: HashSet::new(),
            chases: HashMap::new(),
            last_maps: HashMap::new(),
            verbose,
            generation: 0,
            built: 0,
            rows_total: 0,
            build_secs: 0.0,
            failures: Vec::new(),
            mirror: None,
        };
        // Rule 0: no CFI.
        t.rule_index(skel, Rule::NONE)?;
        Ok(t)
    }

    /// Writes the tables into `m` too from now on (the rules placed so far at once): set before
    /// any object is placed.
    pub fn set_mirror(&mut self, mut m: Box<dyn Mirror>) {
        for (r, &i) in &self.rules {
            m.rule(u32::from(i), &r.to_bpf());
        }
        self.mirror = Some(m);
    }

    fn rule_index(&mut self, skel: &MemleakSkel, r: Rule) -> Result<u16> {
        if let Some(&i) = self.rules.get(&r) {
            return Ok(i);
        }
        let i = self.rules.len() as u32;
        if i >= MAX_RULES {
            bail!("the rule table is full ({MAX_RULES} rules)");
        }
        let v = r.to_bpf();
        skel.maps.unwind_rules.update(&i.to_ne_bytes(), pod_bytes(&v), MapFlags::ANY).context("writing a rule")?;
        if let Some(m) = self.mirror.as_mut() {
            m.rule(i, &v);
        }
        self.rules.insert(r, i as u16);
        Ok(i as u16)
    }

    /// Opens and registers the files of the executable mappings of `pid` not registered yet.
    /// Cheap when /proc/PID/maps did not change. Returns whether something new was registered.
    pub fn sync_process(&mut self, skel: &MemleakSkel, objects: &mut Objects, pid: i32) -> bool {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return false };
        if self.last_maps.get(&pid) == Some(&text) {
            return false;
        }
        let mut added = false;
        for m in ProcMaps::parse(&text).mappings.iter().filter(|m| m.executable && m.is_file()) {
            // Also for the registered ones: they take the name the process sees them by.
            let i = objects.open_mapping(pid, m);
            if !self.registered.contains(&(m.kernel_dev(), m.inode)) {
                added |= self.register(skel, objects, i);
            }
        }
        self.last_maps.insert(pid, text);
        added
    }

    /// Forgets process `pid`'s maps (it is gone).
    pub fn forget(&mut self, pid: i32) {
        self.last_maps.remove(&pid);
    }

    /// Registers a file opened before any process maps it (-c: the command's objects), named
    /// `name` (its path as the command will see it).
    pub fn preload(&mut self, skel: &MemleakSkel, objects: &mut Objects, file: File, name: &Path) -> bool {
        match objects.add_file(file, name) {
            Ok(i) if !self.registered.contains(&objects.get(i).key) => self.register(skel, objects, i),
            Ok(_) => false,
            Err(e) => {
                self.failures.push(format!("{e:#}"));
                false
            }
        }
    }

    /// A walk met a file not opened yet (the BPF side's wake-up): opens it through its mapping
    /// while that lasts, and registers it.
    pub fn met(&mut self, skel: &MemleakSkel, objects: &mut Objects, ev: &unwind_met) -> bool {
        let key = (ev.dev, ev.ino);
        let i = objects.met(key, ev.id);
        if self.registered.contains(&key) {
            return false;
        }
        objects.open_mapping(ev.pid as i32, &met_mapping(ev));
        self.register(skel, objects, i)
    }

    /// Files met that could not be opened (unmapped, or another file there, by the time we
    /// looked): a library unloaded is often mapped again soon, at the same place (a
    /// dlopen/dlclose loop). Tries their ranges again for up to 2 ms, at most 50 times per file.
    pub fn chase(&mut self, skel: &MemleakSkel, objects: &mut Objects, met: &[unwind_met]) {
        let pending = |objects: &Objects, ev: &unwind_met| {
            objects.by_key((ev.dev, ev.ino)).is_some_and(|i| objects.get(i).file().is_none())
        };
        let mut chased: Vec<&unwind_met> = Vec::new();
        for ev in met {
            let n = self.chases.entry((ev.dev, ev.ino)).or_insert(0);
            if pending(objects, ev) && *n < 50 && !chased.iter().any(|c| (c.dev, c.ino) == (ev.dev, ev.ino)) {
                *n += 1;
                chased.push(ev);
            }
        }
        let deadline = Instant::now() + std::time::Duration::from_millis(2);
        while !chased.is_empty() && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(20));
            for ev in &chased {
                if let Some(i) = objects.by_key((ev.dev, ev.ino)) {
                    objects.open_mapping(ev.pid as i32, &met_mapping(ev));
                    self.register(skel, objects, i);
                }
            }
            chased.retain(|ev| pending(objects, ev));
        }
    }

    /// Files the BPF side met but never told of (its wake-up buffer was full): from the
    /// objects map, each opened if one of the processes `pids` still maps it.
    pub fn catch_up(&mut self, skel: &MemleakSkel, objects: &mut Objects, pids: &[i32]) {
        let mut met = Vec::new();
        let r = crate::batch::for_each(&skel.maps.unwind_objects, |k, v| {
            let key: unwind_obj_key = crate::collector::read_pod(k);
            let obj: unwind_object = crate::collector::read_pod(v);
            if obj.state == unwind_object_state::UNW_OBJ_NEW.0 && objects.by_key((key.dev, key.ino)).is_none() {
                met.push(((key.dev, key.ino), obj.id));
            }
        });
        if r.is_err() || met.is_empty() {
            return;
        }
        for &(key, id) in &met {
            objects.met(key, id);
        }
        for &pid in pids {
            let Ok(maps) = ProcMaps::read(pid) else { continue };
            for m in maps.mappings.iter().filter(|m| m.is_file()) {
                if let Some(&(key, _)) = met.iter().find(|(key, _)| *key == (m.kernel_dev(), m.inode)) {
                    let i = objects.open_mapping(pid, m);
                    if !self.registered.contains(&key) {
                        self.register(skel, objects, i);
                    }
                }
            }
        }
    }

    /// Writes object `i`'s entry in the BPF objects map: its id, whether it is open, and its
    /// table when it has one. Returns whether a table was added.
    fn register(&mut self, skel: &MemleakSkel, objects: &mut Objects, i: usize) -> bool {
        let o = objects.get(i);
        let (key, name) = (o.key, o.display_name());
        let (state, placed) = match &o.state {
            State::Open(f) => (unwind_object_state::UNW_OBJ_OPENED, self.table_of(skel, f, &name)),
            State::Unreadable { why, retry: false } => {
                self.failures.push(format!("{name}: not readable: {why}"));
                (unwind_object_state::UNW_OBJ_UNREADABLE, None)
            }
            // It may be mapped again: the BPF side keeps waking us when it meets it.
            State::Unreadable { retry: true, .. } => return false,
        };
        self.registered.insert(key);
        let bkey = unwind_obj_key { dev: key.0, pad: 0, ino: key.1 };
        let mut value = placed.map(|p| p.obj).unwrap_or(unwind_object {
            vaddr_minus_offset: 0,
            page_base: 0,
            first_page: 0,
            npages: 0,
            id: 0,
            state: 0,
            pad: 0,
        });
        value.state = state.0;
        // The id the BPF side gave, if it met the file first; else ours. It only inserts.
        let map = &skel.maps.unwind_objects;
        let existing = |map: &libbpf_rs::MapMut| {
            map.lookup(pod_bytes(&bkey), MapFlags::ANY)
                .ok()
                .flatten()
                .map(|v| crate::collector::read_pod::<unwind_object>(&v).id)
        };
        let written = match existing(map).or(Some(objects.get(i).id).filter(|&id| id != 0)) {
            Some(id) => {
                value.id = id;
                map.update(pod_bytes(&bkey), pod_bytes(&value), MapFlags::ANY)
            }
            None => {
                value.id = objects.new_user_id();
                map.update(pod_bytes(&bkey), pod_bytes(&value), MapFlags::NO_EXIST).or_else(|_| {
                    value.id = existing(map).unwrap_or(value.id);
                    map.update(pod_bytes(&bkey), pod_bytes(&value), MapFlags::ANY)
                })
            }
        };
        if let Err(e) = written {
            self.failures.push(format!("{name}: cannot register it: {e}"));
            return false;
        }
        objects.set_id(i, value.id);
        let Some(p) = placed else { return false };
        // Walks that cached "no table" for this file look again.
        self.generation = self.generation.wrapping_add(1);
        let _ = skel.maps.unwind_generation.update(&0u32.to_ne_bytes(), &self.generation.to_ne_bytes(), MapFlags::ANY);
        // Said once it is in use (the tests wait for this line).
        if self.verbose {
            errln!(
                "memleak: unwind table for {name}: {} rows, {} bytes of code outside the model",
                p.rows,
                p.unsupported_bytes
            );
        }
        true
    }

    /// The table of an open object: built once per build-id, None when it has none.
    fn table_of(&mut self, skel: &MemleakSkel, mut f: &File, name: &str) -> Option<Placed> {
        let data = f
            .seek(SeekFrom::Start(0))
            .map_err(anyhow::Error::from)
            .and_then(|_| crate::objfile::read_bounded(f, crate::objfile::MAX_OBJECT_SIZE, Path::new(name)))
            .and_then(|d| crate::objfile::check_elf(&d, Path::new(name)).map(|_| d));
        let data = match data {
            Ok(d) => d,
            Err(e) => {
                self.failures.push(format!("{name}: cannot read: {e:#}"));
                return None;
            }
        };
        let id = object_id(&data);
        if let Some(p) = self.by_build_id.get(&id) {
            return *p;
        }
        let p = match self.place(skel, &data) {
            Ok(p) => Some(p),
            Err(e) => {
                self.failures.push(format!("{name}: no unwind table: {e:#}"));
                None
            }
        };
        self.by_build_id.insert(id, p);
        p
    }

    /// Builds an object's table and writes it into free space of the maps.
    fn place(&mut self, skel: &MemleakSkel, data: &[u8]) -> Result<Placed> {
        let start = Instant::now();
        let t = table::build(data)?;
        if t.rows.is_empty() {
            bail!("no .eh_frame");
        }
        let (first_page, pages, local_rules) = table::pages(&t, PAGE_SHIFT)?;
        let npages = pages.len() as u32;
        let nrows: u32 = pages.iter().map(|p| p.len() as u32).sum();
        if self.next_page + npages > MAX_PAGES || self.next_row + nrows > MAX_ROWS {
            bail!("the unwind maps are full ({MAX_ROWS} rows, {MAX_PAGES} pages)");
        }
        let global: Vec<u16> = local_rules.iter().map(|r| self.rule_index(skel, *r)).collect::<Result<_>>()?;
        let mut row_keys = Vec::with_capacity(nrows as usize);
        let mut row_vals = Vec::with_capacity(nrows as usize);
        let mut page_keys = Vec::with_capacity(npages as usize);
        let mut page_vals = Vec::with_capacity(npages as usize);
        let mut row = self.next_row;
        for (i, p) in pages.iter().enumerate() {
            page_keys.push(self.next_page + i as u32);
            page_vals.push(unwind_page { first_row: row, nrows: p.len() as u32 });
            for &r in p {
                row_keys.push(row);
                row_vals.push((r & 0xffff_0000) | u32::from(global[(r & 0xffff) as usize]));
                row += 1;
            }
        }
        write_batch(&skel.maps.unwind_rows, &row_keys, &row_vals)?;
        write_batch(&skel.maps.unwind_pages, &page_keys, &page_vals)?;
        if let Some(m) = self.mirror.as_mut() {
            m.rows(self.next_row, &row_vals);
            m.pages(self.next_page, &page_vals);
        }
        let obj = unwind_object {
            vaddr_minus_offset: t.vaddr_minus_offset,
            page_base: self.next_page,
            first_page: first_page as u32,
            npages,
            id: 0,
            state: 0,
            pad: 0,
        };
        self.next_page += npages;
        self.next_row += nrows;
        self.built += 1;
        self.rows_total += u64::from(nrows);
        self.build_secs += start.elapsed().as_secs_f64();
        Ok(Placed { obj, rows: nrows, unsupported_bytes: t.unsupported_bytes })
    }
}

/// The mapping a wake-up describes. No path: the range may map another file by now; the object
/// is named after the file opened, if it is the one met.
fn met_mapping(ev: &unwind_met) -> Mapping {
    Mapping {
        start: ev.start,
        end: ev.end,
        offset: 0,
        readable: true,
        writable: false,
        executable: true,
        shared: false,
        path: None,
        dev: libc::makedev(ev.dev >> 20, ev.dev & 0xfffff),
        inode: ev.ino,
    }
}

fn write_batch<T: Copy>(map: &impl MapCore, keys: &[u32], vals: &[T]) -> Result<()> {
    const CHUNK: usize = 65536;
    for (k, v) in keys.chunks(CHUNK).zip(vals.chunks(CHUNK)) {
        // SAFETY: u32 and the plain C value structs are valid as bytes.
        let kb = unsafe { std::slice::from_raw_parts(k.as_ptr().cast::<u8>(), std::mem::size_of_val(k)) };
        let vb = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) };
        map.update_batch(kb, vb, k.len() as u32, MapFlags::ANY, MapFlags::ANY).context("writing unwind rows")?;
    }
    Ok(())
}

fn pod_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: a plain C struct from the shared header, read as its bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn object_id(data: &[u8]) -> ObjectId {
    if let Ok(f) = object::File::parse(data)
        && let Ok(Some(id)) = f.build_id()
    {
        return [b"b:".as_slice(), id].concat();
    }
    // No build-id: the file's bytes are what they are; key by a hash of them.
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    [b"h:".as_slice(), &h.finish().to_ne_bytes()].concat()
}
