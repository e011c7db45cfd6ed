/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * User mode's mapping records (struct map_info in memleak.h): the pages traced mmap and mremap
 * calls mapped, which munmap, mremap, mprotect and mmap(MAP_FIXED) trim, split or remove to the
 * page. They live apart from the allocation records: they are few (glibc's own mmaps are part
 * of the malloc call that made them and never recorded), so free stays one hash delete while
 * an operation on a range may visit every mapping record. Included by memleak.bpf.c after
 * records.bpf.h.
 */
#ifndef MEMLEAK_RANGES_BPF_H
#define MEMLEAK_RANGES_BPF_H

#define PAGE_SIZE_ 4096ULL
#define PAGE_UP(x) (((x) + PAGE_SIZE_ - 1) & ~(PAGE_SIZE_ - 1))
#define PROT_NONE_ 0
#define MAP_FIXED_ 0x10
#define MREMAP_FIXED_ 2
#define MREMAP_DONTUNMAP_ 4

/* The records, by {pid, start}: what reports read, and how a range that starts one is found. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_MAPPINGS);
	__type(key, struct alloc_key);
	__type(value, struct map_info);
} mappings SEC(".maps");

/*
 * Every record also holds a slot here, the lowest free one, and slots_top bounds those in use:
 * finding the records a range overlaps visits the slots below slots_top, about as many as there
 * are records, where a walk of the hash map would visit all its MAX_MAPPINGS buckets, used or not (11 us at
 * 8,192).
 */
struct map_slot {
	__u64 start;
	__u64 owner; /* 0: free; else the record's pid + 1 */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_MAPPINGS);
	__type(key, __u32);
	__type(value, struct map_slot);
} map_slots SEC(".maps");

__u64 slots_top = 0;

enum range_op {
	RANGE_UNMAP = 0,   /* the pages are gone */
	RANGE_RESERVE = 1, /* the pages become PROT_NONE: kept, no longer counted */
	RANGE_COMMIT = 2,  /* the pages become accessible: counted from now, with the caller's stack */
	RANGE_FIND = 3,    /* nothing changes: only what the range holds is told */
};

/* The records one pass collects before they are changed; a pass is repeated while it filled up. */
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

struct slot_claim {
	__u64 owner;
	__u32 slot;
	__u32 found;
};

/* bpf_loop callback: claims the first free slot. */
static long claim_slot_cb(__u64 i, struct slot_claim *c)
{
	__u32 k = i;
	struct map_slot *s = bpf_map_lookup_elem(&map_slots, &k);

	if (!s)
		return 1;
	if (s->owner || __sync_val_compare_and_swap(&s->owner, 0, c->owner) != 0)
		return 0;
	c->slot = k;
	c->found = 1;
	return 1;
}

/* A slot for a new record of pid at start; -1 if none is free. */
static __always_inline __s64 claim_slot(__u32 pid, __u64 start)
{
	struct slot_claim c = { .owner = (__u64)pid + 1 };
	struct map_slot *s;

	bpf_loop(MAX_MAPPINGS, claim_slot_cb, &c, 0);
	if (!c.found)
		return -1;
	s = bpf_map_lookup_elem(&map_slots, &c.slot);
	if (!s)
		return -1;
	s->start = start;
	for (int i = 0; i < 8; i++) {
		__u64 top = slots_top;
		if (c.slot < top || __sync_val_compare_and_swap(&slots_top, top, c.slot + 1) == top)
			break;
	}
	return c.slot;
}

static __always_inline void release_slot(__u32 k)
{
	struct map_slot *s = bpf_map_lookup_elem(&map_slots, &k);

	if (!s)
		return;
	/* Lowered while the slot is still taken, so that no claim of it can be left above the top. */
	__sync_val_compare_and_swap(&slots_top, (__u64)k + 1, (__u64)k);
	s->owner = 0;
}

/* Adds a record's pages to the --combined-only totals (negative: takes them out). */
static __always_inline void totals_add(struct map_info *info, __s64 size, __s64 n)
{
	if (combined_only && !info->reserved)
		combined_add(info->stack_id, size, n);
}

