//! In-process capture for -c (docs/in-process-capture.md): the preload library, embedded in
//! memleak, is handed to the command through a sealed memfd named by LD_PRELOAD; it interposes
//! the malloc family and C++'s operator new and delete, and records outstanding blocks, stacks
//! and loss counters into a region of shared memory per process, in the form the collector gets
//! from the BPF maps. mmap, munmap, mremap and mprotect stay on uprobes (the hybrid): their
//! calls made inside one of the library's are nested, which the BPF side reads from the
//! library's per-thread state (`preload_tls`).
//!
//! Each process running the library connects to memleak's abstract unix socket (the kernel
//! tells who connected), gets its region and the shared unwind tables (SCM_RIGHTS), and asks
//! on that connection for its mappings when a walk meets a new object. A forked child connects
//! again for a region of its own; an exec'd image too. An image that cannot take the library
//! (static, set-user-ID, LD_PRELOAD gone) is traced with uprobes, with a note.
pub mod forward;
#[path = "../../crates/memleak-preload/src/layout.rs"]
pub mod layout;
pub mod region;
mod shm;
mod tables;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use libbpf_rs::{MapCore, MapFlags};

use crate::cli::Config;
use crate::collector::Losses;
use crate::ldso::LoadOrder;
use crate::objects::Objects;
use crate::skel::MemleakSkel;
use crate::skel::types::{unwind_obj_key, unwind_object};
use layout::*;
use region::{Layout, Region};
use tables::Tables;

/// The library, built from crates/memleak-preload by build.rs.
static LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libmemleak_preload.so"));

/// A process expected to run the library that has not connected after this long gets a
/// WARNING (its allocations are not seen).
const SILENT_WARNING_AFTER: Duration = Duration::from_secs(1);

/// The capture of a run: the library, the socket processes connect to, the shared tables, and
/// each process's region.
pub struct Capture<'a, 'obj> {
    skel: &'a MemleakSkel<'obj>,
    /// The library, sealed, and the read-only descriptor of it the command inherits (processes
    /// name it through the command's descriptor table): kept open for the run.
    _library: (OwnedFd, OwnedFd),
    /// The socket processes connect to.
    listener: OwnedFd,
    tables: Rc<RefCell<Tables>>,
    tables_ro: OwnedFd,
    layout: Layout,
    settings: Settings,
    regions: BTreeMap<i32, Region>,
    /// Connections whose hello has not come yet: (connection, when accepted).
    pending: Vec<(OwnedFd, Instant)>,
    /// Processes that will run the library (their image takes it) and when that was decided;
    /// those not connected yet are warned of after a while.
    expected: HashMap<i32, Instant>,
    /// Each process's offset of the library's per-thread call word (for its forked children).
    tls: HashMap<i32, i64>,
    /// The counters of regions gone (they stay in the run's totals).
    retired_counters: [u64; NR_COUNTERS],
    /// The region ids of every process (for scans: the regions are not the program's memory).
    ids: HashSet<(u64, u64)>,
    verbose: bool,
    /// Whether stacks are unwound from the tables (not --frame-pointers): mappings published.
    tables_walk: bool,
}

/// What the command needs before it is forked: the library and the socket's name.
pub struct Prepared {
    library: OwnedFd,
    library_ro: OwnedFd,
    name: String,
    listener: OwnedFd,
    tables: Tables,
}

impl Prepared {
    pub fn new() -> Result<Prepared> {
        let library = shm::memfd(c"memleak-preload")?;
        {
            let mut f = std::fs::File::from(library.try_clone().context("dup")?);
            std::io::Write::write_all(&mut f, LIBRARY).context("writing the preload library")?;
        }
        shm::seal(&library, libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL)?;
        let library_ro = shm::read_only(&library)?;
        let (name, listener) = listen()?;
        Ok(Prepared { library, library_ro, name, listener, tables: Tables::new()? })
    }

