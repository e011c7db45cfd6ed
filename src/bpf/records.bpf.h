/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * What both BPF objects (user mode's memleak.bpf.c, kernel mode's kmem.bpf.c) share: the
 * configuration set by the loader, the loss counters, the record maps, and the code that stores
 * stacks and starts and ends allocation records. Included once by each object, after
 * memleak.h; the object defines RECORD_MAP_FLAGS first (kernel mode preallocates its maps:
 * its programs run inside the kernel's allocators).
 */
#ifndef MEMLEAK_RECORDS_BPF_H
#define MEMLEAK_RECORDS_BPF_H

/* Set by the loader before load: the verifier drops code for features that are off. */
const volatile __u64 min_size = 0;
const volatile __u64 max_size = (__u64)-1;
const volatile __u32 sample_rate = 1;
/* --sample-bytes: on average one sample per sample_bytes bytes allocated, a Poisson process
 * over the bytes: a block of size s is sampled with probability 1 - exp(-s / sample_bytes).
 * exp_neg64[k] = exp(-k / 64) in 32.32 fixed point, set by the loader. */
const volatile __u64 sample_bytes = 0;
/* 2^58 / sample_bytes, set by the loader: size / sample_bytes without a division (a 64-bit
 * div is 35-90 cycles, paid by every call sampling leaves out). */
const volatile __u64 sample_recip = 0;
const volatile __u64 exp_neg64[2048] = {};
const volatile bool trace_all = false;
const volatile bool combined_only = false;
const volatile bool wa_missing_free = false;

/* Why something went untracked, by enum counter: every snapshot prints the non-zero ones. */
__u64 counters[NR_COUNTERS];

/* The allocation table (memleak.h, struct alloc_bucket): its buckets and the most records it
 * keeps at once (--max-allocs), set by the loader. */
const volatile __u32 alloc_buckets = 1;
const volatile __u64 max_records = 1;

/* Records in the table now (a record is counted before its slot is claimed). */
__u64 live_records = 0;

/*
 * With sampling or a size filter most blocks are never recorded, and the free of one must not
 * pay for two buckets of a table tens of MiB large (two cache and TLB misses). presence[h] counts
 * the records started whose address hashes to h, a 64 KiB array that stays in cache: a free whose
 * counter is 0 has no record. A counter is decremented only where record_free ends a record, so it
 * never undercounts (a record ended elsewhere leaves it high: one needless look, never a miss).
 */
const volatile bool presence_filter = false;
#define PRESENCE_SLOTS 16384
__u32 presence[PRESENCE_SLOTS];

/* By address only, so that a free can be dismissed before it asks for its pid. */
static __always_inline __u32 presence_slot(__u64 addr)
{
	return ((addr >> 4) * 0x9e3779b97f4a7c15ULL) >> (64 - 14);
}

/* False when no record of a block at addr can exist (with the presence counters on). */
static __always_inline bool maybe_recorded(__u64 addr)
{
	return !presence_filter || presence[presence_slot(addr) & (PRESENCE_SLOTS - 1)];
}

/* Sizes are set by the loader; these are placeholders. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct alloc_bucket);
} allocs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, RECORD_MAP_FLAGS);
	__uint(max_entries, 10240);
	__type(key, __u64);
	__type(value, struct combined_info);
} combined SEC(".maps");

/* Stacks keyed by a 64-bit hash of their frames: two share a slot only if their hashes collide. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, RECORD_MAP_FLAGS);
	__uint(max_entries, 32768);
	__type(key, __u64);
	__type(value, struct stack);
} stacks SEC(".maps");

/*
 * A record's time: the clock read (about 20 ns here: pvclock and rdtsc under a hypervisor) is
 * taken once per CPU per jiffy and reused for the records started in the same jiffy, so a
 * timestamp is at most one tick early (4 ms at HZ=250): an age is overstated by that much at
 * most, never understated. bpf_jiffies64 is a plain load.
 */
/* One per CPU (a CPU beyond the array shares a slot: every value in it is a fresh read, so a
 * mixed pair is off by microseconds), a cache line each. A plain array, not a per-CPU map: the
 * percpu allocator is what kernel mode's --percpu traces. */
#define CLOCK_SLOTS 1024
struct clock_cache {
	__u64 jiffies;
	__u64 ns;
	__u64 pad[6];
};

struct clock_cache clock_cache[CLOCK_SLOTS];

static __always_inline __u64 record_time(void)
{
	struct clock_cache *c = &clock_cache[bpf_get_smp_processor_id() & (CLOCK_SLOTS - 1)];
	__u64 j = bpf_jiffies64();

	if (c->jiffies != j || !c->ns) {
		c->ns = bpf_ktime_get_ns();
		c->jiffies = j;
	}
	return c->ns;
}

/* -t lines. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

#define EEXIST_ 17
#define ENOENT_ 2

static __always_inline void count(enum counter c)
{
	if (c < NR_COUNTERS)
		__sync_fetch_and_add(&counters[c], 1);
}

static __always_inline void emit(__u32 kind, __u32 fn, __u64 size, __u64 addr)
{
	struct trace_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	__u64 id = bpf_get_current_pid_tgid();

	if (!e) {
		count(CNT_EVENTS_LOST);
		return;
	}
	e->kind = kind;
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->fn = fn;
	e->size = size;
	e->addr = addr;
	bpf_ringbuf_submit(e, 0);
}

/* 2^32 times the probability that --sample-bytes samples a block of size bytes. */
static __always_inline __u64 sample_p32(__u64 size)
{
	__u64 x, lo, e;

	if (size >= 32 * sample_bytes)
		return 1ULL << 32; /* 1 - exp(-32): always */
	/* x = size / sample_bytes in 32.32 fixed point, below 32 (sample_bytes <= 2^32): the
	 * product is below 32 * 2^58, and the reciprocal's rounding is within 2^-26 of x. */
	x = (size * sample_recip) >> 26;
	/* exp(-x) = exp(-(x >> 26) / 64) * exp(-lo), lo < 1/64: 1 - lo + lo^2/2 is within 7e-8. */
	lo = x & ((1ULL << 26) - 1);
	e = (1ULL << 32) - lo + ((lo * lo) >> 33);
	e = (exp_neg64[(x >> 26) & 2047] * e) >> 32;
	return (1ULL << 32) - e;
}

/* The -z/-Z bounds and -s or --sample-bytes sampling, decided before any stack walk or map
 * update. */
static __always_inline bool sampled_in(__u64 size)
{
	if (size < min_size || size > max_size)
		return false;
	/* One in sample_rate: a multiply-high of a random u32 is uniform in [0, sample_rate). */
	if (sample_rate > 1 && (((__u64)bpf_get_prandom_u32() * sample_rate) >> 32))
		return false;
	if (sample_bytes) {
		__u64 r = bpf_get_prandom_u32();

		/* 1 - exp(-x) <= x: a draw at or above size / sample_bytes (one multiply) is out
		 * whatever the exact probability; most are, and skip the table. */
		if (size < 32 * sample_bytes && r >= (size * sample_recip) >> 26)
			return false;
		if (r >= sample_p32(size))
			return false;
	}
	return true;
}

static __always_inline __u64 stack_hash(const struct stack *st)
{
	__u64 h = 0xcbf29ce484222325ULL ^ st->depth;

	h = (h ^ st->pid) * 0x100000001b3ULL;

	for (int i = 0; i < MAX_STACK_DEPTH; i++) {
		if (i >= st->depth)
			break;
		h = (h ^ st->ips[i]) * 0x100000001b3ULL;
		h = (h ^ st->locs[i]) * 0x100000001b3ULL; /* the same address in another object */
		h ^= h >> 29;
	}
	h ^= h >> 32;
	return h ? h : 1;
}

/* Counts an allocation of size bytes from a stored stack (n = -1: one that failed after all). */
static __always_inline void count_alloc(struct stack *s, __s64 n, __s64 size)
{
	__sync_fetch_and_add(&s->alloc_count, n);
	__sync_fetch_and_add(&s->alloc_bytes, size);
}

/* Stores a captured stack and counts an allocation of size bytes from it; returns its id, 0 if
 * the stack map is full. */
static __always_inline __u64 store_stack(struct stack *st, __u64 size)
{
	struct stack *s;
	__u64 id;
	long err;

	if (st->truncated)
		count(CNT_TRUNCATED);
	id = stack_hash(st);
	s = bpf_map_lookup_elem(&stacks, &id);
	if (s) {
		count_alloc(s, 1, size);
		return id;
	}
	st->alloc_count = 1;
	st->alloc_bytes = size;
	err = bpf_map_update_elem(&stacks, &id, st, BPF_NOEXIST);
	if (err == -EEXIST_ /* stored meanwhile by another thread or CPU */) {
		s = bpf_map_lookup_elem(&stacks, &id);
		if (s)
			count_alloc(s, 1, size);
	} else if (err) {
		count(CNT_STACKS_FULL);
		return 0;
	}
	return id;
}

/* An allocation counted by store_stack failed (NULL, MAP_FAILED): uncounted. */
static __always_inline void uncount_alloc(__u64 stack_id, __u64 size)
{
	struct stack *s = stack_id ? bpf_map_lookup_elem(&stacks, &stack_id) : NULL;

	if (s)
		count_alloc(s, -1, -(__s64)size);
}

/* Adds n blocks of size bytes in total (both negative to subtract) to a stack's totals. */
static __always_inline void combined_add(__u64 stack_id, __s64 size, __s64 n)
{
	struct combined_info *c = bpf_map_lookup_elem(&combined, &stack_id);

	if (!c && n > 0) {
		struct combined_info init = { .total_size = size, .count = n };
		if (!bpf_map_update_elem(&combined, &stack_id, &init, BPF_NOEXIST))
			return;
		c = bpf_map_lookup_elem(&combined, &stack_id);
	}
	if (c) {
		__sync_fetch_and_add(&c->total_size, size);
		__sync_fetch_and_add(&c->count, n);
	} else if (n > 0) {
		count(CNT_COMBINED_FULL);
	}
}

/* The two buckets of {pid, addr}: halves of one 64-bit mix, each scaled to the table's size. */
static __always_inline void rec_buckets(__u32 pid, __u64 addr, __u32 *b1, __u32 *b2)
{
	__u64 h = addr ^ ((__u64)pid << 40) ^ pid;

	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	h *= 0xc4ceb9fe1a85ec53ULL;
	h ^= h >> 33;
	*b1 = ((h & 0xffffffffULL) * alloc_buckets) >> 32;
	*b2 = ((h >> 32) * alloc_buckets) >> 32;
}

/* The slot of {pid, addr} in bucket b, or -1. */
static __always_inline int rec_slot(struct alloc_bucket *b, __u32 pid, __u64 addr)
{
	for (int i = 0; i < REC_SLOTS; i++)
		if (b->addr[i] == addr && b->pid[i] == pid)
			return i;
	return -1;
}

/* Where the record of {pid, addr} is: its bucket and slot; false if there is none. */
static __always_inline bool rec_find(__u32 pid, __u64 addr, struct alloc_bucket **bucket, __u32 *slot)
{
	__u32 k1, k2;
	struct alloc_bucket *b;
	int i;

	rec_buckets(pid, addr, &k1, &k2);
	b = bpf_map_lookup_elem(&allocs, &k1);
	if (!b)
		return false;
	i = rec_slot(b, pid, addr);
	if (i < 0 && k2 != k1) {
		b = bpf_map_lookup_elem(&allocs, &k2);
		if (!b)
			return false;
		i = rec_slot(b, pid, addr);
	}
	if (i < 0)
		return false;
	*bucket = b;
	*slot = i & (REC_SLOTS - 1);
	return true;
}

/* Ends the record of a block, if it is tracked. A global function: the verifier checks it
 * once, not at each call site. */
__noinline int record_free(__u32 pid, __u64 addr, __u32 fn)
{
	struct alloc_bucket *b;
	struct alloc_info info;
	__u32 i;

	if (addr <= REC_BUSY)
		return 0;
	if (!maybe_recorded(addr))
		return 0;
	if (!rec_find(pid, addr, &b, &i))
		return 0;
	if (combined_only || trace_all)
		info = b->info[i];
	/* Two frees of one block at once (a double free): one ends the record. */
	if (__sync_val_compare_and_swap(&b->addr[i], addr, REC_EMPTY) != addr)
		return 0;
	__sync_fetch_and_add(&live_records, -1);
	if (presence_filter)
		__sync_fetch_and_add(&presence[presence_slot(addr) & (PRESENCE_SLOTS - 1)], -1);
	if (combined_only)
		combined_add(info.stack_id, -(__s64)info.size, -1);
	if (trace_all)
		emit(EV_FREE, fn, info.size, addr);
	return 1;
}

/*
 * --wa-missing-free: a new block at an address still tracked means its free was missed: end
 * that record first. Called for every allocation, recorded or not.
 */
static __always_inline void end_missed_free(__u32 pid, __u64 addr, __u32 fn)
{
	if (wa_missing_free)
		record_free(pid, addr, fn);
}

/* Claims an empty slot of bucket b (REC_BUSY); its index, or -1. */
static __always_inline int rec_claim(struct alloc_bucket *b)
{
	for (int i = 0; i < REC_SLOTS; i++)
		if (b->addr[i] == REC_EMPTY && __sync_val_compare_and_swap(&b->addr[i], REC_EMPTY, REC_BUSY) == REC_EMPTY)
			return i;
	return -1;
}

/* Slots of bucket b in use; without a branch per slot (which the verifier would follow both
 * ways, 2^16 paths for two buckets). */
static __always_inline __u64 rec_used(struct alloc_bucket *b)
{
	__u64 n = 0, x;

	for (int i = 0; i < REC_SLOTS; i++) {
		x = b->addr[i];
		x |= 0 - x;
		barrier_var(x); /* or clang makes it a compare and branch again */
		n += x >> 63;
	}
	return n;
}

/*
 * Starts the record of a block: in the less full of its two buckets (two choices keep every
 * bucket below its 8 slots at the table's load, at most 5 records a bucket: docs/design.md).
 * A record of the same block still there (its free was missed) is replaced.
 */
__noinline int record_insert(__u32 pid, __u64 addr, __u64 size, __u64 stack_id, __u32 fn)
{
	struct alloc_info info = { .size = size, .timestamp_ns = record_time(), .stack_id = stack_id };
	struct alloc_bucket *b1, *b2, *b;
	__u32 k1, k2, i;
	int s;

	if (addr <= REC_BUSY)
		return 0;
	rec_buckets(pid, addr, &k1, &k2);
	b1 = bpf_map_lookup_elem(&allocs, &k1);
	b2 = bpf_map_lookup_elem(&allocs, &k2);
	if (!b1 || !b2) {
		count(CNT_ALLOCS_FULL);
		return 0;
	}
	/* One look at each bucket: a record of this block already there, and how full it is. */
	s = rec_slot(b1, pid, addr);
	b = b1;
	if (s < 0) {
		s = rec_slot(b2, pid, addr);
		b = b2;
	}
	if (s >= 0) {
		i = s & (REC_SLOTS - 1);
		struct alloc_info old = b->info[i];

		b->info[i] = info;
		if (combined_only) {
			combined_add(old.stack_id, -(__s64)old.size, -1);
			combined_add(stack_id, size, 1);
		}
		if (trace_all)
			emit(EV_ALLOC, fn, size, addr);
		return 1;
	}
	if (__sync_fetch_and_add(&live_records, 1) >= max_records)
		goto full;
	if (rec_used(b2) < rec_used(b1)) {
		b = b2;
		b2 = b1;
	} else {
		b = b1;
	}
	s = rec_claim(b);
	if (s < 0) {
		b = b2;
		s = rec_claim(b);
	}
	if (s < 0)
		goto full;
	i = s & (REC_SLOTS - 1);
	if (presence_filter)
		__sync_fetch_and_add(&presence[presence_slot(addr) & (PRESENCE_SLOTS - 1)], 1);
	b->pid[i] = pid;
	b->info[i] = info;
	/* The address last: a reader that sees it sees the rest. */
	asm volatile("" ::: "memory");
	*(volatile __u64 *)&b->addr[i] = addr;
	if (combined_only)
		combined_add(stack_id, size, 1);
	if (trace_all)
		emit(EV_ALLOC, fn, size, addr);
	return 1;
full:
	__sync_fetch_and_add(&live_records, -1);
	count(CNT_ALLOCS_FULL);
	return 0;
}

/* Never used by the programs: they put the shared enums and event type into BTF, so the Rust
 * side gets them from the generated skeleton instead of redefining them. */
enum fn_kind btf_fn_kind __attribute__((unused));
enum counter btf_counter __attribute__((unused));
enum event_kind btf_event_kind __attribute__((unused));
struct trace_event btf_trace_event __attribute__((unused));

#endif
