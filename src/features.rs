//! What the running kernel's BPF can do, probed at start-up (distributions backport features, so
//! version numbers say little), and the choices that follow: how to attach the uprobes, and
//! whether stacks can be unwound from the tables. A missing feature memleak can do without is a
//! fallback with a note; one it needs is a one-line error naming it and the Linux release that
//! brought it. docs/design.md lists them.
use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Result, bail};
use libbpf_sys as sys;

use crate::cli::AttachChoice;
use crate::probes::AttachMode;

/// The features memleak uses, each probed on the running kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// The kernel's BTF (/sys/kernel/btf/vmlinux): CO-RE and tp_btf programs (5.5).
    pub btf: bool,
    /// BPF ring buffers (5.8).
    pub ringbuf: bool,
    /// Task storage maps usable from tracing programs (5.13; LSM programs had them in 5.11).
    pub task_storage: bool,
    /// bpf_get_current_task_btf (5.11).
    pub task_btf: bool,
    /// bpf_for_each_map_elem (5.13).
    pub for_each_map_elem: bool,
    /// bpf_get_attach_cookie in uprobe programs (5.15).
    pub attach_cookie: bool,
    /// bpf_loop (5.17): the table unwinder's loop.
    pub bpf_loop: bool,
    /// bpf_find_vma (5.17): the table unwinder's address to object look-up.
    pub find_vma: bool,
    /// uprobe_multi links (6.6).
    pub uprobe_multi: bool,
    /// uprobe_multi's pid filter selects the process, not only its main thread (6.10).
    pub uprobe_multi_process_filter: bool,
    /// uprobe sessions (6.13).
    pub uprobe_session: bool,
    /// A uprobe on a 5-byte nop is optimized into a call, and multi-byte nops are emulated
    /// (6.18): the kernel has `arch_uprobe_optimize` (/proc/kallsyms).
    pub uprobe_nop_optimize: bool,
}

impl Features {
    /// Probes the running kernel (a few tiny program loads; needs CAP_BPF).
    pub fn probe() -> Features {
        let multi = uprobe_link_errno(sys::BPF_TRACE_UPROBE_MULTI, 0);
        Features {
            btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
            ringbuf: map_type(sys::BPF_MAP_TYPE_RINGBUF),
            task_storage: map_type(sys::BPF_MAP_TYPE_TASK_STORAGE) && helper(sys::BPF_FUNC_task_storage_get),
            task_btf: helper(sys::BPF_FUNC_get_current_task_btf),
            for_each_map_elem: helper(sys::BPF_FUNC_for_each_map_elem),
            attach_cookie: helper(sys::BPF_FUNC_get_attach_cookie),
            bpf_loop: helper(sys::BPF_FUNC_loop),
            find_vma: helper(sys::BPF_FUNC_find_vma),
            // The kernel knows the link type when it gets as far as the path: "/" is not a
            // regular file (EBADF); one that does not know it says EINVAL.
            uprobe_multi: multi == Some(libc::EBADF),
            // A kernel with the fixed filter checks the pid before the path.
            uprobe_multi_process_filter: uprobe_link_errno(sys::BPF_TRACE_UPROBE_MULTI, -1) == Some(libc::EINVAL),
            uprobe_session: uprobe_link_errno(sys::BPF_TRACE_UPROBE_SESSION, 0) == Some(libc::EBADF),
            uprobe_nop_optimize: kernel_has_symbol("arch_uprobe_optimize"),
        }
    }

    /// Every feature present.
    #[cfg(test)]
    pub fn all() -> Features {
        Features {
            btf: true,
            ringbuf: true,
            task_storage: true,
            task_btf: true,
            for_each_map_elem: true,
            attach_cookie: true,
            bpf_loop: true,
            find_vma: true,
            uprobe_multi: true,
            uprobe_multi_process_filter: true,
            uprobe_session: true,
            uprobe_nop_optimize: true,
        }
    }

    /// Fails, naming the first missing feature, unless kernel mode can run.
    pub fn require_kernel_mode(&self) -> Result<()> {
        require(&[
            (self.btf, "BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF)", "5.5"),
            (self.ringbuf, "BPF ring buffers", "5.8"),
        ])
    }

