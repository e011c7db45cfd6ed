//! Shared by the integration tests: fixture programs compiled once per test run, processes
//! driven line by line with timeouts, and a parser for memleak's reports.
#![allow(dead_code)] // each test file uses a different part of this module

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long to wait for one expected line. Generous: the machine may be loaded.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for a process to exit once it should.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

pub fn memleak_bin() -> &'static str {
    env!("CARGO_BIN_EXE_memleak")
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds tests/fixtures/NAME.c (examples/NAME.c if there is no such fixture) with gcc -O0
/// -g -fno-omit-frame-pointer, once per test process; safe when several tests ask at once.
pub fn fixture(name: &str) -> PathBuf {
    build_fixture(name, name, &[])
}

/// A fixture built with -O2 (tail calls, no frame set-up where none is needed).
pub fn optimized_fixture(name: &str) -> PathBuf {
    build_fixture(name, &format!("{name}-O2"), &["-O2"])
}

/// A fixture linked statically: its allocator is in the executable itself.
pub fn static_fixture(name: &str) -> PathBuf {
    build_fixture(name, &format!("{name}-static"), &["-static"])
}

/// A fixture linked statically without the C library: no allocator in it at all.
pub fn fixture_without_libc(name: &str) -> PathBuf {
    build_fixture(name, name, &["-static", "-nostdlib", "-fno-stack-protector"])
}

/// Builds source `name` into target/tmp/fixtures/`out` with `extra` flags.
fn build_fixture(name: &str, out: &str, extra: &[&str]) -> PathBuf {
    let mut src = repo().join("tests/fixtures").join(format!("{name}.c"));
    if !src.exists() {
        src = repo().join("examples").join(format!("{name}.c"));
    }
    assert!(src.exists(), "no fixture source for {name}");
    build_source(&src, out, extra)
}

/// Builds tests/fixtures/`sub`/`name`.c with `extra` flags (its name suffixed with them).
pub fn fixture_in(sub: &str, name: &str, extra: &[&str]) -> PathBuf {
    let src = repo().join("tests/fixtures").join(sub).join(format!("{name}.c"));
    let flags: Vec<&str> = extra.iter().map(|f| f.trim_start_matches('-')).collect();
    let out = if flags.is_empty() { format!("{sub}-{name}") } else { format!("{sub}-{name}-{}", flags.join("-")) };
    build_source(&src, &out, extra)
}

/// Builds C source `src` into target/tmp/fixtures/`out` with `extra` flags, once per test
/// process; safe when several tests (or test binaries) ask at once.
fn build_source(src: &Path, out: &str, extra: &[&str]) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    // Held while compiling: a second thread asking for the same fixture waits for the first.
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.get(out) {
        return p.clone();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    std::fs::create_dir_all(&dir).expect("fixture directory");
    let key = out.to_string();
    let out = dir.join(out);
    // Another test binary may build the same fixture at the same time: write a private file
    // and rename it into place, which is atomic.
    let tmp = dir.join(format!(".{key}.{}", std::process::id()));
    let status = Command::new("gcc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-Wall", "-Werror"])
        .args(extra)
        .arg("-o")
        .arg(&tmp)
        .arg(src)
        .status()
        .expect("gcc runs");
    assert!(status.success(), "gcc failed on {}", src.display());
    // The same bytes as the file in place (gcc's output is reproducible): keep that one, which
    // a fixture of another test binary may be running from (replacing it would show that
    // process's executable as deleted).
    if std::fs::read(&out).ok() == Some(std::fs::read(&tmp).expect("read the new fixture")) {
        let _ = std::fs::remove_file(&tmp);
    } else {
        std::fs::rename(&tmp, &out).expect("rename the fixture into place");
    }
    built.insert(key, out.clone());
    out
}

