//! Loads the BPF object configured for this run: constants, map sizes, and which programs.
use std::mem::MaybeUninit;

use anyhow::{Context, Result};
use libbpf_rs::OpenObject;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};

use crate::cli::Config;
use crate::probes::AttachMode;
use crate::skel::{MemleakSkel, MemleakSkelBuilder, OpenMemleakSkel};

/// Map sizes. docs/design.md explains the numbers.
pub const MAX_STACKS: u32 = 32_768;
pub const MAX_COMBINED: u32 = 32_768;
pub const TRACE_RINGBUF: u32 = 4 << 20;

/// The most records the allocation table may hold: 2^27, 8 GiB of kernel memory
/// (src/records.rs: 64 bytes per record at a full table).
pub const MAX_ALLOCS_LIMIT: u32 = 1 << 27;
/// Above this --max-allocs, memleak says how much kernel memory the table takes.
const LARGE_MAP: u32 = 10_000_000;

/// With a large --max-allocs, says on stderr what the allocation table will take, before it does.
pub fn note_map_memory(max_allocs: u32) {
    if max_allocs <= LARGE_MAP {
        return;
    }
    errln!(
        "memleak: note: --max-allocs {max_allocs} takes {} of kernel memory at start (the allocation table, {} bytes per allocation it can hold)",
        human(crate::records::table_bytes(max_allocs)),
        crate::records::table_bytes(max_allocs) / u64::from(max_allocs)
    );
}

fn human(bytes: u64) -> String {
    const MIB: f64 = (1 << 20) as f64;
    let mib = bytes as f64 / MIB;
    if mib >= 1024.0 { format!("{:.1} GiB", mib / 1024.0) } else { format!("{mib:.0} MiB") }
}

/// Names the likely cause of a failed load: E2BIG from a map larger than the kernel allows.
pub fn load_error(e: libbpf_rs::Error, max_allocs: u32) -> anyhow::Error {
    if e.kind() == libbpf_rs::ErrorKind::TooBig {
        return anyhow::anyhow!(
            "cannot load the BPF programs: the kernel refuses an allocation table for {max_allocs} records (--max-allocs), or a program as too complex for its verifier: {e}"
        );
    }
    anyhow::Error::new(e).context("cannot load the BPF programs")
}

pub struct Loaded<'obj> {
    pub skel: MemleakSkel<'obj>,
    pub mode: AttachMode,
}

/// Opens, configures and loads the object for attach mode `mode` (features.rs chose it).
/// `find_vma`: the kernel has bpf_find_vma (an allocator's own mmaps are told apart with it).
/// `preload`: processes may run the in-process capture's library (src/preload/).
pub fn load<'obj>(
    storage: &'obj mut MaybeUninit<OpenObject>,
    cfg: &Config,
    mode: AttachMode,
    find_vma: bool,
    preload: bool,
) -> Result<Loaded<'obj>> {
    let mut open = open(storage, cfg, mode)?;
    let rodata = open.maps.rodata_data.as_deref_mut().context("BPF object without .rodata")?;
    rodata.have_find_vma = find_vma;
    rodata.have_preload = preload;
    // A call sampling or a size filter leaves out takes no return probe; its nested calls
    // are told by their stacks, which takes the table walk and bpf_find_vma.
    let filtered = cfg.sample_rate > 1 || cfg.sample_bytes > 0 || cfg.min_size > 0 || cfg.max_size < u64::MAX;
    rodata.skip_unsampled = filtered && find_vma && !cfg.frame_pointers && !cfg.wa_missing_free;
    // A thread memleak ptraces waits at a dlopen until the new objects' probes are in.
    rodata.memleak_tgid = std::process::id();
    let skel = open.load().map_err(|e| load_error(e, cfg.max_allocs))?;
    Ok(Loaded { skel, mode })
}

/// Sets what records.bpf.h shares in either object (user mode's or kernel mode's skeleton, whose
/// generated types differ): the filters and options in .rodata and the record maps' sizes.
macro_rules! configure_records {
    ($open:expr, $cfg:expr) => {{
        let rodata = $open.maps.rodata_data.as_deref_mut().context("BPF object without .rodata")?;
        rodata.min_size = $cfg.min_size;
        rodata.max_size = $cfg.max_size;
        rodata.sample_rate = $cfg.sample_rate;
        rodata.sample_bytes = $cfg.sample_bytes;
        rodata.sample_recip = if $cfg.sample_bytes > 0 { (1u64 << 58) / $cfg.sample_bytes } else { 0 };
        // Most blocks go unrecorded: frees look in a small counter array first.
        rodata.presence_filter =
            $cfg.sample_rate > 1 || $cfg.sample_bytes > 0 || $cfg.min_size > 0 || $cfg.max_size < u64::MAX;
        for (k, e) in rodata.exp_neg64.iter_mut().enumerate() {
            // exp(-k / 64) in 32.32 fixed point.
            *e = ((-(k as f64) / 64.0).exp() * 4294967296.0).round() as u64;
        }
        rodata.trace_all = $cfg.trace;
        rodata.combined_only = $cfg.combined_only;
        rodata.wa_missing_free = $cfg.wa_missing_free;
        rodata.max_records = u64::from($cfg.max_allocs);
        rodata.alloc_buckets = $crate::records::buckets_for($cfg.max_allocs);
        $open.maps.allocs.set_max_entries(rodata.alloc_buckets)?;
        $open.maps.stacks.set_max_entries($crate::loader::MAX_STACKS)?;
        $open.maps.combined.set_max_entries(if $cfg.combined_only { $crate::loader::MAX_COMBINED } else { 1 })?;
        // A ring buffer's size is a power-of-two number of pages; the smallest when -t is off.
        let events = if $cfg.trace { $crate::loader::TRACE_RINGBUF } else { $crate::loader::page_size() };
        $open.maps.events.set_max_entries(events)?;
    }};
}
pub(crate) use configure_records;

fn open<'obj>(
    storage: &'obj mut MaybeUninit<OpenObject>,
    cfg: &Config,
    mode: AttachMode,
) -> Result<OpenMemleakSkel<'obj>> {
    let builder = MemleakSkelBuilder::default();
    let mut open = builder.open(storage).context("cannot open the BPF object")?;
    configure_records!(open, cfg);
    let rodata = open.maps.rodata_data.as_deref_mut().context("BPF object without .rodata")?;
    rodata.frame_pointers_only = cfg.frame_pointers;

    open.progs.memleak_session.set_autoload(mode == AttachMode::Session);
    open.progs.memleak_multi_entry.set_autoload(mode == AttachMode::Multi);
    open.progs.memleak_multi_return.set_autoload(mode == AttachMode::Multi);
    open.progs.memleak_entry.set_autoload(mode == AttachMode::Classic);
    open.progs.memleak_return.set_autoload(mode == AttachMode::Classic);
    Ok(open)
}

pub fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_table_memory() {
        // The default: 64 MiB (209,716 buckets of 320 bytes).
        assert_eq!(crate::records::table_bytes(1 << 20), 209_716 * 320);
        assert_eq!(crate::records::table_bytes(20_000_000), 1_280_000_000);
        assert_eq!(crate::records::table_bytes(MAX_ALLOCS_LIMIT), 26_843_546 * 320);
        assert_eq!(human(512 << 20), "512 MiB");
        assert_eq!(human(1_920_000_000), "1.8 GiB");
    }
}
