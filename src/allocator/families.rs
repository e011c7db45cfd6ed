//! The allocator functions memleak knows, family by family, with what each call means: which
//! argument holds the size (and a count multiplying it), which the block, and what the return
//! value is. One BPF program serves them all: the BPF cookie of each probe carries this
//! meaning (`Spec::cookie`), so a new function is a new row here, not new BPF code.
//!
//! Families: the C library's (glibc, musl: also what tcmalloc, jemalloc and mimalloc export
//! under the same names), C++'s `operator new`/`delete` in every standard form, jemalloc's
//! non-standard API (with or without the `je_` prefix), tcmalloc's `tc_*` and mimalloc's `mi_*`.

/// What a call does to the blocks of its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Returns a new block of `size` (times `count`) bytes, or NULL.
    Alloc,
    /// Ends the block `ptr`.
    Free,
    /// Returns a block of `size` (times `count`) bytes that replaces `ptr`: on success `ptr` is
    /// gone (unless the same address came back); a NULL return with a size of 0 freed `ptr`
    /// (glibc's realloc(p, 0)); a NULL return otherwise left `ptr` alone.
    Realloc,
    /// As `Realloc`, but `ptr` is freed on failure too (reallocf).
    ReallocF,
    /// posix_memalign: the block is stored at `*ptr`, the return value is an error number.
    MemalignOut,
    /// mmap(addr, len, prot, flags, fd, off): a mapping of `size` bytes; PROT_NONE anonymous
    /// reservations are address space, not allocations.
    Mmap,
    /// munmap(addr, len): ends exactly the part of any mapping in the range.
    Munmap,
    /// mremap(old, old_size, new_size, flags, new_addr).
    Mremap,
    /// mprotect(addr, len, prot): PROT_NONE takes pages out of the totals, access given to
    /// reserved pages counts them.
    Mprotect,
    /// The dynamic linker's `_dl_debug_state`, called after every change of the link map
    /// (dlopen, dlclose): not an allocator function; it tells memleak to look for new objects.
    LinkMap,
}

impl Op {
    /// The BPF side's number for it (src/bpf/memleak.h, enum alloc_op).
    pub fn code(self) -> u64 {
        match self {
            Op::Alloc => 1,
            Op::Free => 2,
            Op::Realloc => 3,
            Op::ReallocF => 4,
            Op::MemalignOut => 5,
            Op::Mmap => 6,
            Op::Munmap => 7,
            Op::Mremap => 8,
            Op::Mprotect => 9,
            Op::LinkMap => 10,
        }
    }

    /// Whether the call's return must be seen (everything but ending or changing blocks).
    pub fn needs_return(self) -> bool {
        !matches!(self, Op::Free | Op::Munmap | Op::Mprotect | Op::LinkMap)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// malloc, free, ... as the C library names them (whichever object defines them).
    C,
    /// operator new / delete.
    Cxx,
    Jemalloc,
    Tcmalloc,
    Mimalloc,
    /// The dynamic linker's debugger interface (not an allocator).
    Ldso,
}

/// One function: its symbol and the meaning of its arguments (1-based; 0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Spec {
    pub symbol: &'static str,
    /// How reports and -v name it (C++ symbols are mangled).
    pub display: &'static str,
    pub family: Family,
    pub op: Op,
    pub size: u8,
    pub count: u8,
    pub ptr: u8,
}

impl Spec {
    /// The BPF cookie: op in bits 0-7, the size, count and block argument numbers in bits
    /// 8-11, 12-15 and 16-19, and `id` (memleak's number for the probed function) in bits 32-63.
    pub fn cookie(&self, id: u32) -> u64 {
        self.cookie_at(id, &[0, 1, 2, 3, 4, 5, 6])
    }

    /// The cookie of a probe placed where argument n is in argument register `regs[n]` (the
    /// function's code copied it there before the probed instruction: placement.rs).
    pub fn cookie_at(&self, id: u32, regs: &[u8; 7]) -> u64 {
        let at = |n: u8| u64::from(regs[usize::from(n).min(6)]) * u64::from(n != 0);
        self.op.code() | at(self.size) << 8 | at(self.count) << 12 | at(self.ptr) << 16 | u64::from(id) << 32
    }

