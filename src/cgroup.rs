//! --cgroup: the processes of a cgroup v2 (a container, a systemd unit), read from its
//! cgroup.procs and those of the cgroups below it.
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup on most systems; under it, at
/// /sys/fs/cgroup/unified, on hybrid ones), from /proc/self/mountinfo.
pub fn root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        // "36 25 0:31 / /sys/fs/cgroup/unified rw,... shared:10 - cgroup2 cgroup2 rw"
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The cgroup directory `arg` names: a path in the cgroup v2 hierarchy, absolute or relative
/// to its mount (`system.slice/foo.service`).
pub fn resolve(arg: &Path) -> Result<PathBuf> {
    let Some(root) = root() else {
        bail!("--cgroup {}: this system has no cgroup v2 hierarchy mounted", arg.display())
    };
    let dir = if arg.is_absolute() { arg.to_path_buf() } else { root.join(arg) };
    let dir = std::fs::canonicalize(&dir).map_err(|e| anyhow::anyhow!("--cgroup {}: {e}", arg.display()))?;
    if !dir.starts_with(&root) || !dir.join("cgroup.procs").is_file() {
        bail!("--cgroup {}: not a cgroup of the cgroup v2 hierarchy ({})", arg.display(), root.display());
    }
    Ok(dir)
}

/// The processes of cgroup `dir` and of every cgroup below it.
pub fn members(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            todo.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_cgroup_holds_this_process_somewhere_below() {
        let root = resolve(&super::root().expect("cgroup v2 here")).expect("its root is a cgroup");
        let me = std::process::id() as i32;
        assert!(members(&root).contains(&me));
        assert!(resolve(Path::new("/tmp")).is_err());
        assert!(resolve(Path::new("no-such-cgroup-here")).is_err());
    }
}
