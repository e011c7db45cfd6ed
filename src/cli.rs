//! Command line: memleak(8)'s flags, parsed by clap and checked into a [`Config`].
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};

const EXAMPLES: &str = "\
EXAMPLES:

memleak -p $(pidof allocs)
        Trace allocations and display a summary of \"leaked\" (outstanding)
        allocations every 5 seconds
memleak -p $(pidof allocs) -t
        Trace allocations and display each individual allocator function call
memleak -ap $(pidof allocs) 10
        Trace allocations and display allocated addresses, sizes, and stacks
        every 10 seconds for outstanding allocations
memleak -c \"./allocs --size 16\"
        Run the specified command and trace its allocations from its first
        instruction; print a final report when it exits, and exit with its status
memleak -p $(pidof allocs) -O /usr/lib/libjemalloc.so.2 -S je_
        Trace a process that allocates through jemalloc's prefixed functions
memleak -p $(pidof allocs) -o 60000
        Display only allocations that are at least one minute (60 seconds) old
memleak -p $(pidof allocs) -s 5
        Trace roughly every 5th allocation, to reduce overhead
memleak -p $(pidof allocs) --sort count 1 10
        Print a report every second, ten times, stacks ordered by allocation count
memleak -p $(pidof allocs) --sort growth --growth 60
        Every minute, the stacks that grew most, each saying by how much
memleak -c ./server --pprof heap.pb.gz --flamegraph leaks.svg
        Also keep the latest report as a pprof profile and an SVG flame graph
memleak -p $(pidof allocs) --format json > reports.jsonl
        One JSON document per report, one per line
memleak --error-exitcode 1 -c ./tests
        Run ./tests; its final report says which blocks are definitely, indirectly,
        possibly lost or still reachable (as valgrind does); exit 1 on a leak,
        else with the command's status
memleak --scan -p $(pidof allocs) 60
        Every minute, stop the process a moment and classify its blocks likewise
memleak
        Trace the kernel's allocators (kmalloc, kmem_cache, pages) and display a
        summary of outstanding allocations every 5 seconds
memleak -o 60000
        Kernel mode: only allocations at least one minute old
memleak --percpu 10
        Trace the kernel's percpu allocator, a report every 10 seconds";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "memleak",
    version,
    about = "Trace outstanding memory allocations (leaks) of a process, with eBPF",
    after_help = EXAMPLES,
)]
pub struct Args {
    /// The PID to trace (several: -p 12,15 or -p 12 -p 15); if neither -p, -c nor --cgroup is
    /// given, trace the kernel's allocators
    #[arg(short, long, value_name = "PID", value_delimiter = ',', conflicts_with_all = ["command", "cgroup"])]
    pub pid: Vec<i32>,

    /// Trace every process of this cgroup v2 (a path under /sys/fs/cgroup, or relative to it:
    /// a container, a systemd unit), including those started later
    #[arg(long, value_name = "PATH", conflicts_with = "command")]
    pub cgroup: Option<PathBuf>,

    /// -p: trace the processes they start too (-c and --cgroup always do, unless --no-follow)
    #[arg(long, conflicts_with = "no_follow")]
    pub follow: bool,

    /// -c: trace the command only, not the processes it starts (memleak(8)'s way)
    #[arg(long)]
    pub no_follow: bool,

    /// Print a line for each alloc and free call as it happens
    #[arg(short, long)]
    pub trace: bool,

    /// Show the address and size of every outstanding allocation as well as call stacks
    #[arg(short = 'a', long)]
    pub show_allocs: bool,

    /// Hide allocations younger than this age, in milliseconds [default: 500]
    #[arg(short, long, value_name = "MS")]
    pub older: Option<u64>,

    /// Run this command (split as a shell splits words) and trace it from its first instruction
    #[arg(short, long, value_name = "COMMAND")]
    pub command: Option<String>,

