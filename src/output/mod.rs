//! Outputs: every report (a [`Snapshot`]) goes to each output the command line asks for, in
//! its format: text or JSON Lines on stdout, and any of pprof, folded stacks and an SVG flame
//! graph to files, each file replaced by the latest report after every report. A format is a
//! [`Format`] in a module of its own.
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cli::{Config, StdoutFormat};
use crate::snapshot::Snapshot;

pub mod flamegraph;
pub mod folded;
pub mod json;
pub mod pprof;
pub mod stdout;
pub mod text;

pub use stdout::{write_bytes, write_out};

/// One output format.
pub trait Format {
    /// Its name in messages (-v timings, write errors).
    fn name(&self) -> &'static str;
    /// Whether it reads every stack of a process; if no output does (the text report alone),
    /// snapshots keep only the `-T` first of each process, and the rest is never symbolized.
    fn needs_all_stacks(&self) -> bool {
        true
    }
    /// One report, as the bytes to write.
    fn render(&mut self, snap: &Snapshot) -> Result<Vec<u8>>;
}

enum Dest {
    Stdout,
    /// Replaced after each report; the flag it was given by, for messages.
    File(PathBuf, &'static str),
}

struct Output {
    format: Box<dyn Format>,
    dest: Dest,
}

/// What one output took for one report.
pub struct Cost {
    pub name: &'static str,
    pub bytes: usize,
    pub time: Duration,
}

pub struct Outputs {
    outputs: Vec<Output>,
    json: bool,
    top: usize,
}

impl Outputs {
    /// The outputs `cfg` asks for. Each file is checked now, by creating (and removing) a file
    /// beside it the way every report will: a file that cannot be written fails at start-up.
    pub fn open(cfg: &Config) -> Result<Outputs> {
        let stdout: Box<dyn Format> = match cfg.format {
            StdoutFormat::Text => Box::new(text::Text::new(cfg)),
            StdoutFormat::Json => Box::new(json::Json { max_allocs: cfg.max_allocs }),
        };
        let mut outputs = vec![Output { format: stdout, dest: Dest::Stdout }];
        type NewFormat = fn() -> Box<dyn Format>;
        let files: [(&Option<PathBuf>, &'static str, NewFormat); 3] = [
            (&cfg.pprof, "--pprof", || Box::new(pprof::Pprof::default())),
            (&cfg.folded, "--folded", || Box::new(folded::Folded)),
            (&cfg.flamegraph, "--flamegraph", || Box::new(flamegraph::FlameGraph)),
        ];
        for (path, flag, format) in files {
            if let Some(path) = path {
                check_writable(path).with_context(|| format!("cannot write {flag} {}", path.display()))?;
                outputs.push(Output { format: format(), dest: Dest::File(path.clone(), flag) });
            }
        }
        Ok(Outputs { outputs, json: cfg.format == StdoutFormat::Json, top: cfg.top })
    }

    /// How many stacks of each process the snapshots must keep: None for all.
    pub fn keep(&self) -> Option<usize> {
        (!self.outputs.iter().any(|o| o.format.needs_all_stacks())).then_some(self.top)
    }

    /// Writes one report to every output; what each took. Stdout failing ends the run (as
    /// before: a reader gone); a file that cannot be replaced says so and the run goes on.
    pub fn write(&mut self, snap: &Snapshot) -> Result<Vec<Cost>> {
        let mut costs = Vec::with_capacity(self.outputs.len());
        for o in &mut self.outputs {
            let started = Instant::now();
            let bytes = o.format.render(snap)?;
            match &o.dest {
                Dest::Stdout => write_bytes(&bytes)?,
                Dest::File(path, flag) => {
                    if let Err(e) = replace_file(path, &bytes) {
                        errln!("memleak: cannot write {flag} {}: {e:#}", path.display());
                    }
                }
            }
            costs.push(Cost { name: o.format.name(), bytes: bytes.len(), time: started.elapsed() });
        }
        Ok(costs)
    }

    /// A line about the run (attached, a process exited): on stdout with the text report, on
    /// stderr with JSON, which keeps stdout to JSON documents.
    pub fn status(&self, line: &str) -> Result<()> {
        status(self.json, line)
    }
}

/// [`Outputs::status`] before the outputs exist.
pub fn status(json: bool, line: &str) -> Result<()> {
    if json {
        errln!("memleak: {line}");
        Ok(())
    } else {
        write_out(&format!("{line}\n"))
    }
}

/// A file beside `path` to write before renaming it over `path`: in the same directory (a
/// rename does not cross file systems), named after memleak's pid and a counter, created new
/// (never through a link someone left there).
fn create_beside(path: &Path) -> Result<(PathBuf, std::fs::File)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().context("no file name")?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut last = None;
    for _ in 0..8 {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.{}.tmp", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e).with_context(|| format!("creating {}", tmp.display())),
        }
    }
    Err(last.expect("tried")).context("creating a file beside it")
}

