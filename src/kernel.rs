//! Kernel mode: the kernel's allocators (kmalloc, kmem_cache and pages; or, with --percpu, the
//! percpu allocator) through their tracepoints, attached by BTF (tp_btf: no tracefs needed).
//! The records are read and reported by the same collector and report code as user mode's.
use std::mem::MaybeUninit;
use std::os::fd::AsFd;

use anyhow::{Context, Result, bail};
use libbpf_rs::btf::{Btf, BtfKind, BtfType, types::FuncProto};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, OpenObject, ProgramMut};

use crate::cli::Config;
use crate::collector::{Collector, Programs, RecordMaps, Role};
use crate::kmem_skel::types::bss;
use crate::kmem_skel::{KmemSkelBuilder, OpenKmemSkel};
use crate::loader::{configure_records, page_size};
use crate::report::Reporter;
use crate::session::{Registry, Session};
use crate::signals::Signals;
use crate::symbolizer::Symbolizer;

/// The tracepoint argument layouts of the running kernel (see kmem.bpf.c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// kmem_cache_alloc(call_site, ptr, struct kmem_cache *s, gfp_flags, node): Linux 6.1+.
    pub cache_alloc_has_cache: bool,
    /// percpu_alloc_percpu(call_site, reserved, ...): Linux 6.2+.
    pub percpu_has_call_site: bool,
}

impl Layout {
    pub fn of(btf: &Btf) -> Result<Layout> {
        // The third argument (after the hidden `void *__data` and call_site, ptr) is a pointer
        // only in the 6.1+ layout, where it is `struct kmem_cache *`.
        let cache = params(btf, "kmem_cache_alloc")?;
        let third = cache.get(3).context("kmem_cache_alloc's tracepoint has fewer than 3 arguments")?;
        let cache_alloc_has_cache = third.skip_mods_and_typedefs().kind() == BtfKind::Ptr;
        let percpu = params(btf, "percpu_alloc_percpu")?;
        let percpu_has_call_site = match percpu.len() {
            11 => true,
            8 => false,
            n => bail!("percpu_alloc_percpu's tracepoint has {} arguments: a layout memleak does not know", n - 1),
        };
        Ok(Layout { cache_alloc_has_cache, percpu_has_call_site })
    }
}

/// The parameter types of tracepoint `name`'s BTF prototype (`btf_trace_<name>`), the hidden
/// `void *` first.
fn params<'b>(btf: &'b Btf, name: &str) -> Result<Vec<BtfType<'b>>> {
    let typedef = format!("btf_trace_{name}");
    let proto = btf
        .type_by_name::<BtfType>(&typedef)
        .and_then(|t| t.next_type()) // the pointer
        .and_then(|t| t.next_type()) // the prototype
        .and_then(|t| FuncProto::try_from(t).ok())
        .with_context(|| format!("the kernel's BTF has no tracepoint {name} ({typedef})"))?;
    proto
        .iter()
        .map(|p| btf.type_by_id::<BtfType>(p.ty).with_context(|| format!("{typedef}: a parameter type is missing")))
        .collect()
}

