/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Types shared by the BPF programs and the Rust collector: the one definition of each. */
#ifndef MEMLEAK_H
#define MEMLEAK_H

#define MAX_STACK_DEPTH 127

/* The BPF cookie of every attached entry point: which allocator function it is. */
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

/* --combined-only: per-stack totals kept in BPF. */
struct combined_info {
	__u64 total_size;
	__u64 count;
};

/* A stack (user, or kernel in kernel mode): return addresses, innermost first. Keyed by a 64-bit hash of its frames. */
struct stack {
	__u32 depth;
	__u32 truncated; /* 1 if the walk stopped at MAX_STACK_DEPTH */
	__u64 ips[MAX_STACK_DEPTH];
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
	NR_COUNTERS = 7,
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
	__u32 fn; /* enum fn_kind */
	__u64 size;
	__u64 addr;
};

#endif