    /// The arguments its probe reads; whether they may be read from wherever the code moved
    /// them (the BPF program reads the heap functions' at the registers the cookie names, the
    /// mapping functions' at fixed ones).
    pub fn reads(&self) -> crate::placement::Reads<'static> {
        use crate::placement::Reads;
        const NONE: &[u8] = &[];
        match self.op {
            Op::Mmap => Reads { args: &[2, 3, 4], movable: false },
            Op::Munmap => Reads { args: &[1, 2], movable: false },
            Op::Mremap => Reads { args: &[1, 2, 3, 4], movable: false },
            Op::Mprotect => Reads { args: &[1, 2, 3], movable: false },
            Op::LinkMap => Reads { args: NONE, movable: false },
            _ => {
                // Every combination the table uses, as static slices.
                const SETS: &[&[u8]] =
                    &[&[], &[1], &[2], &[3], &[4], &[1, 2], &[1, 3], &[2, 3], &[2, 4], &[3, 4], &[1, 2, 3], &[2, 3, 4]];
                let mut want: Vec<u8> = [self.size, self.count, self.ptr].into_iter().filter(|&a| a != 0).collect();
                want.sort();
                want.dedup();
                let args = SETS.iter().find(|s| **s == want.as_slice()).copied().unwrap_or(&[1, 2, 3, 4, 5, 6]);
                Reads { args, movable: true }
            }
        }
    }
}

const fn f(symbol: &'static str, display: &'static str, family: Family, op: Op, size: u8, count: u8, ptr: u8) -> Spec {
    Spec { symbol, display, family, op, size, count, ptr }
}

use Family::{C, Cxx, Jemalloc as Je, Ldso, Mimalloc as Mi, Tcmalloc as Tc};
use Op::*;