    /// How user mode runs here: the attach mode, the stack walk, and notes on what was chosen
    /// for lack of a feature. Fails, naming it, when a feature memleak needs is missing.
    pub fn plan(&self, choice: AttachChoice, frame_pointers: bool) -> Result<Plan> {
        require(&[
            (self.btf, "BTF (/sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF)", "5.5"),
            (self.ringbuf, "BPF ring buffers", "5.8"),
            (self.task_storage, "BPF task storage in tracing programs", "5.13"),
            (self.task_btf, "the bpf_get_current_task_btf helper", "5.11"),
            (self.for_each_map_elem, "the bpf_for_each_map_elem helper", "5.13"),
            (self.attach_cookie, "the bpf_get_attach_cookie helper", "5.15"),
        ])?;
        let mut notes = Vec::new();
        let mut verbose = Vec::new();
        let mut walk_frame_pointers = frame_pointers;
        let unwinder = self.bpf_loop && self.find_vma;
        if !frame_pointers && !unwinder {
            let missing: Vec<&str> = [(self.bpf_loop, "bpf_loop"), (self.find_vma, "bpf_find_vma")]
                .iter()
                .filter(|(has, _)| !has)
                .map(|(_, name)| *name)
                .collect();
            let helpers = if missing.len() > 1 { "helpers" } else { "helper" };
            notes.push(format!(
                "this kernel has no {} {helpers} (Linux 5.17): stacks are walked by frame pointers (--frame-pointers); code built without them loses frames",
                missing.join(" and ")
            ));
            walk_frame_pointers = true;
        }
        let multi_ok = self.uprobe_multi && self.uprobe_multi_process_filter;
        let thread_filter = "its uprobe_multi links trace only the main thread of a process (fixed in Linux 6.10)";
        let mode = match choice {
            AttachChoice::Session if !self.uprobe_session => {
                bail!("--attach session: this kernel has no uprobe sessions (Linux 6.13); use --attach auto")
            }
            AttachChoice::Session => AttachMode::Session,
            AttachChoice::Multi if !self.uprobe_multi => {
                bail!("--attach multi: this kernel has no uprobe_multi links (Linux 6.6); use --attach auto")
            }
            AttachChoice::Multi => {
                if !self.uprobe_multi_process_filter {
                    notes.push(format!("--attach multi: {thread_filter}; other threads are not traced"));
                }
                AttachMode::Multi
            }
            AttachChoice::Classic => AttachMode::Classic,
            AttachChoice::Auto if self.uprobe_session => AttachMode::Session,
            AttachChoice::Auto if multi_ok => {
                verbose.push("no uprobe sessions (Linux 6.13): an entry and a return uprobe_multi link".to_string());
                AttachMode::Multi
            }
            AttachChoice::Auto => {
                if self.uprobe_multi {
                    notes.push(format!("{thread_filter}: classic uprobes are used"));
                } else {
                    verbose.push("no uprobe_multi links (Linux 6.6): classic uprobes".to_string());
                }
                AttachMode::Classic
            }
        };
        Ok(Plan { mode, frame_pointers: walk_frame_pointers, notes, verbose })
    }
}

/// What user mode does on this kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub mode: AttachMode,
    /// Walk frame pointers rather than the unwind tables.
    pub frame_pointers: bool,
    /// Said on stderr: a fallback for lack of a feature.
    pub notes: Vec<String>,
    /// Said with -v: the usual choice on an older kernel.
    pub verbose: Vec<String>,
}

fn require(needed: &[(bool, &str, &str)]) -> Result<()> {
    if let Some((_, what, release)) = needed.iter().find(|(has, _, _)| !has) {
        bail!("this kernel lacks {what} (Linux {release}), which memleak needs");
    }
    Ok(())
}

fn helper(id: sys::bpf_func_id) -> bool {
    // SAFETY: libbpf loads a small program calling the helper; no options.
    unsafe { sys::libbpf_probe_bpf_helper(sys::BPF_PROG_TYPE_KPROBE, id, std::ptr::null()) == 1 }
}

fn map_type(t: sys::bpf_map_type) -> bool {
    // SAFETY: libbpf creates and closes a small map of this type; no options.
    unsafe { sys::libbpf_probe_bpf_map_type(t, std::ptr::null()) == 1 }
}