/// A process whose stdout is read line by line (by a thread, so that waits can time out).
pub struct Proc {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Receiver<String>,
    /// Every stdout line read so far.
    pub seen: Vec<String>,
    /// Set once the process has been waited for.
    status: Option<ExitStatus>,
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout piped");
        let mut stderr = child.stderr.take().expect("stderr piped");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (etx, stderr_rx) = channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            let _ = etx.send(s);
        });
        let stdin = child.stdin.take();
        Proc { name: name.to_string(), child, stdin, lines, stderr: stderr_rx, seen: Vec::new(), status: None }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Reads lines until one satisfies `pred` and returns it; panics after `LINE_TIMEOUT`.
    pub fn expect(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.expect_within(what, LINE_TIMEOUT, pred)
    }

    pub fn expect_within(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{}: no line {what} within {timeout:?}; output so far:\n{}", self.name, self.seen.join("\n"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let err = self.stderr.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
                    panic!(
                        "{}: output ended before a line {what}; stdout:\n{}\nstderr:\n{err}",
                        self.name,
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// Waits for a line equal to `line`.
    pub fn expect_line(&mut self, line: &str) -> String {
        self.expect(&format!("{line:?}"), |l| l == line)
    }

    /// Writes a line to the process's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").and_then(|_| stdin.flush()).unwrap_or_else(|e| panic!("{}: write: {e}", self.name));
    }

    /// Sends a fixture command and waits for its "done" line; returns the lines in between.
    pub fn command(&mut self, cmd: &str) -> Vec<String> {
        let start = self.seen.len();
        self.send(cmd);
        self.expect_line(&format!("done {cmd}"));
        self.seen[start..self.seen.len() - 1].to_vec()
    }

    /// Closes stdin (a fixture reading commands then exits).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the process to exit and reads the rest of its output; kills it and panics
    /// after `EXIT_TIMEOUT`.
    pub fn finish(mut self) -> Finished {
        self.stdin = None;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{}: did not exit within {EXIT_TIMEOUT:?}; output:\n{}", self.name, self.seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.status = Some(status);
        // The pipe closes when every holder is gone (a -c command shares memleak's stdout).
        loop {
            match self.lines.recv_timeout(EXIT_TIMEOUT) {
                Ok(l) => self.seen.push(l),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("{}: stdout stayed open after exit", self.name),
            }
        }
        let stderr = self.stderr.recv_timeout(EXIT_TIMEOUT).unwrap_or_default();
        Finished { status, stdout: std::mem::take(&mut self.seen), stderr }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A memleak command line. The SUDO_* variables are removed (the test script may run under
/// sudo, and with them -c would run commands as that user); tests of that set their own.
///
/// MEMLEAK_TEST_CAPTURE=preload|uprobes runs every -c of the suite with that `--capture` (./test
/// runs the suite in both), except where a test chose how to attach itself (-O, -S, --attach,
/// --capture).
pub fn memleak_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(memleak_bin());
    cmd.args(capture_args(args)).args(args).env_remove("SUDO_UID").env_remove("SUDO_GID").env_remove("SUDO_USER");
    cmd
}

/// Whether a -c command line without --capture runs the in-process capture (the default,
/// unless MEMLEAK_TEST_CAPTURE says uprobes).
pub fn preload_capture() -> bool {
    std::env::var("MEMLEAK_TEST_CAPTURE").map_or(true, |m| m != "uprobes")
}

/// The `--capture` MEMLEAK_TEST_CAPTURE asks for, for a memleak command line `args`.
pub fn capture_args(args: &[&str]) -> Vec<String> {
    let Ok(mode) = std::env::var("MEMLEAK_TEST_CAPTURE") else { return vec![] };
    let chosen = |a: &&str| {
        ["-O", "-S", "--obj", "--symbols-prefix", "--attach", "--capture"].contains(a)
            || a.starts_with("--attach=")
            || a.starts_with("--capture=")
    };
    if mode.is_empty() || !args.contains(&"-c") || args.iter().any(chosen) {
        return vec![];
    }
    vec!["--capture".into(), mode]
}

/// stderr without memleak's `Tracing ... in OBJECT (pid N)` lines (what it probed).
pub fn without_tracing_lines(stderr: &str) -> String {
    stderr.lines().filter(|l| !l.starts_with("Tracing ")).map(|l| format!("{l}\n")).collect()
}

/// Starts memleak with `args`; its stdin is a pipe (a -c command inherits it).
pub fn memleak(args: &[&str]) -> Proc {
    Proc::spawn("memleak", memleak_command(args))
}

/// Starts memleak and waits until its probes are attached.
pub fn memleak_attached(args: &[&str]) -> Proc {
    let mut m = memleak(args);
    m.expect("Attaching to pid N", |l| l.starts_with("Attaching to pid") && l.ends_with(", Ctrl+C to quit."));
    m
}

/// Starts the command-driven allocs fixture and waits for its "ready" line.
pub fn allocs_fixture(args: &[&str]) -> Proc {
    start_allocs(&fixture("allocs"), args)
}

/// Starts a build of the allocs fixture and waits for its "ready" line.
pub fn start_allocs(exe: &Path, args: &[&str]) -> Proc {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    let mut p = Proc::spawn("allocs", cmd);
    let pid = p.pid();
    p.expect_line(&format!("ready {pid}"));
    p
}

/// Runs memleak to completion with `args` and no stdin.
pub fn memleak_output(args: &[&str]) -> Finished {
    memleak(args).finish()
}

/// "addr <hex> <size>" lines a fixture printed: (address, size).
pub fn fixture_addrs(lines: &[String]) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut w = l.strip_prefix("addr ")?.split(' ');
            Some((u64::from_str_radix(w.next()?, 16).ok()?, w.next()?.parse().ok()?))
        })
        .collect()
}