/// Every function memleak probes where an object defines it. Aliases (the same code under two
/// names, e.g. glibc's memalign and aligned_alloc, tcmalloc's tc_malloc and malloc) are probed
/// once, by address.
pub const SPECS: &[Spec] = &[
    // The C library's names.
    f("malloc", "malloc", C, Alloc, 1, 0, 0),
    f("calloc", "calloc", C, Alloc, 2, 1, 0),
    f("realloc", "realloc", C, Realloc, 2, 0, 1),
    f("reallocarray", "reallocarray", C, Realloc, 3, 2, 1),
    f("reallocf", "reallocf", C, ReallocF, 2, 0, 1),
    f("posix_memalign", "posix_memalign", C, MemalignOut, 3, 0, 1),
    f("aligned_alloc", "aligned_alloc", C, Alloc, 2, 0, 0),
    f("memalign", "memalign", C, Alloc, 2, 0, 0),
    f("valloc", "valloc", C, Alloc, 1, 0, 0),
    f("pvalloc", "pvalloc", C, Alloc, 1, 0, 0),
    f("free", "free", C, Free, 0, 0, 1),
    f("cfree", "cfree", C, Free, 0, 0, 1),
    f("mmap", "mmap", C, Mmap, 2, 0, 0),
    f("mmap64", "mmap64", C, Mmap, 2, 0, 0),
    f("munmap", "munmap", C, Munmap, 2, 0, 1),
    f("mremap", "mremap", C, Mremap, 3, 0, 1),
    f("mprotect", "mprotect", C, Mprotect, 2, 0, 1),
    // glibc's internal names, which programs and allocators call (tcmalloc and mimalloc
    // define them too).
    f("__libc_malloc", "__libc_malloc", C, Alloc, 1, 0, 0),
    f("__libc_calloc", "__libc_calloc", C, Alloc, 2, 1, 0),
    f("__libc_realloc", "__libc_realloc", C, Realloc, 2, 0, 1),
    f("__libc_memalign", "__libc_memalign", C, Alloc, 2, 0, 0),
    f("__libc_valloc", "__libc_valloc", C, Alloc, 1, 0, 0),
    f("__libc_pvalloc", "__libc_pvalloc", C, Alloc, 1, 0, 0),
    f("__libc_free", "__libc_free", C, Free, 0, 0, 1),
    f("__libc_cfree", "__libc_cfree", C, Free, 0, 0, 1),
    f("__posix_memalign", "__posix_memalign", C, MemalignOut, 3, 0, 1),
    // C++: operator new and new[] (plain, nothrow, aligned, aligned nothrow), operator delete
    // and delete[] (plain, sized, aligned, sized aligned, nothrow, aligned nothrow).
    f("_Znwm", "operator new(unsigned long)", Cxx, Alloc, 1, 0, 0),
    f("_Znam", "operator new[](unsigned long)", Cxx, Alloc, 1, 0, 0),
    f("_ZnwmRKSt9nothrow_t", "operator new(unsigned long, std::nothrow_t const&)", Cxx, Alloc, 1, 0, 0),
    f("_ZnamRKSt9nothrow_t", "operator new[](unsigned long, std::nothrow_t const&)", Cxx, Alloc, 1, 0, 0),
    f("_ZnwmSt11align_val_t", "operator new(unsigned long, std::align_val_t)", Cxx, Alloc, 1, 0, 0),
    f("_ZnamSt11align_val_t", "operator new[](unsigned long, std::align_val_t)", Cxx, Alloc, 1, 0, 0),
    f(
        "_ZnwmSt11align_val_tRKSt9nothrow_t",
        "operator new(unsigned long, std::align_val_t, std::nothrow_t const&)",
        Cxx,
        Alloc,
        1,
        0,
        0,
    ),
    f(
        "_ZnamSt11align_val_tRKSt9nothrow_t",
        "operator new[](unsigned long, std::align_val_t, std::nothrow_t const&)",
        Cxx,
        Alloc,
        1,
        0,
        0,
    ),
    f("_ZdlPv", "operator delete(void*)", Cxx, Free, 0, 0, 1),
    f("_ZdaPv", "operator delete[](void*)", Cxx, Free, 0, 0, 1),
    f("_ZdlPvm", "operator delete(void*, unsigned long)", Cxx, Free, 0, 0, 1),
    f("_ZdaPvm", "operator delete[](void*, unsigned long)", Cxx, Free, 0, 0, 1),
    f("_ZdlPvSt11align_val_t", "operator delete(void*, std::align_val_t)", Cxx, Free, 0, 0, 1),
    f("_ZdaPvSt11align_val_t", "operator delete[](void*, std::align_val_t)", Cxx, Free, 0, 0, 1),
    f("_ZdlPvmSt11align_val_t", "operator delete(void*, unsigned long, std::align_val_t)", Cxx, Free, 0, 0, 1),
    f("_ZdaPvmSt11align_val_t", "operator delete[](void*, unsigned long, std::align_val_t)", Cxx, Free, 0, 0, 1),
    f("_ZdlPvRKSt9nothrow_t", "operator delete(void*, std::nothrow_t const&)", Cxx, Free, 0, 0, 1),
    f("_ZdaPvRKSt9nothrow_t", "operator delete[](void*, std::nothrow_t const&)", Cxx, Free, 0, 0, 1),
    f(
        "_ZdlPvSt11align_val_tRKSt9nothrow_t",
        "operator delete(void*, std::align_val_t, std::nothrow_t const&)",
        Cxx,
        Free,
        0,
        0,
        1,
    ),
    f(
        "_ZdaPvSt11align_val_tRKSt9nothrow_t",
        "operator delete[](void*, std::align_val_t, std::nothrow_t const&)",
        Cxx,
        Free,
        0,
        0,
        1,
    ),
    // jemalloc's own API (mallocx(size, flags), rallocx(ptr, size, flags), sdallocx(ptr, size,
    // flags), dallocx(ptr, flags)), and its prefixed build (je_*).
    f("mallocx", "mallocx", Je, Alloc, 1, 0, 0),
    f("rallocx", "rallocx", Je, Realloc, 2, 0, 1),
    f("sdallocx", "sdallocx", Je, Free, 0, 0, 1),
    f("dallocx", "dallocx", Je, Free, 0, 0, 1),
    f("je_malloc", "je_malloc", Je, Alloc, 1, 0, 0),
    f("je_calloc", "je_calloc", Je, Alloc, 2, 1, 0),
    f("je_realloc", "je_realloc", Je, Realloc, 2, 0, 1),
    f("je_posix_memalign", "je_posix_memalign", Je, MemalignOut, 3, 0, 1),
    f("je_aligned_alloc", "je_aligned_alloc", Je, Alloc, 2, 0, 0),
    f("je_memalign", "je_memalign", Je, Alloc, 2, 0, 0),
    f("je_valloc", "je_valloc", Je, Alloc, 1, 0, 0),
    f("je_free", "je_free", Je, Free, 0, 0, 1),
    f("je_mallocx", "je_mallocx", Je, Alloc, 1, 0, 0),
    f("je_rallocx", "je_rallocx", Je, Realloc, 2, 0, 1),
    f("je_sdallocx", "je_sdallocx", Je, Free, 0, 0, 1),
    f("je_dallocx", "je_dallocx", Je, Free, 0, 0, 1),
    // tcmalloc (gperftools): tc_* beside the standard names.
    f("tc_malloc", "tc_malloc", Tc, Alloc, 1, 0, 0),
    f("tc_calloc", "tc_calloc", Tc, Alloc, 2, 1, 0),
    f("tc_realloc", "tc_realloc", Tc, Realloc, 2, 0, 1),
    f("tc_memalign", "tc_memalign", Tc, Alloc, 2, 0, 0),
    f("tc_posix_memalign", "tc_posix_memalign", Tc, MemalignOut, 3, 0, 1),
    f("tc_valloc", "tc_valloc", Tc, Alloc, 1, 0, 0),
    f("tc_pvalloc", "tc_pvalloc", Tc, Alloc, 1, 0, 0),
    f("tc_malloc_skip_new_handler", "tc_malloc_skip_new_handler", Tc, Alloc, 1, 0, 0),
    f("tc_free", "tc_free", Tc, Free, 0, 0, 1),
    f("tc_free_sized", "tc_free_sized", Tc, Free, 0, 0, 1),
    f("tc_cfree", "tc_cfree", Tc, Free, 0, 0, 1),
    f("tc_new", "tc_new", Tc, Alloc, 1, 0, 0),
    f("tc_newarray", "tc_newarray", Tc, Alloc, 1, 0, 0),
    f("tc_new_nothrow", "tc_new_nothrow", Tc, Alloc, 1, 0, 0),
    f("tc_newarray_nothrow", "tc_newarray_nothrow", Tc, Alloc, 1, 0, 0),
    f("tc_new_aligned", "tc_new_aligned", Tc, Alloc, 1, 0, 0),
    f("tc_newarray_aligned", "tc_newarray_aligned", Tc, Alloc, 1, 0, 0),
    f("tc_new_aligned_nothrow", "tc_new_aligned_nothrow", Tc, Alloc, 1, 0, 0),
    f("tc_newarray_aligned_nothrow", "tc_newarray_aligned_nothrow", Tc, Alloc, 1, 0, 0),
    f("tc_delete", "tc_delete", Tc, Free, 0, 0, 1),
    f("tc_deletearray", "tc_deletearray", Tc, Free, 0, 0, 1),
    f("tc_delete_sized", "tc_delete_sized", Tc, Free, 0, 0, 1),
    f("tc_deletearray_sized", "tc_deletearray_sized", Tc, Free, 0, 0, 1),
    f("tc_delete_nothrow", "tc_delete_nothrow", Tc, Free, 0, 0, 1),
    f("tc_deletearray_nothrow", "tc_deletearray_nothrow", Tc, Free, 0, 0, 1),
    f("tc_delete_aligned", "tc_delete_aligned", Tc, Free, 0, 0, 1),
    f("tc_deletearray_aligned", "tc_deletearray_aligned", Tc, Free, 0, 0, 1),
    f("tc_delete_sized_aligned", "tc_delete_sized_aligned", Tc, Free, 0, 0, 1),
    f("tc_deletearray_sized_aligned", "tc_deletearray_sized_aligned", Tc, Free, 0, 0, 1),
    f("tc_delete_aligned_nothrow", "tc_delete_aligned_nothrow", Tc, Free, 0, 0, 1),
    f("tc_deletearray_aligned_nothrow", "tc_deletearray_aligned_nothrow", Tc, Free, 0, 0, 1),
    // mimalloc: mi_* (the mi_heap_* forms take the heap first).
    f("mi_malloc", "mi_malloc", Mi, Alloc, 1, 0, 0),
    f("mi_zalloc", "mi_zalloc", Mi, Alloc, 1, 0, 0),
    f("mi_calloc", "mi_calloc", Mi, Alloc, 2, 1, 0),
    f("mi_mallocn", "mi_mallocn", Mi, Alloc, 2, 1, 0),
    f("mi_malloc_small", "mi_malloc_small", Mi, Alloc, 1, 0, 0),
    f("mi_zalloc_small", "mi_zalloc_small", Mi, Alloc, 1, 0, 0),
    f("mi_malloc_aligned", "mi_malloc_aligned", Mi, Alloc, 1, 0, 0),
    f("mi_malloc_aligned_at", "mi_malloc_aligned_at", Mi, Alloc, 1, 0, 0),
    f("mi_zalloc_aligned", "mi_zalloc_aligned", Mi, Alloc, 1, 0, 0),
    f("mi_zalloc_aligned_at", "mi_zalloc_aligned_at", Mi, Alloc, 1, 0, 0),
    f("mi_calloc_aligned", "mi_calloc_aligned", Mi, Alloc, 2, 1, 0),
    f("mi_calloc_aligned_at", "mi_calloc_aligned_at", Mi, Alloc, 2, 1, 0),
    f("mi_aligned_alloc", "mi_aligned_alloc", Mi, Alloc, 2, 0, 0),
    f("mi_memalign", "mi_memalign", Mi, Alloc, 2, 0, 0),
    f("mi_valloc", "mi_valloc", Mi, Alloc, 1, 0, 0),
    f("mi_pvalloc", "mi_pvalloc", Mi, Alloc, 1, 0, 0),
    f("mi_posix_memalign", "mi_posix_memalign", Mi, MemalignOut, 3, 0, 1),
    f("mi_realloc", "mi_realloc", Mi, Realloc, 2, 0, 1),
    f("mi_reallocn", "mi_reallocn", Mi, Realloc, 3, 2, 1),
    f("mi_reallocf", "mi_reallocf", Mi, ReallocF, 2, 0, 1),
    f("mi_reallocarray", "mi_reallocarray", Mi, Realloc, 3, 2, 1),
    f("mi_rezalloc", "mi_rezalloc", Mi, Realloc, 2, 0, 1),
    f("mi_recalloc", "mi_recalloc", Mi, Realloc, 3, 2, 1),
    f("mi_realloc_aligned", "mi_realloc_aligned", Mi, Realloc, 2, 0, 1),
    f("mi_realloc_aligned_at", "mi_realloc_aligned_at", Mi, Realloc, 2, 0, 1),
    f("mi_rezalloc_aligned", "mi_rezalloc_aligned", Mi, Realloc, 2, 0, 1),
    f("mi_rezalloc_aligned_at", "mi_rezalloc_aligned_at", Mi, Realloc, 2, 0, 1),
    f("mi_recalloc_aligned", "mi_recalloc_aligned", Mi, Realloc, 3, 2, 1),
    f("mi_recalloc_aligned_at", "mi_recalloc_aligned_at", Mi, Realloc, 3, 2, 1),
    f("mi_new", "mi_new", Mi, Alloc, 1, 0, 0),
    f("mi_new_nothrow", "mi_new_nothrow", Mi, Alloc, 1, 0, 0),
    f("mi_new_aligned", "mi_new_aligned", Mi, Alloc, 1, 0, 0),
    f("mi_new_aligned_nothrow", "mi_new_aligned_nothrow", Mi, Alloc, 1, 0, 0),
    f("mi_new_n", "mi_new_n", Mi, Alloc, 2, 1, 0),
    f("mi_new_realloc", "mi_new_realloc", Mi, Realloc, 2, 0, 1),
    f("mi_new_reallocn", "mi_new_reallocn", Mi, Realloc, 3, 2, 1),
    f("mi_free", "mi_free", Mi, Free, 0, 0, 1),
    f("mi_cfree", "mi_cfree", Mi, Free, 0, 0, 1),
    f("mi_free_size", "mi_free_size", Mi, Free, 0, 0, 1),
    f("mi_free_aligned", "mi_free_aligned", Mi, Free, 0, 0, 1),
    f("mi_free_size_aligned", "mi_free_size_aligned", Mi, Free, 0, 0, 1),
    f("vfree", "vfree", Mi, Free, 0, 0, 1),
    f("mi_heap_malloc", "mi_heap_malloc", Mi, Alloc, 2, 0, 0),
    f("mi_heap_zalloc", "mi_heap_zalloc", Mi, Alloc, 2, 0, 0),
    f("mi_heap_calloc", "mi_heap_calloc", Mi, Alloc, 3, 2, 0),
    f("mi_heap_mallocn", "mi_heap_mallocn", Mi, Alloc, 3, 2, 0),
    f("mi_heap_malloc_small", "mi_heap_malloc_small", Mi, Alloc, 2, 0, 0),
    f("mi_heap_malloc_aligned", "mi_heap_malloc_aligned", Mi, Alloc, 2, 0, 0),
    f("mi_heap_malloc_aligned_at", "mi_heap_malloc_aligned_at", Mi, Alloc, 2, 0, 0),
    f("mi_heap_zalloc_aligned", "mi_heap_zalloc_aligned", Mi, Alloc, 2, 0, 0),
    f("mi_heap_zalloc_aligned_at", "mi_heap_zalloc_aligned_at", Mi, Alloc, 2, 0, 0),
    f("mi_heap_calloc_aligned", "mi_heap_calloc_aligned", Mi, Alloc, 3, 2, 0),
    f("mi_heap_calloc_aligned_at", "mi_heap_calloc_aligned_at", Mi, Alloc, 3, 2, 0),
    f("mi_heap_realloc", "mi_heap_realloc", Mi, Realloc, 3, 0, 2),
    f("mi_heap_reallocn", "mi_heap_reallocn", Mi, Realloc, 4, 3, 2),
    f("mi_heap_reallocf", "mi_heap_reallocf", Mi, ReallocF, 3, 0, 2),
    f("mi_heap_rezalloc", "mi_heap_rezalloc", Mi, Realloc, 3, 0, 2),
    f("mi_heap_recalloc", "mi_heap_recalloc", Mi, Realloc, 4, 3, 2),
    f("mi_heap_realloc_aligned", "mi_heap_realloc_aligned", Mi, Realloc, 3, 0, 2),
    f("mi_heap_realloc_aligned_at", "mi_heap_realloc_aligned_at", Mi, Realloc, 3, 0, 2),
    f("mi_heap_rezalloc_aligned", "mi_heap_rezalloc_aligned", Mi, Realloc, 3, 0, 2),
    f("mi_heap_rezalloc_aligned_at", "mi_heap_rezalloc_aligned_at", Mi, Realloc, 3, 0, 2),
    f("mi_heap_recalloc_aligned", "mi_heap_recalloc_aligned", Mi, Realloc, 4, 3, 2),
    f("mi_heap_recalloc_aligned_at", "mi_heap_recalloc_aligned_at", Mi, Realloc, 4, 3, 2),
    f("mi_heap_alloc_new", "mi_heap_alloc_new", Mi, Alloc, 2, 0, 0),
    f("mi_heap_alloc_new_n", "mi_heap_alloc_new_n", Mi, Alloc, 3, 2, 0),
    // glibc's and musl's dynamic linker: called after each change of the link map.
    f("_dl_debug_state", "_dl_debug_state", Ldso, LinkMap, 0, 0, 0),
];