pub fn run(cfg: &Config, signals: &mut Signals, outputs: crate::output::Outputs) -> Result<i32> {
    let btf = Btf::from_vmlinux().context("cannot read the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
    let layout = Layout::of(&btf)?;
    drop(btf);

    let mut storage = MaybeUninit::uninit();
    let mut skel = open(&mut storage, cfg, layout)?.load().map_err(|e| crate::loader::load_error(e, cfg.max_allocs))?;

    let p = &skel.progs;
    let progs: Vec<(&ProgramMut, Role)> = if cfg.percpu {
        vec![(&p.memleak_percpu_alloc, Role::Alloc), (&p.memleak_percpu_free, Role::Free)]
    } else {
        vec![
            (&p.memleak_kmalloc, Role::Alloc),
            (&p.memleak_kfree, Role::Free),
            (&p.memleak_kmem_cache_alloc, Role::Alloc),
            (&p.memleak_kmem_cache_free, Role::Free),
            (&p.memleak_page_alloc, Role::Alloc),
            (&p.memleak_page_free, Role::Free),
        ]
    };
    let mut links: Vec<Link> = Vec::new();
    for (prog, _) in &progs {
        let name = prog.name().to_string_lossy().into_owned();
        links.push(prog.attach().with_context(|| format!("cannot attach {name} to its tracepoint"))?);
    }
    if cfg.verbose {
        errln!("memleak: tracepoint layouts: {layout:?}");
        for (prog, _) in &progs {
            errln!("memleak:   attached {}", prog.name().to_string_lossy());
        }
    }
    let programs = Programs { progs: progs.iter().map(|(prog, role)| (prog.as_fd(), *role)).collect() };

    let bss = skel.maps.bss_data.as_deref_mut().context("BPF object without .bss")?;
    if !cfg.percpu {
        match calibrate_pages(bss) {
            Ok(base) => {
                // SAFETY: a u64 in the mmapped .bss, read by the programs.
                unsafe { std::ptr::write_volatile(&mut bss.vmemmap_base, base) };
                if cfg.verbose {
                    errln!("memleak: vmemmap base {base:#x}");
                }
            }
            Err(e) => errln!("memleak: note: page allocations are not traced: {e:#}"),
        }
    }
    let bss = skel.maps.bss_data.as_deref().context("BPF object without .bss")?;
    let table = crate::records::RecordTable::map(&skel.maps.allocs)?;

    signals.arm()?;
    outputs.status("Attaching to kernel allocators, Ctrl+C to quit.")?;
    let rep = Reporter {
        cfg,
        maps: RecordMaps {
            allocs: &table,
            live: &bss.live_records,
            mappings: None,
            combined: &skel.maps.combined,
            counters: &bss.counters,
        },
        stacks: &skel.maps.stacks,
        kernel: true,
        collector: Collector::new(),
        symbolizer: Symbolizer::kernel(),
        programs: Some(programs),
        unwind: None,
        outputs,
        snapshots: crate::snapshot::Builder::new(),
        warnings: Vec::new(),
        retired: Vec::new(),
        scan: Default::default(),
        preload: None,
    };
    let ring = if cfg.trace {
        let mut b = libbpf_rs::RingBufferBuilder::new();
        b.add(&skel.maps.events, crate::session::trace_event)?;
        Some(b.build()?)
    } else {
        None
    };
    let mut session = Session {
        cfg,
        rep,
        reg: Registry::default(),
        prober: None,
        signals,
        ring,
        execs: Default::default(),
        follow: false,
        user: None,
        cgroup: None,
    };
    session.run()?;
    drop(links);
    Ok(0)
}

/// Opens the object configured for this run: constants, map sizes, the programs of the mode.
fn open<'obj>(storage: &'obj mut MaybeUninit<OpenObject>, cfg: &Config, layout: Layout) -> Result<OpenKmemSkel<'obj>> {
    let mut open = KmemSkelBuilder::default().open(storage).context("cannot open the BPF object")?;
    configure_records!(open, cfg);
    let rodata = open.maps.rodata_data.as_deref_mut().context("BPF object without .rodata")?;
    rodata.cache_alloc_has_cache = layout.cache_alloc_has_cache;
    rodata.percpu_has_call_site = layout.percpu_has_call_site;
    let p = &mut open.progs;
    for prog in [
        &mut p.memleak_kmalloc,
        &mut p.memleak_kfree,
        &mut p.memleak_kmem_cache_alloc,
        &mut p.memleak_kmem_cache_free,
        &mut p.memleak_page_alloc,
        &mut p.memleak_page_free,
    ] {
        prog.set_autoload(!cfg.percpu);
    }
    p.memleak_percpu_alloc.set_autoload(cfg.percpu);
    p.memleak_percpu_free.set_autoload(cfg.percpu);
    Ok(open)
}

/// The kernel's vmemmap base (the struct page of PFN 0), from one page of ours: its PFN from
/// /proc/self/pagemap, its struct page from the mm_page_alloc program (see kmem.bpf.c).
fn calibrate_pages(bss: &mut bss) -> Result<u64> {
    let page = page_size() as usize;
    let mut last_err = None;
    for _ in 0..3 {
        // SAFETY: a fresh private anonymous mapping of one page, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap");
        }
        // SAFETY: bss is the mmapped .bss; addr is our page, written once to fault it in.
        let (struct_page, struct_size) = unsafe {
            libc::madvise(addr, page, libc::MADV_NOHUGEPAGE);
            std::ptr::write_volatile(&mut bss.calib_page, 0);
            std::ptr::write_volatile(&mut bss.calib_tid, libc::gettid() as u32);
            std::ptr::write_volatile(addr.cast::<u8>(), 1);
            std::ptr::write_volatile(&mut bss.calib_tid, 0);
            (std::ptr::read_volatile(&bss.calib_page), std::ptr::read_volatile(&bss.page_struct_size))
        };
        let pfn = pfn_of(addr as u64);
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(addr, page) };
        let pfn = pfn?;
        match vmemmap_base(struct_page, struct_size, pfn) {
            Ok(base) => return Ok(base),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.expect("three tries"))
}

