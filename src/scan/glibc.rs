//! Memory glibc's allocator owns besides the blocks it handed out: the brk heap of the main
//! arena, and the heaps of the other arenas (threads' arenas: 64 MiB-aligned mappings that
//! begin with a `heap_info` header). Free chunks and the allocator's own state live there;
//! their stale pointers must not count as roots.
use super::memory::{self, PAGE, Reader, Region};

/// glibc's HEAP_MAX_SIZE on 64-bit: 2 * DEFAULT_MMAP_THRESHOLD_MAX (2 * 32 MiB).
const HEAP_MAX: u64 = 64 << 20;

/// Ranges owned by the allocator, sorted: `[heap]`, and each arena heap holding a block.
pub fn owned(regions: &[Region], blocks: &[(u64, u64)], reader: &Reader) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> =
        regions.iter().filter(|r| r.name.as_deref() == Some("[heap]")).map(|r| (r.start, r.end)).collect();
    let rw_anon = |a: u64| memory::find(regions, a).is_some_and(|r| r.read && r.write && r.is_anonymous());
    let mut last_base = u64::MAX;
    for &(addr, _) in blocks {
        let base = addr & !(HEAP_MAX - 1);
        if base == last_base || out.iter().any(|&(s, e)| addr >= s && addr < e) {
            continue;
        }
        last_base = base;
        // heap_info: ar_ptr, prev, size, mprotect_size.
        if !rw_anon(base) {
            continue;
        }
        let w = |k: u64| reader.word(base + 8 * k);
        let (Some(ar), Some(prev), Some(size), Some(mprot)) = (w(0), w(1), w(2), w(3)) else { continue };
        let valid = ar != 0
            && rw_anon(ar)
            && (prev == 0 || prev % HEAP_MAX == 0)
            && size > 0
            && size % PAGE == 0
            && mprot % PAGE == 0
            && size <= mprot
            && mprot <= HEAP_MAX
            && addr < base + mprot;
        if valid {
            out.push((base, base + mprot));
        }
    }
    out.sort_unstable();
    out
}
