/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Types shared by the BPF programs and the Rust collector: the one definition of each. */
#ifndef MEMLEAK_H
#define MEMLEAK_H

#define MAX_STACK_DEPTH 127

/*
 * The BPF cookie of every user-mode probe: what the call does and where its arguments are
 * (src/allocator/families.rs, Spec::cookie): op in bits 0-7, the registers holding the size, a
 * count multiplying it and the block at the probed instruction in bits 8-11, 12-15 and 16-19
 * (0: none; 1-6: the argument registers rdi, rsi, rdx, rcx, r8, r9, so at the entry the
 * argument's number; 7: rax), and memleak's id of the probed function in bits 32-63.
 */
enum alloc_op {
	OP_ALLOC = 1,        /* returns a new block of size (times count) bytes, or NULL */
	OP_FREE = 2,         /* ends the block */
	OP_REALLOC = 3,      /* a block replacing the old one; NULL: the old one stays (freed if size 0) */
	OP_REALLOCF = 4,     /* as OP_REALLOC, but the old block is freed on failure too */
	OP_MEMALIGN_OUT = 5, /* posix_memalign: the block is stored at *ptr, returns an error number */
	OP_MMAP = 6,         /* mmap(addr, len, prot, flags, fd, off) */
	OP_MUNMAP = 7,       /* munmap(addr, len) */
	OP_MREMAP = 8,       /* mremap(old, old_len, new_len, flags, new_addr) */
	OP_MPROTECT = 9,     /* mprotect(addr, len, prot) */
	OP_LINKMAP = 10,     /* the dynamic linker's _dl_debug_state: objects were loaded or unloaded */
};

#define COOKIE_OP(c) ((__u32)(c) & 0xff)
#define COOKIE_SIZE(c) (((__u32)(c) >> 8) & 0xf)
#define COOKIE_COUNT(c) (((__u32)(c) >> 12) & 0xf)
#define COOKIE_PTR(c) (((__u32)(c) >> 16) & 0xf)
#define COOKIE_ID(c) ((__u32)((c) >> 32))

/* Kernel mode's BPF cookie and -t function: which tracepoint fired (the first values were user
 * mode's before the cookie carried the call's meaning). */
enum fn_kind {
	FN_MALLOC = 1,
	FN_CALLOC = 2,
	FN_REALLOC = 3,
	FN_REALLOCARRAY = 4,
	FN_POSIX_MEMALIGN = 5,
	FN_ALIGNED_ALLOC = 6, /* aligned_alloc and memalign: (alignment, size) */
	FN_VALLOC = 7,
	FN_PVALLOC = 8,
	FN_FREE = 9,
	FN_MMAP = 10,
	FN_MUNMAP = 11,
	FN_MREMAP = 12,
	/* Kernel mode: the tracepoint that fired. */
	FN_KMALLOC = 13,
	FN_KFREE = 14,
	FN_KMEM_CACHE_ALLOC = 15,
	FN_KMEM_CACHE_FREE = 16,
	FN_PAGE_ALLOC = 17,
	FN_PAGE_FREE = 18,
	FN_PERCPU_ALLOC = 19,
	FN_PERCPU_FREE = 20,
	/* User mode again: changes what part of a mapping is accessible (counted). */
	FN_MPROTECT = 21,
};

/* Bounds the BPF side and the report share. */
enum limits {
	MAX_MAPPINGS = 32768,    /* mapping records at once */
	RANGE_MAX_RECORDS = 64,  /* mappings one munmap or mprotect changes at most */
};

/* Allocation records are keyed by process and address (kernel mode: pid 0; pages by PFN). */
struct alloc_key {
	__u32 pid;
	__u32 pad;
	__u64 addr;
};

struct alloc_info {
	__u64 size;
	__u64 timestamp_ns; /* CLOCK_MONOTONIC, from bpf_ktime_get_ns() */
	__u64 stack_id;     /* key in the stacks map; 0 = the stack could not be stored */
};

/*
 * The allocation records: an open-addressing table in a BPF array (BPF_F_MMAPABLE) that user
 * space maps and scans directly (src/records.rs; records.bpf.h). A record {pid, addr} lives in
 * one of two buckets its hash picks, in whichever slot it claimed (compare-and-swap of addr from
 * REC_EMPTY to REC_BUSY); addr is written last, so a slot whose addr is a real address is
 * complete. Free: the same compare-and-swap back to REC_EMPTY. No tombstones: a lookup scans
 * both buckets whole.
 */
#define REC_SLOTS 8
#define REC_EMPTY 0
#define REC_BUSY 1

struct alloc_bucket {
	__u64 addr[REC_SLOTS]; /* REC_EMPTY, REC_BUSY (being written), or the block's address */
	__u32 pid[REC_SLOTS];
	__u32 pad[REC_SLOTS];
	struct alloc_info info[REC_SLOTS];
};

