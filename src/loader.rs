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

/// The most entries a hash map can have: the kernel rounds the size up to a power of two of
/// 16-byte buckets whose total must fit in 32 bits (more fails with E2BIG). Checked here:
/// 2^27 loads, 2^27 + 1 does not.
pub const MAX_ALLOCS_LIMIT: u32 = 1 << 27;
/// Kernel memory of the allocation map (docs/design.md, measured with `-v`): 16 bytes per
/// bucket, the size rounded up to a power of two, taken at start; 96 bytes per outstanding
/// allocation.
const BUCKET_BYTES: u64 = 16;
const RECORD_BYTES: u64 = 96;
/// Above this --max-allocs, memleak says how much kernel memory the map takes.
const LARGE_MAP: u32 = 10_000_000;

/// (bytes taken at start, bytes more when full) of an allocation map of `n` entries.
pub fn allocs_map_memory(n: u32) -> (u64, u64) {
    (u64::from(n).next_power_of_two() * BUCKET_BYTES, u64::from(n) * RECORD_BYTES)
}

/// With a large --max-allocs, says on stderr what the allocation map will take, before it does.
pub fn note_map_memory(max_allocs: u32) {
    if max_allocs <= LARGE_MAP {
        return;
    }
    let (start, full) = allocs_map_memory(max_allocs);
    errln!(
        "memleak: note: --max-allocs {max_allocs} takes {} of kernel memory at start (the allocation map's buckets), and {} more when the map is full ({RECORD_BYTES} bytes per outstanding allocation)",
        human(start),
        human(full)
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
            "cannot load the BPF programs: the kernel refuses an allocation map of {max_allocs} entries (--max-allocs): {e}"
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
        rodata.trace_all = $cfg.trace;
        rodata.combined_only = $cfg.combined_only;
        rodata.wa_missing_free = $cfg.wa_missing_free;
        $open.maps.allocs.set_max_entries($cfg.max_allocs)?;
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
    fn allocation_map_memory() {
        // The default: 16 MiB of buckets (measured: 16778112 bytes with -v).
        assert_eq!(allocs_map_memory(1 << 20), (16 << 20, 96 << 20));
        // 20 M rounds up to 2^25 buckets: 512 MiB (measured: 536871808 bytes).
        assert_eq!(allocs_map_memory(20_000_000).0, 512 << 20);
        assert_eq!(allocs_map_memory(MAX_ALLOCS_LIMIT), (2 << 30, 12 << 30));
        assert_eq!(human(512 << 20), "512 MiB");
        assert_eq!(human(1_920_000_000), "1.8 GiB");
    }
}
