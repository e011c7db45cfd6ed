//! Which probes a process that runs the library does without: the functions the library
//! forwards to. For each name it interposes, dlsym(RTLD_NEXT) finds the first definition after
//! the library in the lookup order (libc's malloc, libstdc++'s operator new, a preloaded
//! jemalloc's malloc below it): the library sees every call that reaches that function through
//! its name, so a uprobe there would only trap, to find the call nested. Every other probe
//! stays: mmap, munmap, mremap and mprotect (the hybrid), the executable's own allocator (it
//! comes before the library), allocator functions under other names (jemalloc's mallocx, a
//! plugin's mimalloc), and aliases of a forwarded function under another name (tcmalloc's
//! tc_malloc is its malloc) are not traced where they are called by that name.
use crate::allocator::ProbeSet;

/// Drops from `set` the entry points the library forwards to (`set.forwarded`, found where the
/// process maps the library); returns how many.
pub fn drop_forwarded(set: &mut ProbeSet) -> usize {
    let mut dropped = 0;
    for o in set.objects.iter_mut() {
        let before = o.entries.len();
        o.entries.retain(|e| !set.forwarded.contains(&(o.file_key, e.entry_offset)));
        dropped += before - o.entries.len();
    }
    set.objects.retain(|o| !o.entries.is_empty());
    dropped
}
