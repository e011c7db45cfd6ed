/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The table unwinder: walks a user stack from the rows built out of each object's .eh_frame
 * (src/unwind/ builds them; docs/unwinding.md describes the format). Included by memleak.bpf.c
 * after its counters; its per-thread task_state holds the unwind_scratch.
 *
 * One frame per bpf_loop iteration. A code address is mapped to its file by bpf_find_vma
 * (cached per stack), the file to its table by (dev, inode), the address to a row by a
 * binary search in the rows of its 64 KiB page. Code without CFI (JIT, stripped objects) falls
 * back to the frame pointer. Every step is checked; an early stop is counted by its reason.
 */
#ifndef MEMLEAK_UNWIND_BPF_H
#define MEMLEAK_UNWIND_BPF_H

/* Set by the loader: walk frame pointers only (--frame-pointers). */
const volatile bool frame_pointers_only = false;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct unwind_obj_key);
	__type(value, struct unwind_object);
} unwind_objects SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct unwind_page);
} unwind_pages SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 << 21);
	__type(key, __u32);
	__type(value, __u32);
} unwind_rows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct unwind_rule);
} unwind_rules SEC(".maps");

/* The rule enums into BTF, for the skeleton's Rust types (never used by the programs). */
enum unwind_cfa btf_unwind_cfa __attribute__((unused));
enum unwind_rbp btf_unwind_rbp __attribute__((unused));

/* Bumped by user space whenever it registers an object: cached "no table" answers expire. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} unwind_generation SEC(".maps");

/*
 * Wakes user space when a walk meets code of a file it has not opened yet (dlopen, exec): it
 * opens the file through /proc/PID/map_files while it is mapped, and builds its table.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} unwind_wakeup SEC(".maps");

/* The last object id the BPF side gave (struct unwind_object). */
__u32 unwind_last_id = 0;

enum unwind_object_state btf_unwind_object_state __attribute__((unused));
struct unwind_met btf_unwind_met __attribute__((unused));

/* An executable mapping seen during this walk. */
struct unwind_vma {
	__u64 start;
	__u64 end;
	__s64 adj;      /* address + adj = the object's virtual address */
	__s64 file_adj; /* address + file_adj = the file offset */
	__u32 page_base;
	__u32 first_page;
	__u32 npages; /* 0: no table for this object */
	__u32 stale;  /* the mappings may have changed since: check again when possible */
	__u32 obj;    /* the object's id; 0: not a file, or the objects map is full */
	__u32 pad;
};

#define UNWIND_VMA_CACHE 4

/*
 * The mappings a thread of the process found last, shared with the others: a thread whose own
 * cache misses while the mmap lock is taken (another thread mapping or unmapping) looks here.
 * seq is odd while a writer copies; a reader that sees it change ignores what it read.
 */
struct unwind_shared {
	__u64 seq;
	__u64 mm; /* whose mappings (an exec makes a new mm) */
	struct unwind_vma vmas[UNWIND_VMA_CACHE];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct unwind_shared);
} unwind_shared_vmas SEC(".maps");

/*
 * The rules a thread looked up last, direct-mapped by (object id, virtual address): a hit
 * skips the page and the binary search of its rows. An object's table never changes once it
 * has one, so an entry stays right; only objects with a table are cached.
 */
#define UNWIND_RULE_CACHE 64

struct unwind_rule_hit {
	__u64 tag; /* object id << 32 | virtual address; 0: empty */
	__u32 idx; /* the rule index */
	__u32 pad;
};

/* Per-thread scratch of one walk (in task storage: uprobe_multi runs preemptible). */
struct unwind_scratch {
	__u64 pc;
	__u64 sp;
	__u64 bp;
	__u32 depth;
	__u32 stop;  /* the counter of the reason it stopped early; 0: not early */
	__u32 first; /* pc is the probed instruction, not a return address */
	__u32 next_vma;
	__u32 mm_seq; /* the mm's mapping sequence when the cache was filled */
	__u32 generation; /* unwind_generation then */
	__u32 busy;   /* bpf_find_vma could not take the mmap lock */
	__u32 guess;  /* pc came from the frame-pointer fallback: the stop reason if it is wrong */
	__u64 mm;     /* the mm the cache describes (an exec keeps the task, not the mm) */
	struct unwind_vma vmas[UNWIND_VMA_CACHE];
	struct unwind_rule_hit rules[UNWIND_RULE_CACHE];
};

