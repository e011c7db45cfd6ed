//! Kernel mode end to end, as root on the running kernel: kernel memory held by a fixture shows
//! up from the right stacks and falls away once released. Kernel-wide tracing sees the whole
//! machine, so the checks are "at least N from these stacks", then "fewer than half of N".
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// One kernel-wide tracer at a time: each would see the other tests' fixtures.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long to wait for a report to show what is expected: generous, the machine is shared.
const PATIENCE: Duration = Duration::from_secs(90);

/// One stack of a report.
#[derive(Debug, Clone)]
struct Stack {
    bytes: u64,
    count: u64,
    frames: Vec<String>,
    /// `-a`: (address, size)
    blocks: Vec<(u64, u64)>,
}

#[derive(Debug, Default, Clone)]
struct Report {
    warnings: Vec<String>,
    stacks: Vec<Stack>,
}

impl Report {
    /// Stacks with a frame of function `f`.
    fn through<'a>(&'a self, f: &'a str) -> impl Iterator<Item = &'a Stack> + 'a {
        self.stacks.iter().filter(move |s| s.frames.iter().any(|fr| frame_function(fr) == f))
    }

    fn count_through(&self, f: &str) -> u64 {
        self.through(f).map(|s| s.count).sum()
    }
}

/// `name+0xoff [kernel] (addr)` → `name`.
fn frame_function(frame: &str) -> &str {
    frame.split('+').next().unwrap_or(frame)
}

/// memleak running in kernel mode; its stdout parsed into reports by a reader thread.
struct Memleak {
    child: Child,
    reports: Receiver<Report>,
}

impl Memleak {
    fn start(args: &[&str]) -> Memleak {
        let mut child = Command::new(env!("CARGO_BIN_EXE_memleak"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("memleak starts");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines.next().expect("memleak prints a line").expect("utf-8");
        assert!(first.starts_with("Attaching to ") && first.ends_with(", Ctrl+C to quit."), "{first}");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut cur: Option<Report> = None;
            for line in lines.map_while(Result::ok) {
                if line.starts_with('[') && line.contains("] Top ") {
                    if let Some(r) = cur.take()
                        && tx.send(r).is_err()
                    {
                        return;
                    }
                    cur = Some(Report::default());
                    continue;
                }
                let Some(r) = cur.as_mut() else { continue };
                if let Some(w) = line.strip_prefix("\tWARNING: ") {
                    r.warnings.push(w.to_string());
                } else if line.starts_with("\tNOTE: ") {
                    // Blocks younger than -o, left out on purpose.
                } else if let Some(f) = line.strip_prefix("\t\t") {
                    r.stacks.last_mut().expect("a frame follows a stack line").frames.push(f.to_string());
                } else if let Some(a) = line.strip_prefix("\taddr = ") {
                    let (addr, size) = a.split_once(" size = ").expect("addr line");
                    let block = (u64::from_str_radix(addr, 16).expect("hex"), size.parse().expect("size"));
                    // Blocks come before their stack line: keep them on a pending stack.
                    match r.stacks.last_mut() {
                        Some(s) if s.count == 0 => s.blocks.push(block),
                        _ => r.stacks.push(Stack { bytes: 0, count: 0, frames: vec![], blocks: vec![block] }),
                    }
                } else if let Some(t) = line.strip_prefix('\t') {
                    let (bytes, rest) = t.split_once(" bytes in ").expect("stack line");
                    let count = rest.split_once(' ').expect("count").0.parse().expect("count");
                    let bytes = bytes.parse().expect("bytes");
                    match r.stacks.last_mut() {
                        Some(s) if s.count == 0 => (s.bytes, s.count) = (bytes, count),
                        _ => r.stacks.push(Stack { bytes, count, frames: vec![], blocks: vec![] }),
                    }
                }
            }
            if let Some(r) = cur {
                let _ = tx.send(r);
            }
        });
        Memleak { child, reports: rx }
    }

    /// The first report, complete after this call, for which `ok` holds.
    fn wait_for(&self, what: &str, ok: impl Fn(&Report) -> bool) -> Report {
        while self.reports.try_recv().is_ok() {}
        let deadline = Instant::now() + PATIENCE;
        let mut last = None;
        loop {
            match self.reports.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(r) if ok(&r) => return r,
                Ok(r) => last = Some(r),
                Err(RecvTimeoutError::Timeout) => panic!("no report showed {what} in {PATIENCE:?}; last: {last:#?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("memleak ended before a report showed {what}"),
            }
        }
    }
}

impl Drop for Memleak {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

fn fixture() -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kmem_fixture");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kmem_fixture.c");
    let st = Command::new("cc").args(["-O2", "-Wall", "-Werror", "-o"]).arg(&out).arg(src).status().expect("cc runs");
    assert!(st.success(), "compiling {src}");
    out
}

/// The fixture, holding its kernel memory once `ready` was read.
struct Fixture {
    child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Fixture {
    fn start(args: &[&str]) -> Fixture {
        let mut child = Command::new(fixture())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("fixture starts");
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut f = Fixture { child, stdin, lines };
        f.expect("ready");
        f
    }

    fn expect(&mut self, word: &str) {
        let line = self.lines.next().expect("fixture line").expect("utf-8");
        assert_eq!(line, word);
    }

    /// Releases the kernel memory; returns once the fixture says it is done.
    fn release(&mut self) {
        writeln!(self.stdin).expect("fixture reads");
        self.expect("done");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin);
        let _ = self.child.wait();
    }
}

