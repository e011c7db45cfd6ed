/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * User mode's mapping records (struct map_info in memleak.h): the pages traced mmap and mremap
 * calls mapped, which munmap, mremap, mprotect and mmap(MAP_FIXED) trim, split or remove to the
 * page. They live apart from the allocation records: they are few (glibc's own mmaps are part
 * of the malloc call that made them and never recorded), so free stays one hash delete while
 * an operation on a range may walk every mapping record. Included by memleak.bpf.c after
 * records.bpf.h.
 */
#ifndef MEMLEAK_RANGES_BPF_H
#define MEMLEAK_RANGES_BPF_H

#define PAGE_SIZE_ 4096ULL
#define PAGE_UP(x) (((x) + PAGE_SIZE_ - 1) & ~(PAGE_SIZE_ - 1))
#define PROT_NONE_ 0
#define MAP_FIXED_ 0x10
#define MREMAP_MAYMOVE_ 1
#define MREMAP_FIXED_ 2
#define MREMAP_DONTUNMAP_ 4

/*
 * MAX_MAPPINGS (memleak.h): a walk visits every bucket, used or not, and a hash map has one per
 * entry (rounded up to a power of two): the size bounds what an unmap of a range that does not
 * start a record costs.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_MAPPINGS);
	__type(key, struct alloc_key);
	__type(value, struct map_info);
} mappings SEC(".maps");

enum range_op {
	RANGE_UNMAP = 0,   /* the pages are gone */
	RANGE_RESERVE = 1, /* the pages become PROT_NONE: kept, no longer counted */
	RANGE_COMMIT = 2,  /* the pages become accessible: counted from now, with the caller's stack */
	RANGE_FIND = 3,    /* nothing changes: only what the range holds is told */
};

/* The records one walk collects before they are changed; a walk is repeated while it filled up. */
#define RANGE_BATCH 16
#define RANGE_ROUNDS (RANGE_MAX_RECORDS / RANGE_BATCH)

struct range_walk {
	__u64 start;
	__u64 end;
	__u32 pid;
	__u32 op;
	__u32 n;
	__u32 full;
	__u32 saw_counted;
	__u32 saw_reserved;
	__u64 found[RANGE_BATCH]; /* starts of the overlapping records */
};

/* bpf_for_each_map_elem callback: collects the records the operation changes. */
static long range_collect(void *map, struct alloc_key *key, struct map_info *info, struct range_walk *w)
{
	__u32 n = w->n;

	if (key->pid != w->pid || key->addr >= w->end || key->addr + info->size <= w->start)
		return 0;
	if (info->reserved)
		w->saw_reserved = 1;
	else
		w->saw_counted = 1;
	/* Pages already as the operation leaves them need nothing. */
	if (w->op == RANGE_FIND || (w->op == RANGE_RESERVE && info->reserved) || (w->op == RANGE_COMMIT && !info->reserved))
		return 0;
	if (n >= RANGE_BATCH) {
		w->full = 1;
		return 1;
	}
	w->found[n] = key->addr;
	w->n = n + 1;
	return 0;
}

/* Starts a record of the pages [start, start + info->size). */
static __always_inline void mapping_put(__u32 pid, __u64 start, struct map_info *info, __u32 fn, bool announce)
{
	struct alloc_key key = { .pid = pid, .addr = start };

	if (bpf_map_update_elem(&mappings, &key, info, BPF_ANY)) {
		count(CNT_MAPPINGS_FULL);
		return;
	}
	if (info->reserved)
		return;
	if (combined_only)
		combined_add(info->stack_id, info->size, 1);
	if (trace_all && announce)
		emit(EV_ALLOC, fn, info->size, start);
}

/* What range_apply is told besides addresses, in one argument: pid, operation, function. */
#define RANGE_HOW(pid, op, fn) ((__u64)(pid) | (__u64)(op) << 32 | (__u64)(fn) << 40)

/*
 * Applies the operation to the part of record `rec` (its start) inside [start, end): what lies
 * before and after stays as it was (a record each), the part inside goes or changes state. A
 * global function, so that the verifier checks it once.
 */