/* bpf_loop's context: where the walk writes. */
struct unwind_loop_ctx {
	struct unwind_scratch *u;
	struct stack *st;
};

struct vma_found {
	__u64 start;
	__u64 end;
	__u64 pgoff;
	__u64 flags;
	__u64 ino;
	__u32 dev;
	__u32 has_file;
};

static __always_inline void unwind_count(__u32 c)
{
	barrier_var(c);
	if (c < NR_COUNTERS)
		__sync_fetch_and_add(&counters[c], 1);
}

static long unwind_vma_cb(struct task_struct *task, struct vm_area_struct *vma, void *data)
{
	struct vma_found *f = data;
	struct file *file;

	f->start = BPF_CORE_READ(vma, vm_start);
	f->end = BPF_CORE_READ(vma, vm_end);
	f->pgoff = BPF_CORE_READ(vma, vm_pgoff);
	f->flags = BPF_CORE_READ(vma, vm_flags);
	file = BPF_CORE_READ(vma, vm_file);
	if (file) {
		f->ino = BPF_CORE_READ(file, f_inode, i_ino);
		f->dev = BPF_CORE_READ(file, f_inode, i_sb, s_dev);
		f->has_file = 1;
	}
	return 0;
}

/* Publishes this thread's cache for the others. */
static __always_inline void unwind_shared_store(struct unwind_scratch *u)
{
	__u32 zero = 0;
	struct unwind_shared *sh = bpf_map_lookup_elem(&unwind_shared_vmas, &zero);

	if (!sh)
		return;
	__sync_fetch_and_add(&sh->seq, 1);
	sh->mm = u->mm;
	for (int i = 0; i < UNWIND_VMA_CACHE; i++)
		sh->vmas[i] = u->vmas[i];
	__sync_fetch_and_add(&sh->seq, 1);
}

/* A mapping holding pc from the shared copy, into this thread's cache (stale); or NULL. */
static __always_inline struct unwind_vma *unwind_shared_lookup(struct unwind_scratch *u, __u64 pc)
{
	__u32 zero = 0;
	struct unwind_shared *sh = bpf_map_lookup_elem(&unwind_shared_vmas, &zero);
	struct unwind_vma copy, *v;
	__u64 seq;

	if (!sh)
		return NULL;
	seq = __sync_fetch_and_add(&sh->seq, 0);
	if ((seq & 1) || sh->mm != u->mm)
		return NULL;
	for (int i = 0; i < UNWIND_VMA_CACHE; i++) {
		copy = sh->vmas[i];
		if (pc < copy.start || pc >= copy.end)
			continue;
		if (__sync_fetch_and_add(&sh->seq, 0) != seq)
			return NULL;
		v = &u->vmas[u->next_vma & (UNWIND_VMA_CACHE - 1)];
		u->next_vma++;
		*v = copy;
		v->stale = 1;
		return v;
	}
	return NULL;
}

/* The entry of a file met for the first time, with a new id; NULL when the map is full. */
static __always_inline struct unwind_object *unwind_new_object(struct unwind_obj_key *key)
{
	struct unwind_object init = {};

	init.id = __sync_fetch_and_add(&unwind_last_id, 1) + 1;
	if (init.id >= UNWIND_USER_IDS)
		return NULL;
	/* Another thread may have added it meanwhile (EEXIST): its id stands. */
	bpf_map_update_elem(&unwind_objects, key, &init, BPF_NOEXIST);
	return bpf_map_lookup_elem(&unwind_objects, key);
}

/*
 * The executable mapping holding pc, from the cache or the kernel; NULL if none. bpf_find_vma
 * only try-locks the mmap lock: while another thread maps or unmaps, a stale cache entry is
 * used as it is (mappings of code rarely change), and a new address ends the walk (busy).
 */
