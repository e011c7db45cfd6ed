//! Unwind tables for stacks without frame pointers: built from each object's `.eh_frame`
//! (`table`), loaded into the BPF maps per mapped object and kept current (`maps`).
pub mod maps;
pub mod table;

use std::path::{Path, PathBuf};
use std::process::Command;

use object::Object;

pub use maps::UnwindTables;

/// The objects a command will map at start: itself, its interpreter, and the libraries the
/// interpreter resolves for it (`ld.so --list`, which loads nothing and runs none of its code).
pub fn startup_objects(prog: &Path) -> Vec<PathBuf> {
    let mut out = vec![prog.to_path_buf()];
    let Ok(data) = std::fs::read(prog) else { return out };
    let Ok(file) = object::File::parse(&*data) else { return out };
    let Some(interp) = interpreter(&file) else { return out };
    out.push(PathBuf::from(&interp));
    if let Ok(o) = Command::new(&interp).arg("--list").arg(prog).output() {
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            // "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "\t/lib64/ld-linux... (0x...)"
            let target = line.split_once("=>").map_or(line, |(_, t)| t).trim();
            if let Some(path) = target.split_whitespace().next().filter(|p| p.starts_with('/')) {
                out.push(PathBuf::from(path));
            }
        }
    }
    out.dedup();
    out
}

fn interpreter(file: &object::File) -> Option<String> {
    use object::ObjectSection;
    let sec = file.section_by_name(".interp")?;
    let data = sec.data().ok()?;
    let s = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
    (!s.is_empty()).then(|| s.to_string())
}
