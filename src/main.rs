//! memleak: trace outstanding memory allocations with eBPF.
//!
//! Data path: target (the process) → probes (uprobes on its allocator) → BPF maps (loader)
//! (or, without a process, `kernel`: tracepoints of the kernel's allocators)
//! → collector (reads and aggregates) → snapshot (the model of a report, symbolized) →
//! output (text, JSON, pprof, folded, flame graph). `run` drives them.
/// Writes a line to stderr, as eprintln! does, but a closed or full stderr is not an error:
/// memleak's messages are best effort, its exit status is not.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod allocator;
mod batch;
mod cgroup;
mod cli;
mod collector;
mod debuginfo;
mod demangle;
mod features;
mod kernel;
mod ldso;
mod loader;
mod objects;
mod objfile;
mod output;
mod placement;
mod preload;
mod probes;
mod procfs;
mod procmaps;
mod records;
mod report;
mod run;
mod scan;
mod session;
mod signals;
mod snapshot;
mod symbolizer;
mod symtab;
mod target;
mod unwind;

mod skel {
    include!(concat!(env!("OUT_DIR"), "/memleak.skel.rs"));
}

/// Kernel mode's object: tracepoints of the kernel's allocators.
mod kmem_skel {
    include!(concat!(env!("OUT_DIR"), "/kmem.skel.rs"));
}

/// Frames a stack holds at most: the length of `struct stack`'s ips (memleak.h).
// SAFETY: the plain C struct is valid all zeroes; only the length of its array is read.
pub const MAX_STACK_DEPTH: usize = unsafe { std::mem::zeroed::<skel::types::stack>() }.ips.len();

use std::io::Write;

/// libbpf's own messages go to stderr only with -v: errors reach the user as one line each.
fn libbpf_log(level: libbpf_rs::PrintLevel, msg: String) {
    if level != libbpf_rs::PrintLevel::Debug {
        let _ = write!(std::io::stderr(), "libbpf: {msg}");
    }
}

fn main() {
    let cfg = match cli::parse(std::env::args_os()) {
        Ok(cfg) => cfg,
        Err(cli::ParseOutcome::Print(text)) => {
            let _ = write!(std::io::stdout(), "{text}");
            let _ = std::io::stdout().flush();
            return;
        }
        Err(cli::ParseOutcome::Error(msg)) => {
            errln!("memleak: {msg}");
            std::process::exit(2);
        }
    };
    libbpf_rs::set_print(cfg.verbose.then_some((libbpf_rs::PrintLevel::Info, libbpf_log as libbpf_rs::PrintCallback)));
    let code = match run::run(&cfg) {
        Ok(code) => code,
        Err(e) => {
            let _ = std::io::stdout().flush();
            // One line: the causes joined, as anyhow's alternate form does.
            errln!("memleak: {}", format!("{e:#}").replace('\n', " "));
            1
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}