static __always_inline struct unwind_vma *unwind_find_vma(struct unwind_scratch *u, __u64 pc)
{
	struct vma_found f = {};
	struct unwind_vma *v, *hit = NULL;
	struct unwind_object *obj;
	struct unwind_obj_key key = {};
	long err;

	for (int i = 0; i < UNWIND_VMA_CACHE; i++) {
		v = &u->vmas[i];
		if (pc >= v->start && pc < v->end) {
			if (!v->stale)
				return v;
			hit = v;
			break;
		}
	}
	err = bpf_find_vma(bpf_get_current_task_btf(), pc, unwind_vma_cb, &f, 0);
	if (err == -16 /* EBUSY */) {
		if (!hit)
			hit = unwind_shared_lookup(u, pc);
		if (!hit)
			u->busy = 1;
		return hit;
	}
	if (err || !(f.flags & VM_EXEC))
		return NULL;
	if (hit) {
		v = hit;
	} else {
		v = &u->vmas[u->next_vma & (UNWIND_VMA_CACHE - 1)];
		u->next_vma++;
	}
	v->start = f.start;
	v->end = f.end;
	v->file_adj = (__s64)(f.pgoff << 12) - (__s64)f.start;
	v->npages = 0;
	v->stale = 0;
	v->obj = 0;
	if (!f.has_file)
		return v;
	key.dev = f.dev;
	key.ino = f.ino;
	obj = bpf_map_lookup_elem(&unwind_objects, &key);
	if (!obj)
		obj = unwind_new_object(&key);
	if (!obj) {
		unwind_count(CNT_NO_TABLE_SEEN);
		return v;
	}
	v->obj = obj->id;
	if (obj->state == UNW_OBJ_NEW) {
		/* Until user space has opened it, each walk that looks it up wakes it again (a
		 * library unloaded before user space woke may be mapped again later). Full: user
		 * space has been woken already. */
		struct unwind_met met = { .dev = f.dev, .id = obj->id, .pid = bpf_get_current_pid_tgid() >> 32, .ino = f.ino, .start = f.start, .end = f.end };

		bpf_ringbuf_output(&unwind_wakeup, &met, sizeof(met), 2 /* BPF_RB_FORCE_WAKEUP */);
	}
	if (!obj->npages) {
		unwind_count(CNT_NO_TABLE_SEEN);
		return v;
	}
	v->adj = (__s64)(f.pgoff << 12) - (__s64)f.start + obj->vaddr_minus_offset;
	v->page_base = obj->page_base;
	v->first_page = obj->first_page;
	v->npages = obj->npages;
	unwind_shared_store(u);
	return v;
}

/* The rule index for the code at pc; 0 when there is none. */
static __always_inline __u32 unwind_rule_index(struct unwind_vma *v, __u64 pc)
{
	__u64 vaddr = pc + v->adj, page = vaddr >> UNWIND_PAGE_SHIFT;
	__u32 target = vaddr & 0xffff, idx, lo, n;
	struct unwind_page *p;
	__u32 *row;

	if (page < v->first_page || page - v->first_page >= v->npages)
		return 0;
	idx = v->page_base + (__u32)(page - v->first_page);
	p = bpf_map_lookup_elem(&unwind_pages, &idx);
	if (!p || !p->nrows)
		return 0;
	lo = p->first_row;
	n = p->nrows;
	/* The last row whose start is <= target; the page's first row starts at offset 0. */
	for (int i = 0; i < 18; i++) {
		__u32 half, mid;

		if (n <= 1)
			break;
		half = n / 2;
		mid = lo + half;
		row = bpf_map_lookup_elem(&unwind_rows, &mid);
		if (!row)
			return 0;
		if ((*row >> 16) <= target) {
			lo = mid;
			n -= half;
		} else {
			n = half;
		}
	}
	row = bpf_map_lookup_elem(&unwind_rows, &lo);
	return row ? (*row & 0xffff) : 0;
}