// ---- Reports

/// One stack of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    pub bytes: u64,
    pub count: u64,
    pub frames: Vec<String>,
    /// The `addr = HEX size = N` lines printed before it (-a).
    pub addrs: Vec<(u64, u64)>,
    /// In a classified report: "definitely lost", "indirectly lost", "possibly lost" or
    /// "still reachable".
    pub class: Option<String>,
    /// With several processes in a report: the process whose `pid N (name):` line it is under.
    pub pid: Option<i32>,
}

impl Stack {
    /// The function of frame `i` (see [`frame_function`]).
    pub fn func(&self, i: usize) -> &str {
        self.frames.get(i).map(|f| frame_function(f)).unwrap_or("")
    }

    /// The functions of every frame, innermost first, inlined ones included.
    pub fn names(&self) -> Vec<String> {
        self.frames.iter().map(|f| frame_function(f).to_string()).collect()
    }

    /// The module of frame `i`: the text in brackets.
    pub fn module(&self, i: usize) -> &str {
        self.frames.get(i).and_then(|f| f.split_once(" [")).and_then(|(_, r)| r.split_once("] (")).map_or("", |m| m.0)
    }
}

/// The function of a frame line: "do_malloc" of "do_malloc+0x18 [/path] (55..) f.c:3", and
/// "helper" of an inlined frame, "helper [/path] (55..) f.c:3 (inlined)".
pub fn frame_function(frame: &str) -> &str {
    let head = frame.split(" [").next().unwrap_or(frame);
    head.rfind("+0x").map_or(head, |i| &head[..i])
}

/// The offset of a symbolized frame: 0x18 of "do_malloc+0x18 [/path] (55..)".
pub fn frame_offset(frame: &str) -> Option<u64> {
    let off = frame.split_once("+0x")?.1.split(' ').next()?;
    u64::from_str_radix(off, 16).ok()
}

/// Checks every symbolized frame names a function that can contain it: no function of the
/// fixtures, libc or ld.so is anywhere near 64 KiB long, so a larger offset is a wrong symbol.
pub fn assert_plausible_symbols(r: &Report) {
    for f in r.stacks.iter().flat_map(|s| &s.frames) {
        if let Some(off) = frame_offset(f) {
            assert!(off < 0x10000, "implausible symbol offset in frame {f:?}");
        }
    }
}

/// One report: its header, warnings, and stacks as printed (largest last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub header: String,
    pub warnings: Vec<String>,
    /// `NOTE:` lines: what the report leaves out on purpose (blocks younger than -o).
    pub notes: Vec<String>,
    pub stacks: Vec<Stack>,
    /// Whether it came after a "Process N exited" line: the final report.
    pub after_exit: bool,
    /// The pid of that line: whose final report it is.
    pub exited: Option<i32>,
    /// A classified report's leak summary.
    pub leak_summary: Option<LeakSummary>,
    /// An unclassified report's `suppressed: N bytes in M allocations` line.
    pub suppressed: Option<(u64, u64)>,
}

/// The leak summary after a classified report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeakSummary {
    pub header: String,
    /// (class, bytes, allocations), in the order printed.
    pub classes: Vec<(String, u64, u64)>,
    /// (heuristic, bytes, allocations) of "of which reachable via heuristic".
    pub heuristics: Vec<(String, u64, u64)>,
    pub suppressed: Option<(u64, u64)>,
    /// The line saying what was scanned and how long the process was stopped.
    pub scanned: String,
}

impl LeakSummary {
    /// (bytes, allocations) of a class.
    pub fn class(&self, words: &str) -> (u64, u64) {
        self.classes
            .iter()
            .find(|c| c.0 == words)
            .map(|c| (c.1, c.2))
            .unwrap_or_else(|| panic!("no {words} in {self:?}"))
    }
}

/// "N bytes in M allocations" → (N, M).
fn bytes_in(s: &str) -> Option<(u64, u64)> {
    let (b, n) = s.trim().split_once(" bytes in ")?;
    Some((b.parse().ok()?, n.strip_suffix(" allocations")?.parse().ok()?))
}

pub fn is_summary_header(line: &str) -> bool {
    line.starts_with('[') && line.contains("] Leak summary for pid ") && line.ends_with(':')
}