/// The error the kernel gives for a uprobe link of type `attach` on "/" for `pid`, from a
/// program that returns 0; None if it makes a link or the program does not load.
fn uprobe_link_errno(attach: sys::bpf_attach_type, pid: i32) -> Option<i32> {
    // r0 = 0; exit
    let insns =
        [sys::bpf_insn { code: 0xb7, ..Default::default() }, sys::bpf_insn { code: 0x95, ..Default::default() }];
    let mut load = sys::bpf_prog_load_opts {
        sz: std::mem::size_of::<sys::bpf_prog_load_opts>() as _,
        expected_attach_type: attach,
        ..Default::default()
    };
    // SAFETY: two valid instructions, a NUL-terminated licence, and options of their size.
    let prog = unsafe {
        sys::bpf_prog_load(sys::BPF_PROG_TYPE_KPROBE, std::ptr::null(), c"GPL".as_ptr(), insns.as_ptr(), 2, &mut load)
    };
    if prog < 0 {
        return None;
    }
    // SAFETY: a descriptor bpf_prog_load just returned.
    let _prog = unsafe { OwnedFd::from_raw_fd(prog) };
    let offset: std::ffi::c_ulong = 0;
    let mut link =
        sys::bpf_link_create_opts { sz: std::mem::size_of::<sys::bpf_link_create_opts>() as _, ..Default::default() };
    link.__bindgen_anon_1.uprobe_multi = sys::bpf_link_create_opts__bindgen_ty_1__bindgen_ty_3 {
        path: c"/".as_ptr(),
        offsets: &offset,
        cnt: 1,
        pid: pid as u32,
        ..Default::default()
    };
    // SAFETY: the program above, options of their size pointing at live locals.
    let fd = unsafe { sys::bpf_link_create(prog, -1, attach, &link) };
    if fd >= 0 {
        // SAFETY: a link descriptor just made; closed at once.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        return None;
    }
    Some(-fd)
}

/// Whether the running kernel has a function of this name (/proc/kallsyms; names are listed to
/// every reader, addresses to root only).
fn kernel_has_symbol(name: &str) -> bool {
    use std::io::BufRead;
    let Ok(f) = std::fs::File::open("/proc/kallsyms") else { return false };
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.rsplit_once(' ').is_some_and(|(_, sym)| sym == name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel these tests run on (Linux 6.18) has every feature; each probe also answers
    /// "no" to what no kernel has, so a missing feature is seen as missing.
    #[test]
    fn probes_see_what_the_kernel_has_and_lacks() {
        assert_eq!(Features::probe(), Features::all());
        assert!(!helper(100_000), "a helper id no kernel has");
        assert!(!map_type(100_000), "a map type no kernel has");
        assert_ne!(uprobe_link_errno(200, 0), Some(libc::EBADF), "an attach type no kernel has");
    }

    #[test]
    fn each_missing_feature_has_its_fallback_or_error() {
        let all = Features::all();
        let plan = |f: Features, choice, fp| f.plan(choice, fp);
        let p = plan(all, AttachChoice::Auto, false).unwrap();
        assert_eq!((p.mode, p.frame_pointers, p.notes.len()), (AttachMode::Session, false, 0));

        let no_session = Features { uprobe_session: false, ..all };
        let p = plan(no_session, AttachChoice::Auto, false).unwrap();
        assert_eq!((p.mode, p.notes.len(), p.verbose.len()), (AttachMode::Multi, 0, 1));
        let e = plan(no_session, AttachChoice::Session, false).unwrap_err();
        assert!(e.to_string().contains("no uprobe sessions (Linux 6.13)"), "{e}");

        let thread_filter = Features { uprobe_session: false, uprobe_multi_process_filter: false, ..all };
        let p = plan(thread_filter, AttachChoice::Auto, false).unwrap();
        assert_eq!(p.mode, AttachMode::Classic);
        assert!(p.notes[0].contains("only the main thread"), "{:?}", p.notes);
        let p = plan(thread_filter, AttachChoice::Multi, false).unwrap();
        assert_eq!(p.mode, AttachMode::Multi);
        assert!(p.notes[0].contains("other threads are not traced"), "{:?}", p.notes);

        let old = Features { uprobe_session: false, uprobe_multi: false, uprobe_multi_process_filter: false, ..all };
        assert_eq!(plan(old, AttachChoice::Auto, false).unwrap().mode, AttachMode::Classic);
        assert!(plan(old, AttachChoice::Multi, false).unwrap_err().to_string().contains("Linux 6.6"));

        for f in [Features { bpf_loop: false, ..old }, Features { find_vma: false, ..old }] {
            let p = plan(f, AttachChoice::Auto, false).unwrap();
            assert!(p.frame_pointers);
            assert!(p.notes[0].contains("(Linux 5.17): stacks are walked by frame pointers"), "{:?}", p.notes);
            // Asked for: nothing to say.
            assert!(plan(f, AttachChoice::Auto, true).unwrap().notes.is_empty());
        }
        let p = plan(Features { bpf_loop: false, find_vma: false, ..all }, AttachChoice::Auto, false).unwrap();
        assert!(p.notes[0].contains("no bpf_loop and bpf_find_vma helpers"), "{:?}", p.notes);

        let e = plan(Features { attach_cookie: false, ..all }, AttachChoice::Auto, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this kernel lacks the bpf_get_attach_cookie helper (Linux 5.15), which memleak needs"
        );
        assert!(Features { ringbuf: false, ..all }.require_kernel_mode().unwrap_err().to_string().contains("5.8"));
        assert!(all.require_kernel_mode().is_ok());
    }
}
