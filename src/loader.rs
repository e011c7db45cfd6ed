//! Loads the BPF object configured for this run: constants, map sizes, and which programs.
use std::mem::MaybeUninit;

use anyhow::{Context, Result};
use libbpf_rs::OpenObject;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};

use crate::cli::{AttachChoice, Config};
use crate::probes::AttachMode;
use crate::skel::{MemleakSkel, MemleakSkelBuilder, OpenMemleakSkel};

/// Map sizes. docs/design.md explains the numbers.
pub const MAX_STACKS: u32 = 32_768;
pub const MAX_COMBINED: u32 = 32_768;
pub const TRACE_RINGBUF: u32 = 4 << 20;

pub struct Loaded<'obj> {
    pub skel: MemleakSkel<'obj>,
    pub mode: AttachMode,
}

/// Opens, configures and loads the object; uses uprobe sessions where the kernel has them.
pub fn load<'obj>(
    storage: &'obj mut MaybeUninit<OpenObject>,
    cfg: &Config,
    target_tgid: u32,
    held_until_exec: bool,
) -> Result<Loaded<'obj>> {
    let mode = match cfg.attach {
        AttachChoice::Session => AttachMode::Session,
        AttachChoice::Multi => AttachMode::Multi,
        AttachChoice::Classic => AttachMode::Classic,
        AttachChoice::Auto if kernel_at_least(6, 13) => AttachMode::Session,
        AttachChoice::Auto if kernel_at_least(6, 6) => AttachMode::Multi,
        AttachChoice::Auto => AttachMode::Classic,
    };
    let open = open(storage, cfg, target_tgid, held_until_exec, mode)?;
    let skel = open.load().context("cannot load the BPF programs")?;
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
    target_tgid: u32,
    held_until_exec: bool,
    mode: AttachMode,
) -> Result<OpenMemleakSkel<'obj>> {
    let builder = MemleakSkelBuilder::default();
    let mut open = builder.open(storage).context("cannot open the BPF object")?;
    configure_records!(open, cfg);
    let rodata = open.maps.rodata_data.as_deref_mut().context("BPF object without .rodata")?;
    rodata.need_exec = held_until_exec;
    rodata.target_tgid = target_tgid;
    rodata.frame_pointers_only = cfg.frame_pointers;

    open.progs.memleak_session.set_autoload(mode == AttachMode::Session);
    open.progs.memleak_multi_entry.set_autoload(mode == AttachMode::Multi);
    open.progs.memleak_multi_return.set_autoload(mode == AttachMode::Multi);
    open.progs.memleak_entry.set_autoload(mode == AttachMode::Classic);
    open.progs.memleak_return.set_autoload(mode == AttachMode::Classic);
    Ok(open)
}

/// Whether the running kernel is at least `major.minor`: uprobe sessions came in 6.13,
/// uprobe_multi links in 6.6.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    let (maj, min) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (maj, min) >= (major, minor)
}

pub fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u32 }
}
