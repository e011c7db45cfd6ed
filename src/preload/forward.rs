//! Which probes a process that runs the library does without: the functions the library
//! forwards to. For each name it interposes, dlsym(RTLD_NEXT) finds the first definition after
//! the library in the lookup order (libc's malloc, libstdc++'s operator new, a preloaded
//! jemalloc's malloc below it): the library sees every call that reaches that function through
//! its name, so a uprobe there would only trap, to find the call nested. Every other probe
//! stays: mmap, munmap, mremap and mprotect (the hybrid), the executable's own allocator (it
//! comes before the library), allocator functions under other names (jemalloc's mallocx,
//! mimalloc's mi_* unless aliased to a forwarded function, a plugin's allocator).
use crate::allocator::ProbeSet;

use super::layout::INTERPOSED;

/// Drops from `set` the entry points the library forwards to (it must come from a process that
/// maps the library: `set.excluded_scope`); returns how many.
pub fn drop_forwarded(set: &mut ProbeSet) -> usize {
    let Some(lib) = set.excluded_scope else { return 0 };
    // The objects after the library in the lookup order, in that order.
    let mut after: Vec<usize> = (0..set.objects.len()).filter(|&i| set.objects[i].scope.is_some_and(|s| s > lib)).collect();
    after.sort_by_key(|&i| set.objects[i].scope);
    // (object, entry offset) of each interposed name's next definition.
    let mut targets: Vec<(usize, u64)> = Vec::new();
    for name in INTERPOSED {
        let hit = after.iter().find_map(|&i| {
            set.objects[i].entries.iter().find(|e| e.names.split('/').any(|n| n == name)).map(|e| (i, e.entry_offset))
        });
        if let Some(t) = hit
            && !targets.contains(&t)
        {
            targets.push(t);
        }
    }
    let mut dropped = 0;
    for (i, o) in set.objects.iter_mut().enumerate() {
        let before = o.entries.len();
        o.entries.retain(|e| !targets.contains(&(i, e.entry_offset)));
        dropped += before - o.entries.len();
    }
    set.objects.retain(|o| !o.entries.is_empty());
    dropped
}