/// The base from one (struct page address, PFN) pair; it is 1 GiB-aligned on x86-64.
fn vmemmap_base(struct_page: u64, struct_size: u64, pfn: u64) -> Result<u64> {
    if struct_page == 0 || struct_size == 0 {
        bail!("mm_page_alloc did not report our page");
    }
    let base = struct_page.wrapping_sub(pfn.wrapping_mul(struct_size));
    if base & ((1 << 30) - 1) != 0 {
        bail!("inconsistent page numbers (struct page {struct_page:#x}, pfn {pfn:#x})");
    }
    Ok(base)
}

/// The page frame number of a present page of ours, from /proc/self/pagemap.
fn pfn_of(addr: u64) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").context("/proc/self/pagemap")?;
    let mut entry = [0u8; 8];
    f.read_exact_at(&mut entry, addr / page_size() as u64 * 8).context("reading /proc/self/pagemap")?;
    let entry = u64::from_ne_bytes(entry);
    let pfn = entry & ((1 << 55) - 1);
    if entry >> 63 == 0 || pfn == 0 {
        bail!("/proc/self/pagemap shows no page frame numbers");
    }
    Ok(pfn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmemmap_base_from_one_page() {
        let base = 0xffff_ea00_0000_0000u64;
        assert_eq!(vmemmap_base(base + 0x1234 * 64, 64, 0x1234).unwrap(), base);
        assert!(vmemmap_base(base + 0x1234 * 64 + 8, 64, 0x1234).is_err());
        assert!(vmemmap_base(0, 64, 0x1234).is_err());
    }

    /// Both layouts of each changed tracepoint pass the verifier (with the other layout's
    /// argument positions, which exist here too): an older kernel gets a loadable object.
    #[test]
    fn every_layout_loads() {
        let Ok(mut cfg) = crate::cli::parse(["memleak", "--max-allocs", "1024"]) else { panic!("kernel mode") };
        for percpu in [false, true] {
            cfg.percpu = percpu;
            for (cache_alloc_has_cache, percpu_has_call_site) in [(true, true), (false, false)] {
                let layout = Layout { cache_alloc_has_cache, percpu_has_call_site };
                let mut storage = MaybeUninit::uninit();
                let open = open(&mut storage, &cfg, layout).expect("opens");
                if let Err(e) = open.load() {
                    panic!("{layout:?}, percpu {percpu}: {e:#}");
                }
            }
        }
    }

    /// The parameter names of the function the kernel generates for tracepoint `tp`
    /// (`__bpf_trace_<tp>` or `__probestub_<tp>`, with the TP_PROTO's names): evidence
    /// independent of the unnamed prototype Layout::of reads.
    fn named_params(btf: &Btf, tp: &str) -> Vec<String> {
        use libbpf_rs::btf::types::Func;
        let func = [format!("__bpf_trace_{tp}"), format!("__probestub_{tp}")]
            .iter()
            .find_map(|n| btf.type_by_name::<Func>(n))
            .unwrap_or_else(|| panic!("no generated function of tracepoint {tp} in the kernel's BTF"));
        let proto = func.next_type().and_then(|t| FuncProto::try_from(t).ok()).expect("a prototype");
        proto.iter().map(|p| p.name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect()
    }

    /// The layouts read from the running kernel's tracepoint prototypes agree with the names of
    /// their parameters: `s` (struct kmem_cache *) third in kmem_cache_alloc's, `call_site`
    /// first in percpu_alloc_percpu's.
    #[test]
    fn running_kernel_layout() {
        let btf = Btf::from_vmlinux().expect("kernel BTF");
        let l = Layout::of(&btf).expect("known layouts");
        let cache = named_params(&btf, "kmem_cache_alloc");
        let percpu = named_params(&btf, "percpu_alloc_percpu");
        assert_eq!(l.cache_alloc_has_cache, cache.get(3).map(String::as_str) == Some("s"), "{cache:?}");
        assert_eq!(l.percpu_has_call_site, percpu.get(1).map(String::as_str) == Some("call_site"), "{percpu:?}");
    }
}