/*
 * User mode: a mapping made by a traced mmap or mremap (or made accessible by mprotect), keyed
 * {pid, start}: whole pages [start, start + size). munmap, mremap, mprotect and MAP_FIXED trim,
 * split or remove exactly the pages they touch. A PROT_NONE range is address space, not memory:
 * it is kept (so that an mprotect making part of it accessible is seen) but never counted.
 */
struct map_info {
	__u64 size;         /* a multiple of the page size */
	__u64 timestamp_ns;
	__u64 stack_id;
	__u32 reserved;     /* 1: PROT_NONE, not counted */
	__u32 slot;         /* its slot in map_slots (ranges.bpf.h) */
};

/*
 * Sampling (-s, --sample-bytes, -z/-Z): a call sampled out takes no return probe and leaves no
 * state, so a call made inside it (malloc's mmap, operator new's malloc) cannot see it in
 * flight. A sampled-in call with no call in flight looks at its stack instead: a frame inside
 * an allocation function (the probed ones that take a return probe) means it is nested. Their
 * code, by file (the key is struct unwind_obj_key), as file offsets [start, end), sorted.
 */
#define ALLOC_FN_RANGES 64

struct alloc_fn_ranges {
	__u32 n;
	__u32 pad;
	struct {
		__u32 start;
		__u32 end;
	} r[ALLOC_FN_RANGES];
};

/* --combined-only: per-stack totals kept in BPF. */
struct combined_info {
	__u64 total_size;
	__u64 count;
};

/*
 * A stack (user, or kernel in kernel mode): return addresses, innermost first. Keyed by a 64-bit
 * hash of its frames. The table unwinder also records where each frame was when the stack was
 * captured: locs[i] = object id << 32 | file offset (struct unwind_object's id; 0 when unknown:
 * --frame-pointers, kernel stacks, code in no file). User space then symbolizes the frame from
 * that object, however the process's mappings have changed since.
 */
struct stack {
	__u32 depth;
	__u32 truncated; /* 1 if the walk stopped at MAX_STACK_DEPTH */
	/* The process whose stack it is (part of the hash: each process's stacks, and their
	 * allocation counts, are its own; a report can then say where its frames live). 0 in
	 * kernel mode, whose stacks every process shares. */
	__u32 pid;
	__u32 pad;
	/* Allocations from this stack since tracing began, and their bytes (atomic adds; not part
	 * of the hash): pprof's alloc_objects and alloc_space. */
	__u64 alloc_count;
	__u64 alloc_bytes;
	__u64 ips[MAX_STACK_DEPTH];
	__u64 locs[MAX_STACK_DEPTH];
};

/* Why something went untracked. Each is a slot of the global counters array. */
enum counter {
	CNT_ALLOCS_FULL = 0,   /* allocation map full: an allocation was not recorded */
	CNT_STACKS_FULL = 1,   /* stack map full: an allocation was recorded without its stack */
	CNT_STATE_FAILED = 2,  /* no per-thread state could be created: a call was not traced */
	CNT_EVENTS_LOST = 3,   /* trace ring buffer full: a -t line was not printed */
	CNT_COMBINED_FULL = 4, /* combined map full: an allocation missing from the totals */
	CNT_TRUNCATED = 5,     /* stacks cut at MAX_STACK_DEPTH */
	CNT_FREE_FAILED = 6,   /* kernel mode: a record could not be deleted (map busy) */
	/* The table unwinder (docs/unwinding.md): stacks unwound, and why some stopped early. */
	CNT_UNWINDS = 7,            /* stacks unwound from the tables */
	CNT_STOP_NOT_MAPPED = 8,    /* a return address in no executable mapping */
	CNT_STOP_NO_TABLE = 9,      /* code of an object without a table yet; no frame pointer */
	CNT_STOP_NO_CFI = 10,       /* code the object's .eh_frame does not cover; no frame pointer */
	CNT_STOP_UNSUPPORTED = 11,  /* a CFA rule outside the table's model */
	CNT_STOP_BAD_CFA = 12,      /* a CFA that does not rise, or is unaligned */
	CNT_STOP_READ = 13,         /* stack memory that could not be read */
	CNT_NO_TABLE_SEEN = 14,     /* lookups of an object without a table: user space reloads */
	CNT_STOP_VMA_BUSY = 15,     /* a new address while another thread held the mmap lock */
	/* User mode: calls and mappings left untracked (docs/design.md). */
	CNT_RETURN_MISSED = 16,  /* an allocation call whose return was never seen: its block untracked */
	CNT_MAPPINGS_FULL = 17,  /* mapping map full: a mapping, or a piece of one, untracked */
	CNT_RANGE_OVERFLOW = 18, /* an unmap or mprotect overlapped more mappings than it can handle */
	CNT_PROC_EVENTS_LOST = 19, /* an exec of a traced process not told to user space (ring full) */
	NR_COUNTERS = 20,
};