    /// Keep only per-stack totals, in BPF (faster reports; -o and -a do not go with it)
    #[arg(long)]
    pub combined_only: bool,

    /// An allocation at an address already tracked first frees the old record (a missed free)
    #[arg(long)]
    pub wa_missing_free: bool,

    /// Record about every Nth allocation, decided in BPF, to decrease the overhead
    #[arg(short, long, value_name = "N", default_value_t = 1)]
    pub sample_rate: u32,

    /// Sample on average one allocation per N bytes allocated (a Poisson process over the
    /// bytes, as tcmalloc and Go profile): bytes and counts reported are estimates
    #[arg(long, value_name = "N")]
    pub sample_bytes: Option<u64>,

    /// Display only this many top allocating stacks
    #[arg(short = 'T', long, value_name = "N", default_value_t = 10)]
    pub top: usize,

    /// Capture only allocations of at least this many bytes
    #[arg(short = 'z', long, value_name = "BYTES")]
    pub min_size: Option<u64>,

    /// Capture only allocations of at most this many bytes
    #[arg(short = 'Z', long, value_name = "BYTES")]
    pub max_size: Option<u64>,

    /// Attach to the allocator functions in this object (a library, or the executable itself)
    #[arg(short = 'O', long, value_name = "OBJ")]
    pub obj: Option<PathBuf>,

    /// Order the stacks of a report by total size, by allocation count, or by growth since the
    /// last report
    #[arg(long, value_enum, value_name = "KEY", default_value = "size")]
    pub sort: SortKey,

    /// Each stack of the text report says how many bytes it gained or lost since the last
    /// report, and `growing` when it grew in each of the last three
    #[arg(long)]
    pub growth: bool,