/// The functions looked for in an object, by symbol: every row of the table, or with an -S
/// prefix the C library's standard names with the prefix (`je_malloc`, ..., in table order),
/// and the dynamic linker's hook, which is not an allocator function.
pub fn wanted(prefix: &str) -> Vec<(String, Spec)> {
    if prefix.is_empty() {
        return SPECS.iter().map(|s| (s.symbol.to_string(), *s)).collect();
    }
    SPECS
        .iter()
        .filter(|s| (s.family == Family::C && !s.symbol.starts_with("__")) || s.family == Family::Ldso)
        .map(|s| {
            let name = if s.family == Family::Ldso { s.symbol.to_string() } else { format!("{prefix}{}", s.symbol) };
            (name, *s)
        })
        .collect()
}

/// The spec of `symbol` among [`wanted`]`(prefix)`.
#[cfg(test)]
pub fn spec_of(symbol: &str, prefix: &str) -> Option<Spec> {
    wanted(prefix).into_iter().find(|(name, _)| name == symbol).map(|(_, s)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_symbol_once_and_arguments_in_range() {
        let mut seen = std::collections::HashSet::new();
        for s in SPECS {
            assert!(seen.insert(s.symbol), "{} twice", s.symbol);
            assert!(s.size <= 6 && s.count <= 6 && s.ptr <= 6, "{s:?}");
            match s.op {
                Op::Alloc => assert!(s.size > 0 && s.ptr == 0, "{s:?}"),
                Op::Free => assert!(s.ptr > 0 && s.size == 0, "{s:?}"),
                Op::Realloc | Op::ReallocF | Op::MemalignOut | Op::Mremap => {
                    assert!(s.ptr > 0 && s.size > 0, "{s:?}")
                }
                Op::Mmap | Op::Munmap | Op::Mprotect => assert!(s.size == 2, "{s:?}"),
                Op::LinkMap => assert!(s.size == 0 && s.ptr == 0, "{s:?}"),
            }
            if s.count > 0 {
                assert_ne!(s.count, s.size, "{s:?}");
            }
        }
    }

    #[test]
    fn every_row_reads_exactly_its_arguments() {
        for s in SPECS {
            let r = s.reads();
            for a in [s.size, s.count, s.ptr].into_iter().filter(|&a| a != 0) {
                assert!(r.args.contains(&a), "{s:?} reads {:?}", r.args);
            }
            if r.movable {
                assert!(r.args.len() <= 3, "{s:?}: a set the table lacks: {:?}", r.args);
            }
        }
    }

    #[test]
    fn a_moved_argument_is_named_where_it_is() {
        let malloc = spec_of("malloc", "").unwrap();
        // The size moved from rdi to rsi before the probed instruction.
        assert_eq!(malloc.cookie_at(3, &[0, 2, 2, 3, 4, 5, 6]), 1 | 2 << 8 | 3 << 32);
        let calloc = spec_of("calloc", "").unwrap();
        assert_eq!(calloc.cookie_at(0, &[0, 1, 2, 3, 4, 5, 6]), calloc.cookie(0));
    }

    #[test]
    fn cookies_carry_the_meaning() {
        let calloc = spec_of("calloc", "").unwrap();
        assert_eq!(calloc.cookie(7), 1 | 2 << 8 | 1 << 12 | 7 << 32);
        let heap_realloc = spec_of("mi_heap_reallocn", "").unwrap();
        assert_eq!(heap_realloc.cookie(0), 3 | 4 << 8 | 3 << 12 | 2 << 16);
        assert!(!spec_of("free", "").unwrap().op.needs_return());
        assert!(spec_of("_Znwm", "").unwrap().op.needs_return());
    }

    #[test]
    fn a_prefix_maps_its_names_onto_the_c_ones() {
        let s = spec_of("my_malloc", "my_").expect("prefixed malloc");
        assert_eq!((s.op, s.size), (Op::Alloc, 1));
        assert!(spec_of("malloc", "my_").is_none());
        assert!(spec_of("my__Znwm", "my_").is_none(), "only the C names take a prefix");
        assert!(spec_of("my___libc_malloc", "my_").is_none(), "glibc's internal names take none");
        assert_eq!(spec_of("_dl_debug_state", "my_").map(|s| s.op), Some(Op::LinkMap));
        let names: Vec<String> = wanted("pool_").into_iter().map(|(n, _)| n).take(3).collect();
        assert_eq!(names, ["pool_malloc", "pool_calloc", "pool_realloc"]);
    }
}
