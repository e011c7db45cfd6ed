// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Kernel mode: the kernel's allocators through their tracepoints, attached by BTF (tp_btf), so
 * nothing needs tracefs. Records are keyed like user mode's, with pid 0: kmalloc and
 * kmem_cache objects and percpu blocks by address, pages by page frame number.
 *
 * The programs read their arguments by position from the tracepoint's TP_PROTO. Two prototypes
 * changed between kernel versions; the loader reads the running kernel's BTF and sets the flags
 * below (the verifier then drops the other branch):
 *   kmem_cache_alloc  before 6.1: (call_site, ptr, bytes_req, bytes_alloc, gfp_flags)
 *                     6.1+:       (call_site, ptr, struct kmem_cache *s, gfp_flags, node)
 *   percpu_alloc_percpu before 6.2: (reserved, is_atomic, size, align, base_addr, off, ptr)
 *                     6.2+:       (call_site, reserved, is_atomic, size, align, base_addr, off,
 *                                  ptr, bytes_alloc, gfp_flags)
 * kmalloc (call_site, ptr, bytes_req, bytes_alloc, ...), kfree and kmem_cache_free
 * (call_site, ptr, ...), mm_page_alloc (page, order, gfp, migratetype), mm_page_free
 * (page, order) and percpu_free_percpu (base_addr, off, ptr) keep the arguments used here in
 * place across those versions.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "memleak.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define RECORD_MAP_FLAGS 0
#include "records.bpf.h"

/* Set by the loader before load. */
const volatile bool cache_alloc_has_cache = true;  /* kmem_cache_alloc passes s (6.1+) */
const volatile bool percpu_has_call_site = true;   /* percpu_alloc_percpu starts with call_site (6.2+) */

/*
 * Page frame numbers: pfn = (page - vmemmap_base) / sizeof(struct page). vmemmap_base is not a
 * symbol user space can look up on every kernel, so user space computes it from one page whose
 * PFN it knows (its own, from /proc/self/pagemap) and whose struct page mm_page_alloc reported
 * here (the last movable order-0 page allocated by thread calib_tid). Pages are traced once it
 * is set.
 */
__u64 vmemmap_base = 0;
__u32 calib_tid = 0;
__u64 calib_page = 0;
__u64 page_struct_size = 0;

/*
 * Where a stack is captured before it is hashed: one slot per allocating program and CPU. A
 * program never runs nested in itself on a CPU (the kernel's recursion protection), and
 * tracepoint programs run with preemption off, so a slot is never used twice at once.
 */
enum { SLOT_KMALLOC, SLOT_CACHE, SLOT_PAGE, SLOT_PERCPU, NR_SLOTS };

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NR_SLOTS);
	__type(key, __u32);
	__type(value, struct stack);
} scratch SEC(".maps");

/* The kernel stack of this tracepoint hit, stored with an allocation of size bytes counted;
 * returns its id, 0 if it could not be. */
static __always_inline __u64 capture_stack(void *ctx, __u32 slot, __u64 size)
{
	struct stack *st = bpf_map_lookup_elem(&scratch, &slot);
	long n;

	if (!st)
		return 0;
	n = bpf_get_stack(ctx, st->ips, sizeof(st->ips), 0);
	if (n <= 0) {
		count(CNT_STACKS_FULL);
		return 0;
	}
	st->depth = n / sizeof(__u64);
	st->truncated = st->depth >= MAX_STACK_DEPTH;
	return store_stack(st, size);
}

/* Kernel records are those of pid 0. */
static __always_inline void kfree_record(__u64 addr, __u32 fn)
{
	record_free(0, addr, fn);
}

static __always_inline void record_alloc(void *ctx, __u64 addr, __u64 size, __u32 fn, __u32 slot)
{
	if (!addr)
		return;
	end_missed_free(0, addr, fn);
	if (!sampled_in(size))
		return;
	record_insert(0, addr, size, capture_stack(ctx, slot, size), fn);
}

SEC("tp_btf/kmalloc")
int memleak_kmalloc(__u64 *ctx)
{
	/* kmalloc(0) returns ZERO_SIZE_PTR (16), shared by all: nothing to track. */
	if (ctx[1] > 16)
		record_alloc(ctx, ctx[1], ctx[3] /* bytes_alloc */, FN_KMALLOC, SLOT_KMALLOC);
	return 0;
}

SEC("tp_btf/kfree")
int memleak_kfree(__u64 *ctx)
{
	if (ctx[1])
		kfree_record(ctx[1], FN_KFREE);
	return 0;
}

SEC("tp_btf/kmem_cache_alloc")
int memleak_kmem_cache_alloc(__u64 *ctx)
{
	__u64 size;

	if (cache_alloc_has_cache)
		size = BPF_CORE_READ((struct kmem_cache *)ctx[2], size);
	else
		size = ctx[3]; /* bytes_alloc */
	record_alloc(ctx, ctx[1], size, FN_KMEM_CACHE_ALLOC, SLOT_CACHE);
	return 0;
}

SEC("tp_btf/kmem_cache_free")
int memleak_kmem_cache_free(__u64 *ctx)
{
	if (ctx[1])
		kfree_record(ctx[1], FN_KMEM_CACHE_FREE);
	return 0;
}

/* A struct page * argument as a plain number: the verifier forbids arithmetic on the pointer. */
static __always_inline __u64 page_arg(__u64 *ctx)
{
	__u64 page = 0;

	bpf_probe_read_kernel(&page, sizeof(page), &ctx[0]);
	return page;
}

static __always_inline __u64 page_to_pfn(__u64 page)
{
	return (page - vmemmap_base) / bpf_core_type_size(struct page);
}

SEC("tp_btf/mm_page_alloc")
int memleak_page_alloc(__u64 *ctx)
{
	__u64 page = page_arg(ctx);
	__u32 order = ctx[1], gfp = ctx[2];

	if (!page)
		return 0;
	if (!vmemmap_base) {
		if (calib_tid && (__u32)bpf_get_current_pid_tgid() == calib_tid && order == 0 &&
		    (gfp & ___GFP_MOVABLE)) {
			page_struct_size = bpf_core_type_size(struct page);
			calib_page = page;
		}
		return 0;
	}
	record_alloc(ctx, page_to_pfn(page), (__u64)(1 << PAGE_SHIFT) << (order & 31), FN_PAGE_ALLOC,
		     SLOT_PAGE);
	return 0;
}

SEC("tp_btf/mm_page_free")
int memleak_page_free(__u64 *ctx)
{
	__u64 page;

	if (!vmemmap_base)
		return 0;
	page = page_arg(ctx);
	if (page)
		kfree_record(page_to_pfn(page), FN_PAGE_FREE);
	return 0;
}

SEC("tp_btf/percpu_alloc_percpu")
int memleak_percpu_alloc(__u64 *ctx)
{
	if (percpu_has_call_site)
		record_alloc(ctx, ctx[7], ctx[3], FN_PERCPU_ALLOC, SLOT_PERCPU);
	else
		record_alloc(ctx, ctx[6], ctx[2], FN_PERCPU_ALLOC, SLOT_PERCPU);
	return 0;
}

SEC("tp_btf/percpu_free_percpu")
int memleak_percpu_free(__u64 *ctx)
{
	if (ctx[2])
		kfree_record(ctx[2], FN_PERCPU_FREE);
	return 0;
}