    /// What stdout carries: the text report, or one JSON document per report (JSON Lines)
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "text")]
    pub format: StdoutFormat,

    /// After each report, write it to FILE as a gzip'd pprof profile (replaced each time)
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,

    /// After each report, write it to FILE as folded stacks, `root;...;leaf BYTES` (replaced
    /// each time)
    #[arg(long, value_name = "FILE")]
    pub folded: Option<PathBuf>,

    /// After each report, write it to FILE as an SVG flame graph of the outstanding bytes
    /// (replaced each time)
    #[arg(long, value_name = "FILE")]
    pub flamegraph: Option<PathBuf>,

    /// Kernel mode: trace the percpu allocator instead of kmalloc, kmem_cache and pages
    #[arg(long)]
    pub percpu: bool,

    /// Prefix of the allocator's symbols, e.g. je_ for jemalloc's je_malloc
    #[arg(short = 'S', long, value_name = "PREFIX", default_value = "")]
    pub symbols_prefix: String,

    /// Print a report every this many seconds (same as the positional interval)
    #[arg(short = 'i', long = "interval", value_name = "SECONDS")]
    pub interval_flag: Option<u64>,

    /// Walk frame pointers for stacks (memleak(8)'s way), not the .eh_frame unwind tables
    #[arg(long)]
    pub frame_pointers: bool,

    /// Most allocations tracked at once, up to 134217728; more are counted as untracked (kernel
    /// memory: 96 bytes per outstanding allocation, plus 16 bytes per slot of this size rounded
    /// to a power of two)
    #[arg(long, value_name = "N", default_value_t = 1 << 20)]
    pub max_allocs: u32,

    /// How to attach: one uprobe_multi session link (Linux 6.13+), an entry and a return
    /// uprobe_multi link (6.6+), or classic uprobes and uretprobes; auto picks the first the
    /// kernel has
    #[arg(long, value_enum, value_name = "MODE", default_value = "auto")]
    pub attach: AttachChoice,

    /// -c: how the malloc family is traced: a library preloaded into the command and the
    /// processes it starts, which records in-process (no trap per call); uprobes; or auto: the
    /// library where an image can take it (not static nor set-user-ID, and without -O, -S or
    /// --attach)
    #[arg(long, value_enum, value_name = "MODE", default_value = "auto")]
    pub capture: CaptureChoice,

    /// Say what was attached where (entry points and their file offsets), on stderr
    #[arg(short, long)]
    pub verbose: bool,

    #[command(flatten)]
    pub scan: crate::scan::options::ScanArgs,

    /// Print a report every this many seconds [default: 5]
    #[arg(value_name = "interval")]
    pub interval: Option<u64>,

    /// Number of reports to print before exiting [default: until the target exits or Ctrl-C]
    #[arg(value_name = "count")]
    pub count: Option<u64>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Size,
    Count,
    Growth,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdoutFormat {
    Text,
    Json,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachChoice {
    Auto,
    Session,
    Multi,
    Classic,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureChoice {
    Auto,
    Preload,
    Uprobes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// -p: running processes.
    Pids(Vec<i32>),
    /// argv of the command to run
    Command(Vec<String>),
    /// --cgroup: its directory, as given.
    Cgroup(PathBuf),
    Kernel,
}

/// Everything the run needs, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub target: Target,
    /// The processes the traced ones start are traced too.
    pub follow: bool,
    pub trace: bool,
    pub show_allocs: bool,
    pub min_age: Duration,
    pub combined_only: bool,
    pub wa_missing_free: bool,
    pub sample_rate: u32,
    /// --sample-bytes (0: off).
    pub sample_bytes: u64,
    pub top: usize,
    pub min_size: u64,
    pub max_size: u64,
    pub obj: Option<PathBuf>,
    pub sort: SortKey,
    pub percpu: bool,
    pub symbols_prefix: String,
    pub interval: Duration,
    pub count: Option<u64>,
    pub max_allocs: u32,
    pub attach: AttachChoice,
    /// -c: in-process capture where an image can take it (src/preload/); false: uprobes.
    pub preload: bool,
    pub verbose: bool,
    pub frame_pointers: bool,
    pub growth: bool,
    pub format: StdoutFormat,
    pub pprof: Option<PathBuf>,
    pub folded: Option<PathBuf>,
    pub flamegraph: Option<PathBuf>,
    /// Reachability: when reports are classified, --error-exitcode, suppressions (src/scan/).
    pub scan: crate::scan::options::ScanConfig,
}

impl Args {
    pub fn into_config(self) -> Result<Config> {
        if let Some(pid) = self.pid.iter().find(|&&p| p <= 0) {
            bail!("invalid pid {pid}: a pid is a positive number");
        }
        let target = match (&self.pid[..], &self.command, &self.cgroup) {
            ([_, ..], _, _) => {
                let mut pids = self.pid.clone();
                pids.sort_unstable();
                pids.dedup();
                Target::Pids(pids)
            }
            ([], Some(cmd), _) => {
                let argv =
                    shlex::split(cmd).ok_or_else(|| anyhow::anyhow!("cannot split -c {cmd:?}: unbalanced quotes"))?;
                if argv.is_empty() {
                    bail!("-c needs a command to run");
                }
                Target::Command(argv)
            }
            ([], None, Some(dir)) => Target::Cgroup(dir.clone()),
            ([], None, None) => Target::Kernel,
        };
        if self.follow && !matches!(target, Target::Pids(_)) {
            bail!("--follow is for -p: -c and --cgroup follow the processes they start already");
        }
        if self.no_follow && matches!(target, Target::Kernel | Target::Pids(_)) {
            bail!("--no-follow is for -c and --cgroup (-p follows nothing unless --follow)");
        }
        let follow = match target {
            Target::Pids(_) => self.follow,
            Target::Command(_) | Target::Cgroup(_) => !self.no_follow,
            Target::Kernel => false,
        };
        if self.percpu && target != Target::Kernel {
            bail!("--percpu traces the kernel's percpu allocator: it does not go with -p, -c or --cgroup");
        }
        if target == Target::Kernel && (self.obj.is_some() || !self.symbols_prefix.is_empty()) {
            bail!("-O and -S choose a process's allocator: they need -p, -c or --cgroup");
        }
        if target == Target::Kernel && self.attach != AttachChoice::Auto {
            bail!("--attach chooses how uprobes attach: it needs -p, -c or --cgroup (kernel mode uses tracepoints)");
        }
        if self.capture == CaptureChoice::Preload && !matches!(target, Target::Command(_)) {
            bail!("--capture preload runs a library inside the command: it needs -c (-p and --cgroup use uprobes)");
        }
        if self.capture == CaptureChoice::Preload && (self.obj.is_some() || !self.symbols_prefix.is_empty()) {
            bail!("--capture preload interposes the standard allocator functions: -O and -S need --capture uprobes");
        }
        // auto: the library for -c, unless the user chose what to probe or how to attach.
        let preload = matches!(target, Target::Command(_))
            && match self.capture {
                CaptureChoice::Preload => true,
                CaptureChoice::Uprobes => false,
                CaptureChoice::Auto => {
                    self.obj.is_none() && self.symbols_prefix.is_empty() && self.attach == AttachChoice::Auto
                }
            };
        if self.combined_only && (self.show_allocs || self.older.is_some()) {
            bail!("--combined-only keeps per-stack totals only: -a and -o need per-allocation records");
        }
        let min_size = self.min_size.unwrap_or(0);
        let max_size = self.max_size.unwrap_or(u64::MAX);
        if min_size > max_size {
            bail!("min size (-z {min_size}) can't be greater than max size (-Z {max_size})");
        }
        if self.sample_rate == 0 {
            bail!("sample rate (-s) must be at least 1");
        }
        if let Some(n) = self.sample_bytes {
            if n == 0 || n > 1 << 32 {
                bail!("--sample-bytes {n}: give 1 to 4294967296 bytes");
            }
            if self.sample_rate > 1 || self.combined_only {
                bail!("--sample-bytes goes with neither -s nor --combined-only");
            }
        }
        if self.top == 0 {
            bail!("-T/--top must be at least 1");
        }
        let interval = match (self.interval_flag, self.interval) {
            (Some(_), Some(_)) => bail!("give the interval either with -i or as a positional, not both"),
            (Some(i), None) | (None, Some(i)) => i,
            (None, None) => 5,
        };
        if interval == 0 {
            bail!("interval must be at least 1 second");
        }
        if self.max_allocs == 0 {
            bail!("--max-allocs must be at least 1");
        }
        if self.max_allocs > crate::loader::MAX_ALLOCS_LIMIT {
            bail!(
                "--max-allocs {}: the allocation table holds at most {} records",
                self.max_allocs,
                crate::loader::MAX_ALLOCS_LIMIT
            );
        }
        if self.count == Some(0) {
            bail!("count must be at least 1");
        }
        if self.trace && self.format == StdoutFormat::Json {
            bail!("-t prints a text line per call on stdout: it does not go with --format json");
        }
        if self.growth && self.format == StdoutFormat::Json {
            bail!("--growth adds to the text report: JSON always carries each stack's growth");
        }
        let scan = self.scan.into_config(&crate::scan::options::Context {
            kernel: target == Target::Kernel,
            // -p without --follow: neither started nor followed by memleak.
            pid: matches!(target, Target::Pids(_)) && !follow,
            combined_only: self.combined_only,
        })?;
        let files = [&self.pprof, &self.folded, &self.flamegraph];
        for (i, f) in files.iter().enumerate() {
            if let Some(f) = f
                && files[i + 1..].iter().any(|g| g.as_ref() == Some(f))
            {
                bail!("{} is given for two outputs: each needs a file of its own", f.display());
            }
        }
        Ok(Config {
            target,
            follow,
            trace: self.trace,
            show_allocs: self.show_allocs,
            min_age: Duration::from_millis(self.older.unwrap_or(500)),
            combined_only: self.combined_only,
            wa_missing_free: self.wa_missing_free,
            sample_rate: self.sample_rate,
            sample_bytes: self.sample_bytes.unwrap_or(0),
            top: self.top,
            min_size,
            max_size,
            obj: self.obj,
            sort: self.sort,
            percpu: self.percpu,
            symbols_prefix: self.symbols_prefix,
            interval: Duration::from_secs(interval),
            count: self.count,
            max_allocs: self.max_allocs,
            attach: self.attach,
            preload,
            verbose: self.verbose,
            frame_pointers: self.frame_pointers,
            growth: self.growth,
            format: self.format,
            pprof: self.pprof,
            folded: self.folded,
            flamegraph: self.flamegraph,
            scan,
        })
    }
}

/// Parses the command line; `Err` carries the one-line message for a bad one.
pub fn parse<I, T>(args: I) -> std::result::Result<Config, ParseOutcome>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match Args::try_parse_from(args) {
        Ok(a) => a.into_config().map_err(|e| ParseOutcome::Error(format!("{e:#}"))),
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                Err(ParseOutcome::Print(e.to_string()))
            }
            _ => {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("invalid arguments");
                let first = first.strip_prefix("error: ").unwrap_or(first);
                Err(ParseOutcome::Error(format!("{first} (try --help)")))
            }
        },
    }
}