/// Writes `bytes` to a new file beside `path`, then renames it over `path`: a reader sees the
/// previous report or this one, never a part.
pub fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let (tmp, mut f) = create_beside(path)?;
    let written = f.write_all(bytes).and_then(|_| f.flush());
    drop(f);
    if let Err(e) = written.with_context(|| format!("writing {}", tmp.display())) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(())
}

/// Fails unless a report can be written to `path` (see [`replace_file`]).
fn check_writable(path: &Path) -> Result<()> {
    if path.is_dir() {
        anyhow::bail!("it is a directory");
    }
    let (tmp, f) = create_beside(path)?;
    drop(f);
    std::fs::remove_file(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    Ok(())
}

/// Local wall-clock time as HH:MM:SS.
pub fn hms(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r writes only into the local passed.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&secs, &mut tm);
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    }
}

/// Local wall-clock time now as HH:MM:SS.
pub fn now_hms() -> String {
    hms(std::time::SystemTime::now())
}

/// A frame's name in folded stacks and flame graphs: the function as the text report names it,
/// or `[unknown] [module]`; no `;` (the separator) nor line breaks.
pub fn frame_name(function: Option<&str>, module: Option<&str>) -> String {
    let name = match function {
        Some(f) => f.to_string(),
        None => format!("[unknown] [{}]", module.unwrap_or("unknown")),
    };
    name.replace(';', ":").replace(['\n', '\r'], " ")
}

/// The frames of a stack root first, named by [`frame_name`], with the process (when the
/// snapshot has several) and the class (when there is one) as outer frames: what folded
/// stacks and flame graphs draw.
pub fn folded_frames(
    snap: &Snapshot,
    p: &crate::snapshot::ProcessSnapshot,
    s: &crate::snapshot::StackEntry,
) -> Vec<String> {
    let mut out = Vec::new();
    if snap.processes.len() > 1 {
        out.push(format!("{} (pid {})", p.comm.replace(';', ":"), p.pid));
    }
    if let Some(c) = &s.class {
        out.push(format!("[{}]", c.replace(';', ":")));
    }
    let mut frames: Vec<String> =
        crate::snapshot::frame_lines(&s.frames).map(|l| frame_name(l.function, l.module)).collect();
    if frames.is_empty() {
        frames.push(if s.stack_id == 0 { "[stack not stored]".into() } else { "[no frames]".into() });
    }
    frames.reverse();
    out.extend(frames);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_replaced_whole_and_checked_before_use() {
        let dir = std::env::temp_dir().join(format!("memleak-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("r.txt");
        check_writable(&f).unwrap();
        assert!(!f.exists(), "the check leaves nothing behind");
        replace_file(&f, b"one").unwrap();
        replace_file(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        // A link where the file goes is replaced, its target untouched.
        let target = dir.join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        replace_file(&link, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert!(check_writable(&dir).is_err(), "a directory");
        assert!(check_writable(&dir.join("no/such/dir/f")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