/* Starts a record of the pages [start, start + info->size), at a key no record holds. */
static __always_inline void mapping_put(__u32 pid, __u64 start, struct map_info *info, __u32 fn, bool announce)
{
	struct alloc_key key = { .pid = pid, .addr = start };
	__s64 slot = claim_slot(pid, start);

	if (slot < 0) {
		count(CNT_MAPPINGS_FULL);
		return;
	}
	info->slot = slot;
	if (bpf_map_update_elem(&mappings, &key, info, BPF_NOEXIST)) {
		release_slot(slot);
		count(CNT_MAPPINGS_FULL);
		return;
	}
	totals_add(info, info->size, 1);
	if (trace_all && announce && !info->reserved)
		emit(EV_ALLOC, fn, info->size, start);
}

/* Ends the record at key (its value: info). */
static __always_inline void mapping_drop(struct alloc_key *key, struct map_info *info)
{
	__u32 slot = info->slot;

	totals_add(info, -(__s64)info->size, -1);
	if (!bpf_map_delete_elem(&mappings, key))
		release_slot(slot);
}

/* bpf_loop callback: collects the records the operation changes, slot by slot. */
static long range_collect(__u64 i, struct range_walk *w)
{
	__u32 k = i, n = w->n;
	struct map_slot *s = bpf_map_lookup_elem(&map_slots, &k);
	struct alloc_key key = { .pid = w->pid };
	struct map_info *info;

	if (!s || s->owner != (__u64)w->pid + 1 || s->start >= w->end)
		return 0;
	key.addr = s->start;
	info = bpf_map_lookup_elem(&mappings, &key);
	if (!info || key.addr + info->size <= w->start)
		return 0;
	if (info->reserved)
		w->saw_reserved = 1;
	else
		w->saw_counted = 1;
	/* Pages already as the operation leaves them need nothing. */
	if (w->op == RANGE_FIND || (w->op == RANGE_RESERVE && info->reserved) ||
	    (w->op == RANGE_COMMIT && !info->reserved))
		return 0;
	if (n >= RANGE_BATCH) {
		w->full = 1;
		return 1;
	}
	w->found[n] = key.addr;
	w->n = n + 1;
	return 0;
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
	if (trace_all && !old.reserved)
		emit(EV_FREE, fn, hi - lo, lo);
	if (rec < lo) {
		/* The head stays, under the record's key and slot. */
		p->size = lo - rec;
		totals_add(&old, -(__s64)(rec_end - lo), 0);
	} else {
		mapping_drop(&key, &old);
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
 * takes passes over the slots. Returns what the range held before: bit 0 counted pages, bit 1
 * reserved ones. A global function: the verifier checks it once, not at every call site.
 */
__noinline int range_update(__u64 start, __u64 end, __u64 stack_id, __u32 pid, __u32 op_fn)
{
	__u32 op = op_fn & 0xff, fn = op_fn >> 8;
	struct range_walk w = { .start = start, .end = end, .pid = pid, .op = op };
	struct alloc_key key = { .pid = pid, .addr = start };
	struct map_info *p;
	__u64 top;

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
		top = slots_top;
		bpf_loop(top < MAX_MAPPINGS ? top : MAX_MAPPINGS, range_collect, &w, 0);
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

	/* A record still there holds pages the kernel has just handed out again: their unmap
	 * went unseen (a raw syscall). */
	if (bpf_map_lookup_elem(&mappings, &key))
		range_update(start, start + size, 0, pid, RANGE_OP(RANGE_UNMAP, fn));
	mapping_put(pid, start, &info, fn, true);
}

/* Ends a mapping record of the process that exec'd (ctx: its pid). */
static long drop_mapping(void *map, struct alloc_key *key, struct map_info *info, __u32 *pid)
{
	if (key->pid == *pid)
		mapping_drop(key, info);
	return 0;
}

/* Types into BTF for the skeleton's Rust types. */
struct map_info btf_map_info __attribute__((unused));
enum limits btf_limits __attribute__((unused));

#endif