    /// LD_PRELOAD (ours first: the allocator below, another preload's included, is what it
    /// forwards to) and the socket's name, for the command's environment. The library is named
    /// through the command's own descriptor table, `{pid}` being its pid: a descendant that
    /// closed its inherited descriptors still finds it.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let lib = format!("/proc/{{pid}}/fd/{}", self.library_ro.as_raw_fd());
        let preload = match std::env::var("LD_PRELOAD") {
            Ok(old) if !old.is_empty() => format!("{lib}:{old}"),
            _ => lib,
        };
        vec![("LD_PRELOAD".into(), preload), (ENV.into(), self.name.clone())]
    }

    /// The descriptors the command inherits.
    pub fn child_fds(&self) -> Vec<RawFd> {
        vec![self.library_ro.as_raw_fd()]
    }

    /// The library's file (device, inode): an object of the process that memleak never probes.
    pub fn library_id(&self) -> (u64, u64) {
        shm::file_id(&self.library)
    }

    /// The socket's name (MEMLEAK_PRELOAD).
    pub fn socket_name(&self) -> &str {
        &self.name
    }
}

impl<'a, 'obj> Capture<'a, 'obj> {
    pub fn new(p: Prepared, cfg: &Config, skel: &'a MemleakSkel<'obj>) -> Result<Capture<'a, 'obj>> {
        let Prepared { library, library_ro, listener, tables, .. } = p;
        let tables_ro = shm::read_only(&tables.shm.fd)?;
        let flags = (if cfg.trace { FLAG_TRACE_ALL } else { 0 })
            | (if cfg.combined_only { FLAG_COMBINED_ONLY } else { 0 })
            | (if cfg.wa_missing_free { FLAG_WA_MISSING_FREE } else { 0 })
            | (if cfg.frame_pointers { FLAG_FRAME_POINTERS } else { 0 });
        Ok(Capture {
            skel,
            _library: (library, library_ro),
            listener,
            tables: Rc::new(RefCell::new(tables)),
            tables_ro,
            layout: Layout::new(u64::from(cfg.max_allocs), cfg.trace),
            settings: Settings {
                min_size: cfg.min_size,
                max_size: cfg.max_size,
                sample_rate: cfg.sample_rate,
                flags,
                max_allocs: u64::from(cfg.max_allocs),
                sample_bytes: cfg.sample_bytes,
            },
            regions: BTreeMap::new(),
            pending: Vec::new(),
            expected: HashMap::new(),
            tls: HashMap::new(),
            retired_counters: [0; NR_COUNTERS],
            ids: HashSet::new(),
            verbose: cfg.verbose,
            tables_walk: !cfg.frame_pointers,
        })
    }

    /// The mirror of the unwind tables (src/unwind/maps.rs writes there too).
    pub fn mirror(&self) -> Box<dyn crate::unwind::maps::Mirror> {
        Box::new(tables::Mirror(self.tables.clone()))
    }

    /// Process `pid`'s image runs the library (said at its exec stop, or for a forked child).
    pub fn expect(&mut self, pid: i32, parent: Option<i32>) {
        self.expected.insert(pid, Instant::now());
        // A forked child's library keeps its parent's TLS layout: the BPF side knows where its
        // per-thread state is before it connects.
        if let Some(off) = parent.and_then(|p| self.tls.get(&p).copied()) {
            self.set_tls(pid, off);
        }
        if self.verbose {
            errln!("memleak: capture: in-process (preload library) for pid {pid}");
        }
    }

    /// Process `pid` gets a new image (exec), or stops being traced: its region and what the
    /// BPF side knew of it go. Returns the region, for its last stacks.
    pub fn forget(&mut self, pid: i32) -> Option<Region> {
        self.expected.remove(&pid);
        self.tls.remove(&pid);
        let _ = self.skel.maps.preload_tls.delete(&(pid as u32).to_ne_bytes());
        let r = self.regions.remove(&pid)?;
        r.stop();
        for (t, c) in self.retired_counters.iter_mut().zip(r.counters()) {
            *t = t.saturating_add(c);
        }
        Some(r)
    }

    fn set_tls(&mut self, pid: i32, off: i64) {
        self.tls.insert(pid, off);
        if let Err(e) =
            self.skel.maps.preload_tls.update(&(pid as u32).to_ne_bytes(), &off.to_ne_bytes(), MapFlags::ANY)
        {
            errln!(
                "memleak: note: pid {pid}: cannot tell the BPF side of its preload library ({e}): mmaps made inside malloc may count twice"
            );
        }
    }

    /// Stops every library recording (the run ends while the processes go on).
    pub fn stop_all(&mut self) {
        for r in self.regions.values() {
            r.stop();
        }
    }

