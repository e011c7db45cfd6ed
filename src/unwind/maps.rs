//! Feeds the unwind tables of a process's executable mappings into the BPF maps, and keeps
//! them current as objects are mapped (dlopen, exec). Each object is processed once per run,
//! keyed by build-id; the BPF side finds it by the (dev, inode) of the file its code maps.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use libbpf_rs::{MapCore, MapFlags};
use object::Object;

use super::table::{self, Rule};
use crate::skel::MemleakSkel;
use crate::skel::types::{unwind_obj_key, unwind_object, unwind_page};

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

/// An object's identity for "process once": its build-id, or its path and size and mtime.
type ObjectId = Vec<u8>;

pub struct UnwindTables {
    rules: HashMap<Rule, u16>,
    next_row: u32,
    next_page: u32,
    /// Objects placed (or that failed: None) by identity.
    objects: HashMap<ObjectId, Option<Placed>>,
    /// (dev, ino) already registered in the BPF objects map.
    registered: HashMap<(u32, u64), ()>,
    last_maps: String,
    verbose: bool,
    generation: u32,
    /// Stats for the report and docs: objects built, rows, time spent.
    pub built: u32,
    pub rows_total: u64,
    pub build_secs: f64,
    /// Objects that got no table and why (shown once).
    pub failures: Vec<String>,
}

impl UnwindTables {
    pub fn new(skel: &MemleakSkel, verbose: bool) -> Result<Self> {
        let mut t = UnwindTables {
            rules: HashMap::new(),
            next_row: 0,
            next_page: 0,
            objects: HashMap::new(),
            registered: HashMap::new(),
            last_maps: String::new(),
            verbose,
            generation: 0,
            built: 0,
            rows_total: 0,
            build_secs: 0.0,
            failures: Vec::new(),
        };
        // Rule 0: no CFI.
        t.rule_index(skel, Rule::NONE)?;
        Ok(t)
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
        self.rules.insert(r, i as u16);
        Ok(i as u16)
    }

    /// Loads the tables of the executable mappings of `pid` not loaded yet. Cheap when
    /// /proc/PID/maps did not change. Returns whether something new was registered.
    pub fn sync_process(&mut self, skel: &MemleakSkel, pid: i32) -> bool {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return false };
        if text == self.last_maps {
            return false;
        }
        let mut added = false;
        for line in text.lines() {
            let Some(m) = parse_exec_mapping(line) else { continue };
            if self.registered.contains_key(&(m.dev, m.ino)) {
                continue;
            }
            // Through /proc: works for other mount namespaces and for deleted files.
            let via_proc = PathBuf::from(format!("/proc/{pid}/map_files/{}", m.range));
            let path = if via_proc.exists() { via_proc } else { PathBuf::from(&m.path) };
            added |= self.add_object(skel, &path, &m.path, m.dev, m.ino);
        }
        self.last_maps = text;
        added
    }

    /// Loads the table of a file before any process maps it (-c: the command's objects).
    pub fn preload(&mut self, skel: &MemleakSkel, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(md) = std::fs::metadata(path) else { return false };
        let dev = md.dev();
        let kdev = (libc::major(dev) << 20) | libc::minor(dev);
        if self.registered.contains_key(&(kdev, md.ino())) {
            return false;
        }
        let name = path.to_string_lossy().into_owned();
        self.add_object(skel, path, &name, kdev, md.ino())
    }

    fn add_object(&mut self, skel: &MemleakSkel, path: &Path, name: &str, dev: u32, ino: u64) -> bool {
        self.registered.insert((dev, ino), ());
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) => {
                self.failures.push(format!("{name}: cannot read: {e}"));
                return false;
            }
        };
        let id = object_id(&data, path);
        let placed = match self.objects.get(&id) {
            Some(p) => *p,
            None => {
                let p = match self.place(skel, &data) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        self.failures.push(format!("{name}: no unwind table: {e:#}"));
                        None
                    }
                };
                self.objects.insert(id, p);
                p
            }
        };
        let Some(p) = placed else { return false };
        let key = unwind_obj_key { dev, pad: 0, ino };
        if let Err(e) = skel.maps.unwind_objects.update(pod_bytes(&key), pod_bytes(&p.obj), MapFlags::ANY) {
            self.failures.push(format!("{name}: cannot register its table: {e}"));
            return false;
        }
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
        let obj = unwind_object {
            vaddr_minus_offset: t.vaddr_minus_offset,
            page_base: self.next_page,
            first_page: first_page as u32,
            npages,
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

fn object_id(data: &[u8], path: &Path) -> ObjectId {
    if let Ok(f) = object::File::parse(data)
        && let Ok(Some(id)) = f.build_id()
    {
        return [b"b:".as_slice(), id].concat();
    }
    // No build-id: the file's bytes are what they are; key by a hash of them.
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    let _ = path;
    [b"h:".as_slice(), &h.finish().to_ne_bytes()].concat()
}

struct ExecMapping {
    range: String,
    dev: u32,
    ino: u64,
    path: String,
}

/// An executable file mapping of /proc/PID/maps, with the kernel's dev_t of its file.
fn parse_exec_mapping(line: &str) -> Option<ExecMapping> {
    let mut it = line.split_ascii_whitespace();
    let range = it.next()?;
    let perms = it.next()?;
    let _off = it.next()?;
    let dev = it.next()?;
    let ino: u64 = it.next()?.parse().ok()?;
    let path = it.collect::<Vec<_>>().join(" ");
    if perms.as_bytes().get(2) != Some(&b'x') || ino == 0 || !path.starts_with('/') {
        return None;
    }
    let (maj, min) = dev.split_once(':')?;
    let (maj, min) = (u32::from_str_radix(maj, 16).ok()?, u32::from_str_radix(min, 16).ok()?);
    Some(ExecMapping { range: range.to_string(), dev: (maj << 20) | min, ino, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_executable_file_mappings_only() {
        let m = parse_exec_mapping(
            "7f570ee25000-7f570ef7b000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6",
        )
        .expect("libc text");
        assert_eq!((m.dev, m.ino), (0xfe << 20, 326279));
        assert_eq!(m.range, "7f570ee25000-7f570ef7b000");
        assert_eq!(m.path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert!(parse_exec_mapping("7f57-7f58 r--p 00000000 fe:00 326279 /usr/lib/libc.so.6").is_none());
        assert!(parse_exec_mapping("7ffd5a3f0000-7ffd5a3f2000 r-xp 00000000 00:00 0 [vdso]").is_none());
    }
}