/* Records where frame i (return address pc, found in mapping v) was: object id and file offset. */
static __always_inline void unwind_locate(struct stack *st, __u32 i, struct unwind_vma *v, __u64 pc)
{
	__u64 off;

	if (i >= MAX_STACK_DEPTH)
		return;
	st->locs[i] = 0;
	/*
	 * A stale entry (the mmap lock was busy) is taken as it is, as for the walk itself: wrong
	 * only if that range was remapped to another file since; leaving it out would split the
	 * stack from its twins.
	 */
	if (!v || !v->obj)
		return;
	off = pc + v->file_adj;
	if (off >> 32)
		return; /* beyond 4 GiB: left to user space's view of the mappings */
	st->locs[i] = (__u64)v->obj << 32 | off;
}

/* One frame: finds the caller of the frame at u->pc. Returns 1 to stop the loop. */
static long unwind_step(__u64 i, void *data)
{
	struct unwind_loop_ctx *c = data;
	struct unwind_scratch *u = c->u;
	struct stack *st = c->st;
	struct unwind_rule *rule = NULL;
	struct unwind_vma *v;
	__u64 pc = u->pc, sp = u->sp, bp = u->bp, cfa, ra = 0, lookup_pc;
	__u32 idx = 0;

	/* A return address may be just past the function's last instruction: look up the call. */
	lookup_pc = u->first ? pc : pc - 1;
	v = unwind_find_vma(u, lookup_pc);
	/* pc is the previous step's return address, frame depth - 1: where it is, now. */
	if (!u->first)
		unwind_locate(st, u->depth - 1, v, pc);
	if (!v) {
		u->stop = u->busy ? CNT_STOP_VMA_BUSY : CNT_STOP_NOT_MAPPED;
		/* A frame-pointer guess that points at no code (rbp held no frame pointer): not a
		 * frame; the walk ended in the code before it. */
		if (u->guess && !u->busy && u->depth) {
			u->depth--;
			u->stop = u->guess;
		}
		return 1;
	}
	u->guess = 0;
	if (v->npages) {
		__u64 vaddr = lookup_pc + v->adj, tag = (__u64)v->obj << 32 | (__u32)vaddr;
		struct unwind_rule_hit *hit = &u->rules[(tag ^ (tag >> 7) ^ (tag >> 32)) & (UNWIND_RULE_CACHE - 1)];

		if (v->obj && !(vaddr >> 32) && hit->tag == tag) {
			idx = hit->idx;
		} else {
			idx = unwind_rule_index(v, lookup_pc);
			if (v->obj && !(vaddr >> 32)) {
				hit->tag = tag;
				hit->idx = idx;
			}
		}
		if (idx)
			rule = bpf_map_lookup_elem(&unwind_rules, &idx);
	}
	if (!rule || rule->cfa == UNW_CFA_NONE) {
		if (u->first) {
			/* The probe sits on the allocator's first instruction. */
			cfa = sp + 8;
		} else {
			/* No CFI: the frame pointer, if this code keeps one. */
			__u64 frame[2];

			/* The ABI zeroes rbp at the process's entry: the end of the chain. */
			if (!bp)
				return 1;
			/* rbp points at the saved rbp: at or above this frame's stack pointer. */
			if (bp < sp || (bp & 7) || bpf_probe_read_user(frame, sizeof(frame), (void *)bp)) {
				u->stop = v->npages ? CNT_STOP_NO_CFI : CNT_STOP_NO_TABLE;
				return 1;
			}
			cfa = bp + 16;
			bp = frame[0];
			u->guess = v->npages ? CNT_STOP_NO_CFI : CNT_STOP_NO_TABLE;
		}
	} else {
		switch (rule->cfa) {
		case UNW_CFA_RSP:
			cfa = sp + rule->cfa_off;
			break;
		case UNW_CFA_RBP:
			cfa = bp + rule->cfa_off;
			break;
		case UNW_CFA_PLT:
			cfa = sp + rule->cfa_off + ((lookup_pc & 15) >= rule->aux ? 8 : 0);
			break;
		case UNW_CFA_END:
			return 1; /* the outermost frame: complete */
		default:
			u->stop = CNT_STOP_UNSUPPORTED;
			return 1;
		}
		if (cfa <= sp || (cfa & 7)) {
			u->stop = CNT_STOP_BAD_CFA;
			return 1;
		}
		if (rule->rbp == UNW_RBP_AT_CFA && rule->rbp_off == -16 && cfa - 16 >= sp) {
			/* The usual frame: rbp saved right below the return address, one read. */
			__u64 frame[2];

			if (bpf_probe_read_user(frame, sizeof(frame), (void *)(cfa - 16))) {
				u->stop = CNT_STOP_READ;
				return 1;
			}
			bp = frame[0];
			ra = frame[1];
			goto have_ra;
		}
		if (rule->rbp == UNW_RBP_AT_CFA) {
			if (bpf_probe_read_user(&bp, sizeof(bp), (void *)(cfa + rule->rbp_off))) {
				u->stop = CNT_STOP_READ;
				return 1;
			}
		} else if (rule->rbp == UNW_RBP_UNDEFINED) {
			bp = 0;
		}
	}
	if (cfa <= sp || (cfa & 7)) {
		u->stop = CNT_STOP_BAD_CFA;
		return 1;
	}
	if (bpf_probe_read_user(&ra, sizeof(ra), (void *)(cfa - 8))) {
		u->stop = CNT_STOP_READ;
		return 1;
	}
have_ra:
	if (!ra)
		return 1; /* the end of the chain */
	if (u->depth >= MAX_STACK_DEPTH) {
		st->truncated = 1;
		return 1;
	}
	st->ips[u->depth] = ra;
	u->depth++;
	u->pc = ra;
	u->sp = cfa;
	u->bp = bp;
	u->first = 0;
	return 0;
}

