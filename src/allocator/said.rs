//! What discovery says: the Tracing lines, the notes and warnings about what was not probed.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};

use super::candidates::Candidate;
use super::families::{Family, Op};
use super::symbols::{Found, Scan};
use super::{Allocators, ObjArg};

impl Allocators {
    /// The warning for a process from which no allocation call was seen: what was probed.
    pub fn unseen_warning(&self, pid: i32) -> String {
        let probed: Vec<String> = self
            .procs
            .get(&pid)
            .map(|p| {
                p.order
                    .iter()
                    .filter_map(|k| p.probed.get(k))
                    .filter(|o| o.allocator)
                    .map(|o| o.shown.file_name().unwrap_or(o.shown.as_os_str()).to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let go = if self.procs.get(&pid).is_some_and(|p| p.go) {
            " (a Go program: Go's own allocator is not traced, cgo's malloc is)"
        } else {
            ""
        };
        format!(
            "no allocation call seen from pid {pid}{go}: it allocates through functions memleak does not probe, or not at all (probed: the allocator functions of {})",
            if probed.is_empty() { "no object".to_string() } else { probed.join(", ") }
        )
    }

    /// At the end of the run: what -O named and never appeared.
    pub fn final_notes(&self) -> Vec<String> {
        match &self.obj {
            Some(o) if !self.obj_seen => {
                vec![format!("-O {}: no traced process loaded it: nothing was traced", obj_display(o))]
            }
            _ => Vec::new(),
        }
    }

    pub(super) fn obj_not_mapped(&self, pid: i32, o: &ObjArg) -> anyhow::Error {
        if let ObjArg::Path(p) = o
            && let Err(e) = check_obj(p)
        {
            return e;
        }
        anyhow::anyhow!("-O {}: not mapped by process {pid}", obj_display(o))
    }

    /// Why nothing can be traced in a process.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn nothing_to_trace(
        &self,
        pid: i32,
        cands: &[Candidate],
        exe: Option<usize>,
        scans: &[Option<Arc<Scan>>],
        go: bool,
        command: bool,
        obj_at: Option<usize>,
    ) -> String {
        let p = &self.prefix;
        if let Some(i) = obj_at {
            return format!(
                "{} defines none of the allocator functions ({p}malloc, {p}free, ...)",
                cands[i].shown.display()
            );
        }
        let exe_shown = exe.map(|i| cands[i].shown.display().to_string()).unwrap_or_else(|| format!("pid {pid}"));
        if go {
            return format!(
                "{exe_shown} is a Go program without cgo: Go's own allocator is not traced (cgo's malloc is), and it has no C allocator"
            );
        }
        let dynamic = exe.and_then(|i| scans[i].as_ref()).is_none_or(|s| s.interp);
        match (command, dynamic) {
            (true, false) => {
                format!("{exe_shown} is statically linked without {p}malloc: name the allocator's object with -O")
            }
            (true, true) => format!(
                "{exe_shown} loads no object that defines {p}malloc or another allocator function: name the allocator's object with -O"
            ),
            (false, _) => format!(
                "process {pid} has no libc mapped and its executable defines no {p}malloc (nor any other allocator function): name the allocator's object with -O"
            ),
        }
    }

    /// With -O or -S: the C names the object lacks.
    pub(super) fn missing_note(&self, shown: &Path, found: &[Found], is_target: bool) -> Option<String> {
        if !is_target {
            return None;
        }
        let have: std::collections::HashSet<&str> = found.iter().map(|f| f.symbol.as_str()).collect();
        let mut wanted: Vec<(&String, usize)> = self
            .wanted
            .iter()
            .filter(|(n, (_, s))| {
                s.op != Op::LinkMap
                    && (s.family == Family::C && !s.symbol.starts_with("__") && !have.contains(n.as_str()))
            })
            .map(|(n, (rank, _))| (n, *rank))
            .collect();
        wanted.sort_by_key(|w| w.1);
        let missing: Vec<&str> = wanted.iter().map(|w| w.0.as_str()).collect();
        (!missing.is_empty()).then(|| format!("{} has no {}: not traced", shown.display(), missing.join(", ")))
    }
}

pub(super) fn obj_display(o: &ObjArg) -> String {
    match o {
        ObjArg::Path(p) => p.display().to_string(),
        ObjArg::Name(n) => n.clone(),
    }
}

/// The file -O names, checked as memleak checks any object named by the user.
pub(super) fn check_obj(obj: &Path) -> Result<File> {
    if !obj.exists() {
        bail!("-O {}: no such file", obj.display());
    }
    let (file, _) = anyhow::Context::context(crate::objfile::read_elf(obj), "-O")?;
    Ok(file)
}

/// `Tracing malloc, free, ... in OBJECT (pid N)`: what object `i` is probed for; the names it
/// binds first, then those another object binds first (they are reached only through the
/// object's own internal calls, or by callers bound to it directly).
pub(super) fn tracing_line(
    pid: i32,
    i: usize,
    found: &[Found],
    cands: &[Candidate],
    scans: &[Option<Arc<Scan>>],
    only: bool,
) -> String {
    let winner = |symbol: &str| -> Option<usize> {
        (0..cands.len()).find(|&j| scans[j].as_ref().is_some_and(|s| s.found.iter().any(|f| f.symbol == symbol)))
    };
    let mut bound: Vec<&Found> = Vec::new();
    let mut other: Vec<&Found> = Vec::new();
    let mut by: Vec<String> = Vec::new();
    for f in found.iter().filter(|f| f.spec.op != Op::LinkMap) {
        match winner(&f.symbol) {
            Some(w) if w != i && !only => {
                other.push(f);
                let name = cands[w].shown.file_name().unwrap_or_default().to_string_lossy().into_owned();
                if !by.contains(&name) {
                    by.push(name);
                }
            }
            _ => bound.push(f),
        }
    }
    let shown = cands[i].shown.display();
    if bound.is_empty() {
        return format!(
            "Tracing its own {} in {shown} (pid {pid}), which {} override",
            describe(&other),
            by.join(", ")
        );
    }
    let mut line = format!("Tracing {} in {shown} (pid {pid})", describe(&bound));
    if !other.is_empty() {
        line.push_str(&format!("; also its own {}, which {} override", describe(&other), by.join(", ")));
    }
    line
}

/// Function names for a line: the C names one by one, then each family in brief.
pub(super) fn describe(found: &[&Found]) -> String {
    let (mut parts, mut internal, mut cxx, mut tc, mut mi) = (Vec::new(), 0, 0, 0, 0);
    for f in found {
        match f.spec.family {
            Family::Cxx => cxx += 1,
            Family::Tcmalloc if f.symbol.starts_with("tc_") => tc += 1,
            Family::Mimalloc if f.symbol.starts_with("mi_") => mi += 1,
            Family::C if f.symbol.starts_with("__") => internal += 1,
            Family::Ldso => {}
            _ => parts.push(f.symbol.clone()),
        }
    }
    if internal > 0 {
        parts.push(format!("__libc_* ({internal})"));
    }
    if cxx > 0 {
        parts.push(format!("operator new/delete ({cxx} forms)"));
    }
    if tc > 0 {
        parts.push(format!("tc_* ({tc})"));
    }
    if mi > 0 {
        parts.push(format!("mi_* ({mi})"));
    }
    parts.join(", ")
}
