//! The dynamic linker's list of loaded objects (the link map), read from a live process: the
//! order in which it looks symbols up, and what it loaded since (dlopen). Found as debuggers
//! find it: the executable's DT_DEBUG entry, which glibc's and musl's ld.so point at their
//! `r_debug`, located through the auxiliary vector (AT_PHDR, AT_PHNUM); nothing is run and
//! nothing is written to the process.
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

/// One loaded object, in link-map order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkMapEntry {
    /// The difference between its addresses in memory and in its file (0 for a non-PIE
    /// executable).
    pub bias: u64,
    /// Its path as the dynamic linker opened it; empty for the executable.
    pub name: PathBuf,
    /// The address of its dynamic section (`l_ld`): inside one of its own mappings, which is
    /// how memleak finds its file (names differ: ld.so's /lib/... is /usr/lib/... in the maps).
    pub dynamic: u64,
}

/// A process's link map as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkMap {
    pub entries: Vec<LinkMapEntry>,
    /// False while the dynamic linker is changing it (r_state RT_ADD or RT_DELETE): the list
    /// may be half done; read it again later.
    pub consistent: bool,
}

const AT_PHDR: u64 = 3;
const AT_PHNUM: u64 = 5;
const PT_DYNAMIC: u32 = 2;
const PT_PHDR: u32 = 6;
const DT_NULL: u64 = 0;
const DT_DEBUG: u64 = 21;
/// Objects a link map holds at most (a guard against a corrupt or cyclic list).
const MAX_OBJECTS: usize = 4096;

/// Reads `buf.len()` bytes of process `pid` at `addr`.
pub fn read_memory(pid: i32, addr: u64, buf: &mut [u8]) -> Result<()> {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: one local iovec over `buf`, which the kernel writes at most buf.len() bytes of.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("reading process {pid} at {addr:#x}"));
    }
    if n as usize != buf.len() {
        bail!("reading process {pid} at {addr:#x}: {n} of {} bytes", buf.len());
    }
    Ok(())
}