/* ---- Unwind tables, built from each object's .eh_frame (src/unwind/, docs/unwinding.md). */

/* Rows are grouped by 64 KiB page of the object's virtual addresses. */
#define UNWIND_PAGE_SHIFT 16

/* How a row finds the CFA (the caller's rsp; the return address is at CFA-8). */
enum unwind_cfa {
	UNW_CFA_NONE = 0,        /* no CFI for this code: walk the frame pointer */
	UNW_CFA_RSP = 1,         /* rsp + cfa_off */
	UNW_CFA_RBP = 2,         /* rbp + cfa_off */
	UNW_CFA_PLT = 3,         /* rsp + cfa_off, + 8 when (ip & 15) >= aux: a PLT entry */
	UNW_CFA_END = 4,         /* the return address is undefined: the outermost frame */
	UNW_CFA_UNSUPPORTED = 5, /* another register or a DWARF expression */
};

/* Where the caller's rbp is. */
enum unwind_rbp {
	UNW_RBP_SAME = 0,      /* unchanged */
	UNW_RBP_AT_CFA = 1,    /* saved at CFA + rbp_off */
	UNW_RBP_UNDEFINED = 2, /* not recoverable */
};

/* One rule; rules are deduplicated over all objects. Index 0 is UNW_CFA_NONE. */
struct unwind_rule {
	__u8 cfa;  /* enum unwind_cfa */
	__u8 rbp;  /* enum unwind_rbp */
	__u8 aux;  /* UNW_CFA_PLT: the threshold on ip & 15 */
	__u8 pad;
	__s32 cfa_off;
	__s32 rbp_off;
};

/* A page's rows: unwind_rows[first_row .. first_row + nrows), sorted; the first is at offset 0.
 * A row is a __u32: (address & 0xffff) << 16 | rule index. */
struct unwind_page {
	__u32 first_row;
	__u32 nrows;
};

/* An object is known to the BPF side by the file its code is mapped from. */
struct unwind_obj_key {
	__u32 dev; /* the kernel's dev_t of the file system (MKDEV: major << 20 | minor) */
	__u32 pad;
	__u64 ino;
};

/*
 * Every file whose code a walk met, or that user space registered: its table (npages 0: none)
 * and its id in stack frames. Ids below UNWIND_USER_IDS are given by the BPF side when it meets
 * a file first, the others by user space when it registers one first.
 */
struct unwind_object {
	__s64 vaddr_minus_offset; /* p_vaddr - p_offset of its executable PT_LOAD */
	__u32 page_base;          /* index of its first page in unwind_pages */
	__u32 first_page;         /* p_vaddr >> UNWIND_PAGE_SHIFT of that page */
	__u32 npages;
	__u32 id;
	__u32 state; /* enum unwind_object_state */
	__u32 pad;
};

#define UNWIND_USER_IDS 0x80000000u

enum unwind_object_state {
	UNW_OBJ_NEW = 0,        /* not opened by user space yet: a walk meeting it wakes user space */
	UNW_OBJ_OPENED = 1,     /* user space holds the file */
	UNW_OBJ_UNREADABLE = 2, /* user space cannot read it (its frames say why) */
};

/* The wake-up: a walk met code of a file user space has not opened, mapped at [start, end). */
struct unwind_met {
	__u32 dev;
	__u32 id;
	__u32 pid; /* the process that maps it (its /proc/PID/map_files opens it) */
	__u32 pad;
	__u64 ino;
	__u64 start;
	__u64 end;
};

/* What happened to a traced process, for user space (the proc_events ring buffer). */
enum proc_event_kind {
	PEV_EXEC = 1, /* it exec'd: its old image's blocks are gone, its allocator may have changed */
	PEV_LINKMAP = 2, /* its link map changed (dlopen, dlclose): new objects may define allocators */
};

struct proc_event {
	__u32 kind; /* enum proc_event_kind */
	__u32 pid;
	__u32 tid;  /* the thread it happened in */
	__u32 pad;
	__u64 time_ns; /* bpf_ktime_get_ns() */
};

enum event_kind {
	EV_ALLOC = 1,
	EV_FREE = 2,
};

/* One -t/--trace line. */
struct trace_event {
	__u32 kind; /* enum event_kind */
	__u32 pid;
	__u32 tid;
	__u32 fn; /* user mode: the probed function's id (COOKIE_ID); kernel mode: enum fn_kind */
	__u64 size;
	__u64 addr;
};

#endif