/*
 * Whether the cache may be stale: the process's mm_lock_seq moves on every mmap write lock,
 * the generation when user space adds a table. Without mm_lock_seq (older kernels), always.
 */
static __always_inline bool unwind_mappings_changed(struct unwind_scratch *u)
{
	struct task_struct *task = bpf_get_current_task_btf();
	__u32 seq, zero = 0, *gen = bpf_map_lookup_elem(&unwind_generation, &zero);
	__u32 generation = gen ? *gen : 0;
	__u64 mm = (__u64)BPF_CORE_READ(task, mm);

	if (!bpf_core_field_exists(task->mm->mm_lock_seq)) {
		u->mm = mm;
		return true;
	}
	seq = BPF_CORE_READ(task, mm, mm_lock_seq.sequence);
	if (mm == u->mm && seq == u->mm_seq && !(seq & 1) && generation == u->generation)
		return false;
	if (mm != u->mm) {
		/* Another image (exec): nothing cached describes it, even as a stale guess. */
		for (int i = 0; i < UNWIND_VMA_CACHE; i++)
			u->vmas[i].end = 0;
	}
	u->mm = mm;
	u->mm_seq = seq;
	u->generation = generation;
	return true;
}

/* Unwinds the user stack at an allocator's entry probe into st; returns the depth. */
static __always_inline __u32 unwind_tables(struct pt_regs *ctx, struct unwind_scratch *u, struct stack *st)
{
	struct unwind_loop_ctx c = { .u = u, .st = st };

	u->pc = PT_REGS_IP(ctx);
	u->sp = PT_REGS_SP(ctx);
	u->bp = PT_REGS_FP(ctx);
	u->depth = 0;
	u->stop = 0;
	u->busy = 0;
	u->guess = 0;
	u->first = 1;
	/* The cached mappings stay valid while the process maps and unmaps nothing. */
	if (unwind_mappings_changed(u))
		for (int i = 0; i < UNWIND_VMA_CACHE; i++)
			u->vmas[i].stale = 1;
	/* The cache holds mappings of this walk only: they may have changed since the last. */

	st->truncated = 0;
	bpf_loop(MAX_STACK_DEPTH + 1, unwind_step, &c, 0);
	unwind_count(CNT_UNWINDS);
	if (u->stop)
		unwind_count(u->stop);
	return u->depth;
}

#endif