#[derive(Debug)]
pub enum ParseOutcome {
    /// --help or --version: print this, exit 0
    Print(String),
    /// a one-line message: print it, exit 2
    Error(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(args: &[&str]) -> Config {
        parse(std::iter::once("memleak").chain(args.iter().copied())).expect("valid arguments")
    }

    fn err(args: &[&str]) -> String {
        match parse(std::iter::once("memleak").chain(args.iter().copied())) {
            Err(ParseOutcome::Error(m)) => m,
            other => panic!("expected an error for {args:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_memleak8() {
        let c = ok(&["-p", "42"]);
        assert_eq!(c.target, Target::Pids(vec![42]));
        assert_eq!(c.interval, Duration::from_secs(5));
        assert_eq!(c.count, None);
        assert_eq!(c.top, 10);
        assert_eq!(c.min_age, Duration::from_millis(500));
        assert_eq!(c.sample_rate, 1);
        assert_eq!(c.sort, SortKey::Size);
        assert_eq!((c.min_size, c.max_size), (0, u64::MAX));
    }

    #[test]
    fn positional_interval_and_count() {
        let c = ok(&["-ap", "7", "10", "3"]);
        assert!(c.show_allocs);
        assert_eq!(c.target, Target::Pids(vec![7]));
        assert_eq!(c.interval, Duration::from_secs(10));
        assert_eq!(c.count, Some(3));
        assert_eq!(ok(&["-p", "7", "-i", "2"]).interval, Duration::from_secs(2));
    }

    #[test]
    fn command_is_split_like_a_shell() {
        let c = ok(&["-c", "./prog 'two words' \"x y\" z"]);
        assert_eq!(c.target, Target::Command(vec!["./prog".into(), "two words".into(), "x y".into(), "z".into()]));
    }

    #[test]
    fn every_flag_parses() {
        let c = ok(&[
            "-p",
            "1",
            "-t",
            "-a",
            "-o",
            "60000",
            "-s",
            "5",
            "-T",
            "3",
            "-z",
            "16",
            "-Z",
            "4096",
            "-O",
            "/lib/libjemalloc.so",
            "--sort",
            "count",
            "--symbols-prefix",
            "je_",
            "2",
            "4",
        ]);
        assert!(c.trace && c.show_allocs && !c.combined_only);
        assert!(ok(&["-p", "1", "--combined-only", "-t"]).combined_only);
        assert_eq!(c.min_age, Duration::from_secs(60));
        assert_eq!((c.sample_rate, c.top, c.min_size, c.max_size), (5, 3, 16, 4096));
        assert_eq!(c.obj, Some(PathBuf::from("/lib/libjemalloc.so")));
        assert_eq!(c.sort, SortKey::Count);
        assert_eq!(c.symbols_prefix, "je_");
        assert_eq!((c.interval, c.count), (Duration::from_secs(2), Some(4)));
        assert_eq!(ok(&["-S", "tc_", "-p", "1"]).symbols_prefix, "tc_");
        // One bound alone leaves the other open; equal bounds are allowed.
        let c = ok(&["-p", "1", "-z", "64"]);
        assert_eq!((c.min_size, c.max_size), (64, u64::MAX));
        let c = ok(&["-p", "1", "-Z", "64", "-z", "64"]);
        assert_eq!((c.min_size, c.max_size), (64, 64));
        assert_eq!(ok(&[]).target, Target::Kernel);
        assert!(ok(&["--percpu"]).percpu);
        assert!(ok(&["-p", "1", "--frame-pointers"]).frame_pointers);
        let c = ok(&[
            "-p",
            "1",
            "--sort",
            "growth",
            "--growth",
            "--pprof",
            "a.pb.gz",
            "--folded",
            "b",
            "--flamegraph",
            "c",
        ]);
        assert_eq!((c.sort, c.growth, c.format), (SortKey::Growth, true, StdoutFormat::Text));
        assert_eq!((c.pprof, c.folded, c.flamegraph), (Some("a.pb.gz".into()), Some("b".into()), Some("c".into())));
        assert_eq!(ok(&["--format", "json"]).format, StdoutFormat::Json);
        assert!(!ok(&["-p", "1"]).frame_pointers);
    }

    #[test]
    fn bad_input_is_one_line() {
        for (args, needle) in [
            (&["-p", "1", "-c", "ls"][..], "cannot be used with"),
            (&["-p", "1", "-z", "100", "-Z", "10"][..], "can't be greater"),
            (&["-p", "1", "-s", "0"][..], "sample rate"),
            (&["-p", "1", "0"][..], "interval"),
            (&["-p", "1", "-i", "0"][..], "interval"),
            (&["-p", "1", "--sort", "age"][..], "invalid value 'age'"),
            (&["-p", "1", "--bogus"][..], "unexpected argument '--bogus'"),
            (&["-p", "x"][..], "invalid value 'x'"),
            (&["-p", "-3"][..], "unexpected argument"),
            (&["-p", "0"][..], "invalid pid"),
            (&["-c", ""][..], "needs a command"),
            (&["-c", "'unterminated"][..], "unbalanced quotes"),
            (&["-p", "1", "--percpu"][..], "--percpu"),
            (&["--attach", "classic"][..], "--attach"),
            (&["-p", "1", "--combined-only", "-a"][..], "--combined-only"),
            (&["-p", "1", "--combined-only", "-o", "100"][..], "--combined-only"),
            (&["-O", "/lib/libjemalloc.so"][..], "need -p, -c or --cgroup"),
            (&["-S", "je_"][..], "need -p, -c or --cgroup"),
            (&["-p", "1", "1", "0"][..], "count"),
            (&["-p", "1", "-i", "2", "3"][..], "either with -i or as a positional"),
            (&["-p", "1", "-T", "0"][..], "-T/--top must be at least 1"),
            (&["-p", "1", "-z", "-5"][..], "unexpected argument '-5'"),
            (&["-p", "1", "-s", "x"][..], "invalid value 'x'"),
            (&["-p", "1", "--max-allocs", "0"][..], "--max-allocs"),
            (&["-p", "1", "-t", "--format", "json"][..], "does not go with --format json"),
            (&["-p", "1", "--growth", "--format", "json"][..], "JSON always carries"),
            (&["-p", "1", "--format", "xml"][..], "invalid value 'xml'"),
            (&["-p", "1", "--pprof", "x", "--folded", "x"][..], "x is given for two outputs"),
            (
                &["-p", "1", "--max-allocs", "134217729"][..],
                "--max-allocs 134217729: the allocation table holds at most 134217728 records",
            ),
            (&["-p", "1", "--max-allocs", "4294967296"][..], "invalid value '4294967296'"),
            (&["-p", "1", "18446744073709551616"][..], "invalid value '18446744073709551616'"),
            (&["-p", "1", "-o", "18446744073709551616"][..], "invalid value"),
            (&["-p", "2147483648"][..], "invalid value '2147483648'"),
        ] {
            let m = err(args);
            assert!(m.contains(needle), "{args:?}: {m:?} lacks {needle:?}");
            assert!(!m.contains('\n'), "{args:?}: not one line: {m:?}");
        }
    }

    /// The largest numbers each option takes are accepted and kept as given (the run saturates
    /// what it computes from them: an interval past the end of time never comes round).
    #[test]
    fn huge_numbers_are_taken_as_given() {
        let max = u64::MAX.to_string();
        let c = ok(&["-p", "1", "-o", &max, "-z", &max, "-Z", &max, "-s", "4294967295", &max, &max]);
        assert_eq!(c.min_age, Duration::from_millis(u64::MAX));
        assert_eq!((c.min_size, c.max_size, c.sample_rate), (u64::MAX, u64::MAX, u32::MAX));
        assert_eq!((c.interval, c.count), (Duration::from_secs(u64::MAX), Some(u64::MAX)));
        let c = ok(&["-p", "2147483647", "-T", &usize::MAX.to_string(), "--max-allocs", "134217728"]);
        assert_eq!((c.target, c.top, c.max_allocs), (Target::Pids(vec![i32::MAX]), usize::MAX, 1 << 27));
    }

    #[test]
    fn several_pids_a_cgroup_and_following() {
        let c = ok(&["-p", "15,12", "-p", "12"]);
        assert_eq!((c.target, c.follow), (Target::Pids(vec![12, 15]), false));
        assert!(ok(&["-p", "3", "--follow"]).follow);
        assert!(ok(&["-c", "ls"]).follow, "-c follows by default");
        assert!(!ok(&["-c", "ls", "--no-follow"]).follow);
        let g = ok(&["--cgroup", "system.slice/x.service"]);
        assert_eq!((g.target, g.follow), (Target::Cgroup("system.slice/x.service".into()), true));
        assert!(err(&["-c", "ls", "--follow"]).contains("--follow is for -p"));
        assert!(err(&["-p", "1", "--no-follow"]).contains("--no-follow is for -c"));
        assert!(err(&["-p", "1", "--cgroup", "x"]).contains("cannot be used with"));
        assert!(err(&["-p", "1,-2"]).contains("invalid pid -2"));
    }

    #[test]
    fn help_has_examples() {
        match parse(["memleak", "--help"]) {
            Err(ParseOutcome::Print(h)) => {
                assert!(h.contains("EXAMPLES:"));
                for flag in [
                    "--pid",
                    "--trace",
                    "--show-allocs",
                    "--older",
                    "--command",
                    "--combined-only",
                    "--wa-missing-free",
                    "--sample-rate",
                    "--top",
                    "--min-size",
                    "--max-size",
                    "--obj",
                    "--sort",
                    "--percpu",
                    "--symbols-prefix",
                    "--interval",
                    "--frame-pointers",
                    "--scan",
                    "--no-scan",
                    "--error-exitcode",
                    "--errors-for-leak-kinds",
                    "--suppressions",
                    "--format",
                    "--pprof",
                    "--folded",
                    "--flamegraph",
                    "--growth",
                ] {
                    assert!(h.contains(flag), "help lacks {flag}");
                }
            }
            other => panic!("--help: {other:?}"),
        }
    }
}