#[test]
fn pipes_show_from_alloc_pipe_info_then_fall_away() {
    let _serial = serial();
    const N: u64 = 500;
    let ml = Memleak::start(&["-T", "100000", "1"]);
    let mut fx = Fixture::start(&["pipes", &N.to_string()]);
    let held = ml.wait_for("the pipes", |r| r.count_through("alloc_pipe_info") >= N);
    let seen = held.count_through("alloc_pipe_info");
    eprintln!("pipes held: {N}, outstanding allocations through alloc_pipe_info: {seen}");
    for s in held.through("alloc_pipe_info") {
        assert!(s.bytes >= s.count && s.frames.iter().all(|f| f.contains(" [kernel] (")), "{s:?}");
    }
    fx.release();
    let after = ml.wait_for("the pipes gone", |r| r.count_through("alloc_pipe_info") < N / 2);
    eprintln!("after closing: {}", after.count_through("alloc_pipe_info"));
}

#[test]
fn size_filter_applies_in_kernel_mode() {
    let _serial = serial();
    const N: u64 = 300;
    const MIN: u64 = 512;
    // Each pipe allocates a small pipe_inode_info and a buffer array of at least 512 bytes
    // (16 pipe_buffers) through alloc_pipe_info: only the array passes -z.
    let ml = Memleak::start(&["-a", "-z", &MIN.to_string(), "-T", "100000", "1"]);
    let mut fx = Fixture::start(&["pipes", &N.to_string()]);
    let held = ml.wait_for("the pipes' buffer arrays", |r| r.count_through("alloc_pipe_info") >= N);
    for s in &held.stacks {
        assert_eq!(s.blocks.len() as u64, s.count, "-a lists every block: {s:?}");
        assert!(s.blocks.iter().all(|&(_, size)| size >= MIN), "-z {MIN}: {s:?}");
    }
    let pipe_allocs = held.count_through("alloc_pipe_info");
    assert!(pipe_allocs < 2 * N, "the small half of each pipe is filtered out: {pipe_allocs}");
    fx.release();
}

#[test]
fn pages_show_by_pfn_then_fall_away() {
    let _serial = serial();
    const PIPES: u64 = 64;
    const PAGES: u64 = PIPES * 16;
    let ml = Memleak::start(&["-a", "-T", "100000", "1"]);
    let mut fx = Fixture::start(&["pages", &PIPES.to_string()]);
    // Pipe pages: allocated by pipe_write (anon_pipe_write since 6.14) in the fixture.
    let writer = |r: &Report| {
        let name = if r.count_through("anon_pipe_write") > 0 { "anon_pipe_write" } else { "pipe_write" };
        r.through(name).filter(|s| s.frames.iter().any(|f| f.contains("alloc_pages"))).cloned().collect::<Vec<_>>()
    };
    let held = ml.wait_for("the pipe pages", |r| writer(r).iter().map(|s| s.count).sum::<u64>() >= PAGES);
    let stacks = writer(&held);
    let seen: u64 = stacks.iter().map(|s| s.count).sum();
    eprintln!("pages held: {PAGES}, outstanding page allocations through pipe_write: {seen}");
    let max_pfn = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string())))
        .and_then(|v| v.trim_end_matches(" kB").parse::<u64>().ok())
        .map(|kb| kb * 1024 / 4096 * 4) // generous: physical addresses have holes
        .expect("MemTotal");
    for s in &stacks {
        // -a: one line per page, keyed by page frame number, each a page.
        assert_eq!(s.blocks.len() as u64, s.count, "{s:?}");
        assert_eq!(s.bytes, 4096 * s.count, "{s:?}");
        for &(pfn, size) in &s.blocks {
            assert_eq!(size, 4096);
            assert!(pfn > 0 && pfn < max_pfn, "{pfn:#x} is not a page frame number");
        }
    }
    fx.release();
    ml.wait_for("the pipe pages freed", |r| writer(r).iter().map(|s| s.count).sum::<u64>() < PAGES / 2);
}

#[test]
fn percpu_maps_show_then_clear() {
    let _serial = serial();
    use libbpf_rs::{MapHandle, MapType};
    const MAPS: u64 = 4;
    const ENTRIES: u64 = 128;
    // --combined-only: the totals are kept in BPF and must go down on frees as well.
    let ml = Memleak::start(&["--percpu", "--combined-only", "-T", "100000", "1"]);
    // A per-CPU array allocates each element from the percpu allocator (bpf_map_alloc_percpu).
    let maps: Vec<MapHandle> = (0..MAPS)
        .map(|i| {
            let opts = libbpf_sys::bpf_map_create_opts {
                sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
                ..Default::default()
            };
            MapHandle::create(MapType::PercpuArray, Some(format!("mlk_pcpu{i}")), 4, 8, ENTRIES as u32, &opts)
                .expect("create a per-CPU array")
        })
        .collect();
    let want = MAPS * ENTRIES;
    let held = ml.wait_for("the per-CPU maps", |r| r.count_through("bpf_map_alloc_percpu") >= want);
    let seen = held.count_through("bpf_map_alloc_percpu");
    eprintln!("per-CPU elements held: {want}, outstanding percpu allocations through bpf_map_alloc_percpu: {seen}");
    for s in held.through("bpf_map_alloc_percpu") {
        assert_eq!(s.bytes, 8 * s.count, "8-byte elements: {s:?}");
    }
    drop(maps);
    // Maps are freed from a workqueue after an RCU grace period: wait for it.
    ml.wait_for("the per-CPU maps freed", |r| r.count_through("bpf_map_alloc_percpu") < want / 2);
}

#[test]
fn percpu_with_a_pid_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_memleak")).args(["--percpu", "-p", "1"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--percpu"), "{err}");
}