impl Report {
    /// (innermost function of `module`, class, bytes, count) of every stack, summed by the
    /// first two: the form in which a test compares a classified report with valgrind's.
    pub fn classes_by_function(&self, module: &str) -> Vec<(String, String, u64, u64)> {
        let mut m: std::collections::BTreeMap<(String, String), (u64, u64)> = Default::default();
        for s in &self.stacks {
            let i = (0..s.frames.len()).find(|&i| s.module(i) == module);
            let f = i.map_or("?".to_string(), |i| s.func(i).to_string());
            let e = m.entry((f, s.class.clone().unwrap_or_default())).or_default();
            e.0 += s.bytes;
            e.1 += s.count;
        }
        m.into_iter().map(|((f, c), (b, n))| (f, c, b, n)).collect()
    }

    /// (first frame's function, bytes, count) of every stack, sorted: the whole report in a
    /// form a test can compare exactly.
    pub fn summary(&self) -> Vec<(String, u64, u64)> {
        let mut v: Vec<_> = self.stacks.iter().map(|s| (s.func(0).to_string(), s.bytes, s.count)).collect();
        v.sort();
        v
    }

    /// The stacks whose first frame is in `func`.
    pub fn stacks_in(&self, func: &str) -> Vec<&Stack> {
        self.stacks.iter().filter(|s| s.func(0) == func).collect()
    }

    pub fn total_bytes(&self) -> u64 {
        self.stacks.iter().map(|s| s.bytes).sum()
    }
}

pub fn is_header(line: &str) -> bool {
    line.starts_with('[') && line.contains("] Top ") && line.ends_with(" stacks with outstanding allocations:")
}

pub fn is_exit_line(line: &str) -> bool {
    line.starts_with('[') && line.contains("] Process ") && line.contains(" exited")
}

/// Splits output into reports. Lines that are neither a header nor tab-indented (a -c
/// command's own output, -t lines) are skipped; a report's lines are written at once.
/// The pid of an exit line: "[12:00:00] Process 123 exited with status 0."
pub fn exit_line_pid(line: &str) -> Option<i32> {
    line.split_once("] Process ")?.1.split(' ').next()?.parse().ok()
}

/// The pid of a report's process line, "pid 123 (name):", when there are several.
fn section_pid(line: &str) -> Option<i32> {
    let rest = line.strip_prefix("pid ")?;
    rest.ends_with("):").then(|| rest.split(' ').next()?.parse().ok()).flatten()
}

/// Every final report (one per process that exited), by the pid that exited.
pub fn final_reports(lines: &[String]) -> Vec<(i32, Report)> {
    parse_reports(lines)
        .into_iter()
        .filter(|r| r.after_exit)
        .map(|r| {
            assert_plausible_symbols(&r);
            (r.exited.expect("a final report follows its exit line"), r)
        })
        .collect()
}