    /// The descriptors to poll: the listener, the connections waiting for their hello, each
    /// region's connection.
    pub fn poll_fds(&self) -> Vec<RawFd> {
        std::iter::once(self.listener.as_raw_fd())
            .chain(self.pending.iter().map(|(c, _)| c.as_raw_fd()))
            .chain(self.regions.values().filter(|r| r.open).map(|r| r.conn.as_raw_fd()))
            .collect()
    }

    /// Accepts the processes that connect (a region for each one `traced` says runs the
    /// library now), and answers their requests. `ready`: descriptors poll found readable.
    pub fn service(&mut self, ready: &[RawFd], unwind: Option<&mut crate::unwind::Unwinder>, objects: &mut Objects) {
        let mut unwind = unwind;
        if ready.contains(&self.listener.as_raw_fd()) {
            while let Some(conn) = accept(&self.listener) {
                self.pending.push((conn, Instant::now()));
            }
        }
        // A connection that said nothing for 5 s is dropped (its library forwards only).
        let (hello, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .filter(|(_, at)| at.elapsed() < Duration::from_secs(5))
            .partition(|(c, _)| ready.contains(&c.as_raw_fd()) || readable(c));
        self.pending = waiting;
        for (conn, _) in hello {
            self.welcome(conn, unwind.as_deref_mut(), objects);
        }
        let asking: Vec<i32> =
            self.regions.values().filter(|r| r.open && ready.contains(&r.conn.as_raw_fd())).map(|r| r.pid).collect();
        for pid in asking {
            if let Some(r) = self.regions.get_mut(&pid)
                && r.hung_up()
            {
                // It exec'd or exited: its region stays for its report.
                r.open = false;
                continue;
            }
            self.publish(pid, unwind.as_deref_mut(), objects, true);
            if let Some(r) = self.regions.get(&pid) {
                r.answer();
            }
        }
    }

    /// A new connection: the process's hello, then its region (or a refusal).
    fn welcome(&mut self, conn: OwnedFd, unwind: Option<&mut crate::unwind::Unwinder>, objects: &mut Objects) {
        let Some(pid) = peer_pid(&conn) else { return };
        let hello = read_hello(&conn);
        let refuse = |conn: &OwnedFd| {
            let w = Welcome { magic: HELLO_MAGIC, ok: 0 };
            // SAFETY: a send of a plain struct on our own socket.
            unsafe {
                libc::send(
                    conn.as_raw_fd(),
                    (&w as *const Welcome).cast(),
                    size_of::<Welcome>(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
        };
        // Only a process memleak traces in-process now; a hello that says nothing sane is refused.
        let Some(hello) = hello.filter(|h| h.magic == HELLO_MAGIC && self.expected.contains_key(&pid)) else {
            refuse(&conn);
            return;
        };
        // A previous region of the process (it forked from a recording parent and reconnects,
        // or an image that hung up): replaced.
        if let Some(old) = self.regions.remove(&pid) {
            old.stop();
            for (t, c) in self.retired_counters.iter_mut().zip(old.counters()) {
                *t = t.saturating_add(c);
            }
        }
        let region = match Region::new(pid, self.layout, &self.settings, conn) {
            Ok(r) => r,
            Err(e) => {
                errln!("memleak: note: pid {pid}: no in-process region ({e:#}): its allocations go unseen");
                return;
            }
        };
        // Before the answer: the BPF side knows where the library's per-thread state is, and the
        // process's mappings are published, before it records anything.
        self.set_tls(pid, hello.call_sp_tls);
        self.ids.insert(region.id());
        self.regions.insert(pid, region);
        self.publish(pid, unwind, objects, false);
        let Some(region) = self.regions.get(&pid) else { return };
        let w = Welcome { magic: HELLO_MAGIC, ok: 1 };
        if let Err(e) = send_with_fds(&region.conn, &w, &[region.fd().as_raw_fd(), self.tables_ro.as_raw_fd()]) {
            errln!("memleak: note: pid {pid}: cannot hand over its in-process region ({e}): its allocations go unseen");
            self.regions.remove(&pid);
        }
    }

    /// Publishes process `pid`'s executable mappings with their tables (registering and
    /// building those of new objects); `changed_only`: skipped when its maps did not change.
    fn publish(
        &mut self,
        pid: i32,
        unwind: Option<&mut crate::unwind::Unwinder>,
        objects: &mut Objects,
        changed_only: bool,
    ) {
        if !self.tables_walk || !self.regions.contains_key(&pid) {
            return;
        }
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return };
        if changed_only && self.regions.get(&pid).is_some_and(|r| r.last_maps == text) {
            return;
        }
        if let Some(u) = unwind {
            u.sync(objects, &[pid]);
        }
        let list = mappings(&self.skel.maps.unwind_objects, &text);
        if let Some(r) = self.regions.get_mut(&pid) {
            r.publish_maps(&list);
            r.last_maps = text;
        }
    }

    /// Every tick: the mappings of every process again, where they changed (dlopen, dlclose);
    /// regions of processes that hung up for good are not read again here (their exit does).
    pub fn tick(&mut self, mut unwind: Option<&mut crate::unwind::Unwinder>, objects: &mut Objects) {
        let pids: Vec<i32> = self.regions.keys().copied().collect();
        for pid in pids {
            self.publish(pid, unwind.as_deref_mut(), objects, true);
        }
    }

    /// -t: the lines the libraries recorded since the last call.
    pub fn trace_lines(&self) -> String {
        let mut out = String::new();
        for r in self.regions.values() {
            for (kind, size, addr) in r.drain_events() {
                if kind == EV_ALLOC {
                    out.push_str(&format!("alloc exited, size = {size}, result = {addr:x}\n"));
                } else {
                    out.push_str(&format!("free entered, address = {addr:x}, size = {size}\n"));
                }
            }
        }
        out
    }

    /// Whether -t lines may wait in a region (memleak polls for them).
    pub fn tracing(&self) -> bool {
        self.settings.flags & FLAG_TRACE_ALL != 0 && !self.regions.is_empty()
    }

    /// Whether process `pid`'s library saw an allocation call.
    pub fn seen(&self, pid: i32) -> bool {
        self.regions.get(&pid).is_some_and(|r| r.seen())
    }

    /// A WARNING for a process whose region it wrote over (values out of bounds met by the
    /// reads of the region so far).
    pub fn scribbled(&self, pid: u32) -> Option<String> {
        let n = self.regions.get(&(pid as i32)).map(|r| r.rejected()).filter(|&n| n > 0)?;
        Some(format!(
            "pid {pid} wrote over its in-process capture region: {n} values out of bounds ignored (its report may miss blocks or stacks)"
        ))
    }

    /// A WARNING for a process that was to run the library and never reported to memleak.
    pub fn warning(&self, pid: i32, exited: bool) -> Option<String> {
        let since = self.expected.get(&pid)?;
        if self.regions.contains_key(&pid) || (!exited && since.elapsed() < SILENT_WARNING_AFTER) {
            return None;
        }
        Some(format!(
            "pid {pid}'s preload library never reported to memleak: its malloc family calls were not seen (it closed its environment's MEMLEAK_PRELOAD, or runs in another network namespace?)"
        ))
    }

    /// The regions' memfds (device, inode): shared memory, not the program's; a scan skips it.
    pub fn region_ids(&self) -> Vec<(u64, u64)> {
        self.ids.iter().copied().collect()
    }

    /// Every block of process `pid` the library recorded: f(addr, size, timestamp_ns, stack_id).
    pub fn for_each_block(&self, pid: u32, f: &mut dyn FnMut(u64, u64, u64, u64)) {
        if let Some(r) = self.regions.get(&(pid as i32)) {
            r.for_each_block(f);
        }
    }

    /// --combined-only: process `pid`'s totals by stack: (id, bytes, blocks).
    pub fn combined(&self, pid: u32) -> Vec<(u64, u64, u64)> {
        self.regions.get(&(pid as i32)).map(|r| r.combined()).unwrap_or_default()
    }

    /// What the libraries lost, added to `l` (the counters of regions gone included).
    pub fn add_losses(&self, l: &mut Losses) {
        let mut sum = self.retired_counters;
        for r in self.regions.values() {
            for (s, c) in sum.iter_mut().zip(r.counters()) {
                *s = s.saturating_add(c);
            }
        }
        let x = crate::collector::Collector::losses(&sum);
        l.allocs_map_full += x.allocs_map_full;
        l.stacks_map_full += x.stacks_map_full;
        l.trace_events_lost += x.trace_events_lost;
        l.combined_map_full += x.combined_map_full;
        l.truncated_stacks += x.truncated_stacks;
        l.unwinds += x.unwinds;
        let (s, t) = (&mut l.unwind_stops, x.unwind_stops);
        s.not_mapped += t.not_mapped;
        s.no_table += t.no_table;
        s.no_cfi += t.no_cfi;
        s.unsupported += t.unsupported;
        s.bad_cfa += t.bad_cfa;
        s.unreadable += t.unreadable;
    }

    /// Reads the regions' stacks into the collector: the ids new to it.
    pub fn refresh_stacks(&mut self, collector: &mut crate::collector::Collector) -> Vec<u64> {
        let mut new = Vec::new();
        for r in self.regions.values_mut() {
            add_stacks(r, collector, &mut new);
        }
        new
    }
}

impl crate::collector::MoreRecords for Capture<'_, '_> {
    fn pids(&self) -> Vec<u32> {
        self.regions.keys().map(|&p| p as u32).collect()
    }

    fn for_each_block(&self, pid: u32, f: &mut dyn FnMut(u64, u64, u64, u64)) {
        Capture::for_each_block(self, pid, f)
    }

    fn combined(&self, pid: u32) -> Vec<(u64, u64, u64)> {
        Capture::combined(self, pid)
    }

    fn add_losses(&self, l: &mut Losses) {
        Capture::add_losses(self, l)
    }
}

/// Adds a region's stacks to the collector (new ids into `new`).
pub fn add_stacks(r: &mut Region, collector: &mut crate::collector::Collector, new: &mut Vec<u64>) {
    use crate::symbolizer::RawFrame;
    let mut bad = 0;
    for s in r.read_stacks() {
        // An id another process's stack has (BPF's ids hash the pid in; so do the library's):
        // a scribble, which must not change that process's counts.
        if collector.pid_of(s.id).is_some_and(|p| p != r.pid as u32) {
            bad += 1;
            continue;
        }
        let frames = s.frames.map(|f| f.into_iter().map(|(ip, loc)| RawFrame { ip, loc }).collect());
        if collector.add_stack(s.id, r.pid as u32, frames, s.alloc_count, s.alloc_bytes) {
            new.push(s.id);
        }
    }
    r.rejected_in_read(bad);
}

/// The executable mappings of /proc/PID/maps `text` as the library walks them: each file's
/// object id and table from the BPF objects map (the tables are mirrored at the same indexes).
fn mappings(objects: &impl MapCore, text: &str) -> Vec<MapEntry> {
    let maps = crate::procmaps::ProcMaps::parse(text);
    let mut out = Vec::new();
    for m in maps.mappings.iter().filter(|m| m.executable) {
        let mut e = MapEntry {
            start: m.start,
            end: m.end,
            file_adj: (m.offset as i64).wrapping_sub(m.start as i64),
            ..Default::default()
        };
        if m.is_file() {
            let key = unwind_obj_key { dev: m.kernel_dev(), pad: 0, ino: m.inode };
            // SAFETY: a plain C struct from the shared header, read as its bytes.
            let kb = unsafe {
                std::slice::from_raw_parts((&key as *const unwind_obj_key).cast::<u8>(), size_of::<unwind_obj_key>())
            };
            if let Ok(Some(v)) = objects.lookup(kb, MapFlags::ANY) {
                let o: unwind_object = crate::collector::read_pod(&v);
                e.obj = o.id;
                if o.npages > 0 {
                    e.adj = e.file_adj.wrapping_add(o.vaddr_minus_offset);
                    e.page_base = o.page_base;
                    e.first_page = o.first_page;
                    e.npages = o.npages;
                }
            }
        }
        out.push(e);
    }
    out.sort_by_key(|e| e.start);
    out
}

/// Why the dynamic linker will not load the library into the image process `pid` just exec'd
/// (its load order `order`), if it will not.
pub fn ineligible(pid: i32, order: &LoadOrder, library: (u64, u64), socket: &str) -> Option<String> {
    let exe = order.executable().path.display().to_string();
    let Some(interp) = &order.interpreter else {
        return Some(format!("{exe} is statically linked"));
    };
    let ld = interp.path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if !ld.starts_with("ld-linux") {
        return Some(format!("{exe} is loaded by {}, not glibc's dynamic linker", interp.path.display()));
    }
    if order.secure {
        return Some(format!(
            "{exe} runs in secure mode (set-user-ID, set-group-ID or file capabilities): the dynamic linker ignores LD_PRELOAD paths"
        ));
    }
    if !order.objects.iter().any(|o| o.preload && o.file_id() == Some(library)) {
        let named = order.missing.iter().any(|m| m.preload && m.name.to_string_lossy().starts_with("/proc/"));
        return Some(if named {
            format!("{exe}'s LD_PRELOAD names memleak's library through a process that has exited")
        } else {
            format!("{exe} was started without memleak's LD_PRELOAD")
        });
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let want = format!("{ENV}={socket}");
    let last = environ.split(|&b| b == 0).rfind(|v| v.starts_with(format!("{ENV}=").as_bytes()));
    if last != Some(want.as_bytes()) {
        return Some(format!("{exe} was started without memleak's {ENV} variable"));
    }
    let ns = |p: &str| std::fs::metadata(p).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    if ns(&format!("/proc/{pid}/ns/net")) != ns("/proc/self/ns/net") {
        return Some(format!("{exe} runs in another network namespace, where its library cannot reach memleak"));
    }
    None
}

/// A listening abstract unix socket with a name nobody can guess.
fn listen() -> Result<(String, OwnedFd)> {
    let mut rnd = [0u8; 16];
    // SAFETY: getrandom into a local buffer.
    if unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), 0) } != rnd.len() as isize {
        bail!("getrandom: {}", std::io::Error::last_os_error());
    }
    let hex: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("memleak-{}-{hex}", std::process::id());
    // SAFETY: socket, bind and listen on a new descriptor of ours with a local address.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path[1..].iter_mut().zip(name.as_bytes()) {
            *d = *s as libc::c_char;
        }
        let len = (size_of::<libc::sa_family_t>() + 1 + name.len()) as libc::socklen_t;
        if libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
            bail!("binding the preload library's socket: {}", std::io::Error::last_os_error());
        }
        if libc::listen(fd.as_raw_fd(), 128) != 0 {
            bail!("listen: {}", std::io::Error::last_os_error());
        }
        Ok((name, fd))
    }
}