fn read_u64(pid: i32, addr: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    read_memory(pid, addr, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A NUL-terminated string of the process, at most 4 KiB.
fn read_c_string(pid: i32, addr: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < 4096 {
        // Up to the end of the page, so that a string near an unmapped page still reads.
        let chunk = (4096 - (at & 4095)) as usize;
        let mut b = vec![0u8; chunk.min(4096 - out.len())];
        read_memory(pid, at, &mut b)?;
        if let Some(end) = b.iter().position(|&c| c == 0) {
            out.extend_from_slice(&b[..end]);
            return Ok(out);
        }
        out.extend_from_slice(&b);
        at += b.len() as u64;
    }
    bail!("a name of more than 4096 bytes at {addr:#x}")
}

/// The auxiliary vector entry `key` of process `pid`.
fn auxv(pid: i32, key: u64) -> Result<u64> {
    let data = std::fs::read(format!("/proc/{pid}/auxv")).with_context(|| format!("cannot read /proc/{pid}/auxv"))?;
    data.chunks_exact(16)
        .map(|c| (u64::from_ne_bytes(c[..8].try_into().unwrap()), u64::from_ne_bytes(c[8..].try_into().unwrap())))
        .find(|&(k, _)| k == key)
        .map(|(_, v)| v)
        .with_context(|| format!("process {pid} has no auxiliary vector entry {key}"))
}

/// The address of the process's `r_debug`, or None for a statically linked process (no
/// dynamic section) or one whose dynamic linker has not filled DT_DEBUG in yet.
fn r_debug(pid: i32) -> Result<Option<u64>> {
    let phdr = auxv(pid, AT_PHDR)?;
    let phnum = auxv(pid, AT_PHNUM)?.min(256);
    let mut headers = vec![0u8; phnum as usize * 56];
    read_memory(pid, phdr, &mut headers).context("the executable's program headers")?;
    let field = |h: &[u8], at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap());
    let mut bias = None;
    let mut dynamic = None;
    for h in headers.chunks_exact(56) {
        let kind = u32::from_le_bytes(h[..4].try_into().unwrap());
        let vaddr = field(h, 16);
        match kind {
            PT_PHDR => bias = Some(phdr.wrapping_sub(vaddr)),
            PT_DYNAMIC => dynamic = Some(vaddr),
            _ => {}
        }
    }
    let Some(dynamic) = dynamic else { return Ok(None) };
    // Without PT_PHDR (rare), the headers follow the ELF header at the start of the image.
    let bias = bias.unwrap_or_else(|| phdr.wrapping_sub(64));
    let mut at = dynamic.wrapping_add(bias);
    for _ in 0..1024 {
        let tag = read_u64(pid, at)?;
        if tag == DT_NULL {
            return Ok(None);
        }
        if tag == DT_DEBUG {
            let v = read_u64(pid, at + 8)?;
            return Ok((v != 0).then_some(v));
        }
        at += 16;
    }
    Ok(None)
}

/// The link map of process `pid`, in the dynamic linker's order: the executable first, then
/// the objects in the order they were loaded. Empty for a statically linked process.
pub fn read(pid: i32) -> Result<LinkMap> {
    let Some(r_debug) = r_debug(pid)? else { return Ok(LinkMap { entries: Vec::new(), consistent: true }) };
    // struct r_debug { int r_version; struct link_map *r_map; ElfW(Addr) r_brk; enum r_state; ... }
    let mut head = [0u8; 32];
    read_memory(pid, r_debug, &mut head)?;
    let mut node = u64::from_le_bytes(head[8..16].try_into().unwrap());
    let consistent = u32::from_le_bytes(head[24..28].try_into().unwrap()) == 0; // RT_CONSISTENT
    let mut out = Vec::new();
    while node != 0 {
        if out.len() >= MAX_OBJECTS {
            bail!("process {pid}'s link map has more than {MAX_OBJECTS} objects");
        }
        // struct link_map { l_addr; char *l_name; l_ld; l_next; l_prev; }
        let mut head = [0u8; 40];
        read_memory(pid, node, &mut head)?;
        let word = |i: usize| u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().unwrap());
        let name_at = word(1);
        let name = if name_at == 0 { Vec::new() } else { read_c_string(pid, name_at)? };
        use std::os::unix::ffi::OsStringExt;
        out.push(LinkMapEntry {
            bias: word(0),
            name: PathBuf::from(std::ffi::OsString::from_vec(name)),
            dynamic: word(2),
        });
        node = word(3);
    }
    Ok(LinkMap { entries: out, consistent })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_link_map() {
        let me = std::process::id() as i32;
        let lm = read(me).expect("own link map");
        assert!(lm.consistent);
        let map = lm.entries;
        assert!(map.len() >= 3, "{map:?}");
        assert_eq!(map[0].name, PathBuf::new(), "the executable comes first, unnamed");
        let names: Vec<String> = map.iter().map(|e| e.name.to_string_lossy().into_owned()).collect();
        let libc = names.iter().position(|n| n.contains("libc.so")).expect("libc loaded");
        let ld = names.iter().position(|n| n.contains("ld-linux")).expect("the dynamic linker listed");
        assert!(libc > 0 && ld > 0, "{names:?}");
        // A PIE test binary: its first PT_LOAD is at address 0, so its bias is where its first
        // mapping starts.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let first = maps.lines().next().unwrap();
        let start = u64::from_str_radix(first.split('-').next().unwrap(), 16).unwrap();
        assert_eq!(map[0].bias, start);
        // Each object's dynamic section lies in one of its file's mappings.
        let maps = crate::procmaps::ProcMaps::read(me).unwrap();
        let libc_map = maps.find(map[libc].dynamic).expect("libc's dynamic section is mapped");
        assert!(libc_map.path.as_deref().is_some_and(|p| p.to_string_lossy().contains("libc.so")), "{libc_map:?}");
    }
}