__noinline int range_apply(__u64 rec, __u64 start, __u64 end, __u64 stack_id, __u64 how)
{
	__u32 pid = (__u32)how, op = (how >> 32) & 0xff, fn = how >> 40;
	struct alloc_key key = { .pid = pid, .addr = rec };
	struct map_info *p = bpf_map_lookup_elem(&mappings, &key);
	struct map_info old, piece;
	__u64 rec_end, lo, hi;

	if (!p)
		return 0;
	old = *p;
	rec_end = rec + old.size;
	if (rec_end <= start || rec >= end)
		return 0;
	lo = rec > start ? rec : start;
	hi = rec_end < end ? rec_end : end;
	/* The whole record leaves the totals; what stays of it comes back as pieces. */
	if (!old.reserved) {
		if (combined_only)
			combined_add(old.stack_id, -(__s64)old.size, -1);
		if (trace_all)
			emit(EV_FREE, fn, hi - lo, lo);
	}
	if (rec < lo) {
		piece = old;
		piece.size = lo - rec;
		mapping_put(pid, rec, &piece, fn, false);
	} else {
		bpf_map_delete_elem(&mappings, &key);
	}
	if (op == RANGE_RESERVE) {
		piece = old;
		piece.size = hi - lo;
		piece.reserved = 1;
		mapping_put(pid, lo, &piece, fn, false);
	} else if (op == RANGE_COMMIT && sampled_in(hi - lo)) {
		piece = (struct map_info){ .size = hi - lo, .timestamp_ns = bpf_ktime_get_ns(), .stack_id = stack_id };
		mapping_put(pid, lo, &piece, fn, true);
	}
	if (hi < rec_end) {
		piece = old;
		piece.size = rec_end - hi;
		mapping_put(pid, hi, &piece, fn, false);
	}
	return 0;
}

#define RANGE_OP(op, fn) ((op) | (fn) << 8)

/*
 * Applies op (RANGE_OP(op, fn): fn names the call for -t) to pid's pages [start, end). A range
 * inside one record that it starts (a whole munmap, a head trim) is found by its key; any other
 * takes walks of the map. Returns what the range held before: bit 0 counted pages, bit 1
 * reserved ones. A global function: the verifier checks it once, not at every call site.
 */
__noinline int range_update(__u64 start, __u64 end, __u64 stack_id, __u32 pid, __u32 op_fn)
{
	__u32 op = op_fn & 0xff, fn = op_fn >> 8;
	struct range_walk w = { .start = start, .end = end, .pid = pid, .op = op };
	struct alloc_key key = { .pid = pid, .addr = start };
	struct map_info *p;

	if (start >= end)
		return 0;
	p = bpf_map_lookup_elem(&mappings, &key);
	if (p && start + p->size >= end) {
		__u32 was = p->reserved ? 2 : 1;
		if (!(op == RANGE_FIND || (op == RANGE_RESERVE && p->reserved) || (op == RANGE_COMMIT && !p->reserved)))
			range_apply(start, start, end, stack_id, RANGE_HOW(pid, op, fn));
		return was;
	}
	for (int round = 0; round < RANGE_ROUNDS; round++) {
		w.n = 0;
		w.full = 0;
		bpf_for_each_map_elem(&mappings, range_collect, &w, 0);
		for (int i = 0; i < RANGE_BATCH; i++) {
			if (i >= w.n)
				break;
			range_apply(w.found[i], start, end, stack_id, RANGE_HOW(pid, op, fn));
		}
		if (!w.full)
			return w.saw_counted | (w.saw_reserved << 1);
	}
	count(CNT_RANGE_OVERFLOW);
	return w.saw_counted | (w.saw_reserved << 1);
}

/* A new mapping of pid's pages [start, start + size): reserved (PROT_NONE) or counted. */
static __always_inline void mapping_insert(__u32 pid, __u64 start, __u64 size, bool reserved, __u64 stack_id, __u32 fn)
{
	struct alloc_key key = { .pid = pid, .addr = start };
	struct map_info info = {
		.size = size, .timestamp_ns = bpf_ktime_get_ns(), .stack_id = stack_id, .reserved = reserved,
	};
	long err = bpf_map_update_elem(&mappings, &key, &info, BPF_NOEXIST);

	if (err == -EEXIST_) {
		/* A record of pages the kernel has just handed out again: their unmap went unseen. */
		range_update(start, start + size, 0, pid, RANGE_OP(RANGE_UNMAP, fn));
		err = bpf_map_update_elem(&mappings, &key, &info, BPF_NOEXIST);
	}
	if (err) {
		count(CNT_MAPPINGS_FULL);
		return;
	}
	if (reserved)
		return;
	if (combined_only)
		combined_add(stack_id, size, 1);
	if (trace_all)
		emit(EV_ALLOC, fn, size, start);
}

/* Ends a mapping record of the process that exec'd (ctx: its pid). */
static long drop_mapping(void *map, struct alloc_key *key, struct map_info *info, __u32 *pid)
{
	if (key->pid != *pid)
		return 0;
	if (combined_only && !info->reserved)
		combined_add(info->stack_id, -(__s64)info->size, -1);
	bpf_map_delete_elem(map, key);
	return 0;
}

/* Types into BTF for the skeleton's Rust types. */
struct map_info btf_map_info __attribute__((unused));
enum limits btf_limits __attribute__((unused));

#endif