fn accept(listener: &OwnedFd) -> Option<OwnedFd> {
    // SAFETY: accept4 on our listening socket; a new descriptor of ours.
    let fd =
        unsafe { libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    // SAFETY: a new descriptor owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The process (thread group) at the other end: the kernel's word, taken at connect.
fn peer_pid(conn: &OwnedFd) -> Option<i32> {
    let mut cred: libc::ucred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt into a local ucred.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

/// Whether a connection has something to read (or hung up), without waiting.
fn readable(conn: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: conn.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one live pollfd, no wait.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// The library's hello (the connection is readable).
fn read_hello(conn: &OwnedFd) -> Option<Hello> {
    let mut h = Hello::default();
    // SAFETY: a non-blocking receive into a local plain struct.
    let n =
        unsafe { libc::recv(conn.as_raw_fd(), (&mut h as *mut Hello).cast(), size_of::<Hello>(), libc::MSG_DONTWAIT) };
    (n == size_of::<Hello>() as isize).then_some(h)
}

/// Sends `w` with descriptors `fds` (SCM_RIGHTS).
fn send_with_fds(conn: &OwnedFd, w: &Welcome, fds: &[RawFd; 2]) -> std::io::Result<()> {
    let mut iov = libc::iovec { iov_base: (w as *const Welcome as *mut Welcome).cast(), iov_len: size_of::<Welcome>() };
    // SAFETY: CMSG_SPACE of two descriptors.
    let space = unsafe { libc::CMSG_SPACE(size_of::<[RawFd; 2]>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr over local buffers; the control message is built with the CMSG macros.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<[RawFd; 2]>() as u32) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), 2);
        if libc::sendmsg(conn.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_entries_carry_the_file_offset() {
        let text = "55d0c0000000-55d0c0001000 r--p 00000000 00:00 0 \n\
                    55d0c0001000-55d0c0003000 r-xp 00001000 00:00 0 [vdso]\n";
        let objects = libbpf_rs::MapHandle::create(
            libbpf_rs::MapType::Hash,
            Some("t"),
            size_of::<unwind_obj_key>() as u32,
            size_of::<unwind_object>() as u32,
            4,
            &libbpf_sys::bpf_map_create_opts {
                sz: size_of::<libbpf_sys::bpf_map_create_opts>() as _,
                ..Default::default()
            },
        )
        .expect("a BPF hash map (root)");
        let m = mappings(&objects, text);
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].start, m[0].end, m[0].obj, m[0].npages), (0x55d0c0001000, 0x55d0c0003000, 0, 0));
        assert_eq!(m[0].file_adj, 0x1000 - 0x55d0c0001000);
    }
}