pub fn parse_reports(lines: &[String]) -> Vec<Report> {
    let mut reports: Vec<Report> = Vec::new();
    let mut after_exit = false;
    let mut exited: Option<i32> = None;
    let mut section: Option<i32> = None;
    let mut pending_addrs: Vec<(u64, u64)> = Vec::new();
    for line in lines {
        if is_exit_line(line) {
            after_exit = true;
            exited = exit_line_pid(line);
            continue;
        }
        if is_header(line) {
            reports.push(Report {
                header: line.clone(),
                warnings: vec![],
                notes: vec![],
                stacks: vec![],
                after_exit,
                exited: exited.take(),
                leak_summary: None,
                suppressed: None,
            });
            pending_addrs.clear();
            section = None;
            continue;
        }
        let Some(r) = reports.last_mut() else { continue };
        if let Some(pid) = section_pid(line) {
            section = Some(pid);
            continue;
        }
        if is_summary_header(line) {
            r.leak_summary = Some(LeakSummary { header: line.clone(), ..Default::default() });
            continue;
        }
        if let Some(sum) = r.leak_summary.as_mut() {
            let Some(rest) = line.strip_prefix('\t') else { continue };
            let rest = rest.trim_start();
            if rest.starts_with("scanned ") {
                sum.scanned = rest.to_string();
            } else if rest == "of which reachable via heuristic:" {
            } else if let Some((what, n)) = rest.split_once(": ") {
                let n = bytes_in(n).unwrap_or_else(|| panic!("bad summary line {line:?}"));
                if what == "suppressed" {
                    sum.suppressed = Some(n);
                } else if ["definitely lost", "indirectly lost", "possibly lost", "still reachable"].contains(&what) {
                    sum.classes.push((what.to_string(), n.0, n.1));
                } else {
                    sum.heuristics.push((what.to_string(), n.0, n.1));
                }
            } else {
                panic!("unexpected summary line {line:?}");
            }
            continue;
        }
        if let Some(frame) = line.strip_prefix("\t\t") {
            let s = r.stacks.last_mut().unwrap_or_else(|| panic!("a frame before any stack: {line:?}"));
            s.frames.push(frame.to_string());
        } else if let Some(rest) = line.strip_prefix("\t") {
            if let Some(w) = rest.strip_prefix("WARNING: ") {
                r.warnings.push(w.to_string());
            } else if let Some(n) = rest.strip_prefix("NOTE: ") {
                r.notes.push(n.to_string());
            } else if let Some(a) = rest.strip_prefix("addr = ") {
                let (addr, size) = a.split_once(" size = ").unwrap_or_else(|| panic!("bad addr line {line:?}"));
                pending_addrs.push((
                    u64::from_str_radix(addr, 16).unwrap_or_else(|_| panic!("bad address in {line:?}")),
                    size.parse().unwrap_or_else(|_| panic!("bad size in {line:?}")),
                ));
            } else if let Some((s, class)) = stack_line(rest) {
                let (bytes, count) = s.split_once(" bytes in ").unwrap_or_else(|| panic!("bad stack line {line:?}"));
                r.stacks.push(Stack {
                    bytes: bytes.parse().unwrap_or_else(|_| panic!("bad bytes in {line:?}")),
                    count: count.parse().unwrap_or_else(|_| panic!("bad count in {line:?}")),
                    frames: vec![],
                    addrs: std::mem::take(&mut pending_addrs),
                    class,
                    pid: section,
                });
            } else if let Some(n) = rest.strip_prefix("suppressed: ") {
                r.suppressed = Some(bytes_in(n).unwrap_or_else(|| panic!("bad line {line:?}")));
            } else {
                panic!("unexpected report line {line:?}");
            }
        }
    }
    reports
}

/// "N bytes in M allocations from stack", with " (CLASS)" in a classified report.
fn stack_line(rest: &str) -> Option<(&str, Option<String>)> {
    if let Some(s) = rest.strip_suffix(" allocations from stack") {
        return Some((s, None));
    }
    let (s, class) = rest.strip_suffix(')')?.split_once(" allocations from stack (")?;
    Some((s, Some(class.to_string())))
}

/// The report printed after "Process N exited": exactly one, and it must be the last.
pub fn final_report(lines: &[String]) -> Report {
    let reports = parse_reports(lines);
    let finals: Vec<&Report> = reports.iter().filter(|r| r.after_exit).collect();
    assert_eq!(finals.len(), 1, "expected one final report in:\n{}", lines.join("\n"));
    assert_plausible_symbols(finals[0]);
    finals[0].clone()
}

/// Checks that a stack of the fixture `module` is symbolized: its first frame is a function
/// of `module` with an offset, and `main` is among its frames.
pub fn assert_symbolized(stack: &Stack, module: &Path) {
    let m = module.to_string_lossy();
    assert!(!stack.frames.is_empty(), "no frames: {stack:?}");
    assert_eq!(stack.module(0), m, "first frame not in {m}: {stack:?}");
    let f = &stack.frames[0];
    assert!(f.contains("+0x"), "first frame without a symbol: {f}");
    assert!(stack.frames.iter().any(|f| f.starts_with("main+0x")), "no main frame: {stack:?}");
}

/// An expected report in the form of [`Report::summary`]: (first function, bytes, count).
pub fn expected(v: &[(&str, u64, u64)]) -> Vec<(String, u64, u64)> {
    let mut v: Vec<_> = v.iter().map(|(f, b, c)| (f.to_string(), *b, *c)).collect();
    v.sort();
    v
}

/// Runs the allocs fixture under `memleak ARGS -c allocs`, sends `cmds` one by one (each waits
/// for its "done"), then "exit 0"; returns everything once memleak has exited.
pub fn run_under_c(args: &[&str], cmds: &[&str]) -> Finished {
    run_exe_under_c(&fixture("allocs"), args, cmds)
}

/// run_under_c for a given build of the allocs fixture.
pub fn run_exe_under_c(exe: &Path, args: &[&str], cmds: &[&str]) -> Finished {
    let cmd = exe.to_str().expect("utf-8 path").to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-c", &cmd]);
    let mut m = memleak_attached(&all);
    m.expect("the fixture's ready line", |l| l.starts_with("ready "));
    for c in cmds {
        m.command(c);
    }
    m.send("exit 0");
    let out = m.finish();
    assert_eq!(out.code(), Some(0), "memleak's exit status; stderr: {}", out.stderr);
    out
}
