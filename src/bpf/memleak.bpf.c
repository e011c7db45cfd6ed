// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * User-space allocation tracing: probes on the allocator's entry points record every block
 * still allocated (keyed by process and address) with its size, time and call stack.
 *
 * One program serves every entry point; the BPF cookie says what the call does and where its
 * arguments are (memleak.h, enum alloc_op): a new allocator function is a row of user space's
 * table (src/allocator/families.rs), not new code here. On kernels
 * with uprobe sessions (6.13+) it runs as a session through one uprobe_multi link: the entry
 * decides whether the return probe runs (free, munmap and mprotect need none). Linux 6.6 to 6.12 get an
 * entry and a return uprobe_multi link, older kernels classic uprobes and uretprobes: the same
 * code (on_entry, on_return) in the other program types below.
 */
#include "kernel_types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "memleak.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define RECORD_MAP_FLAGS BPF_F_NO_PREALLOC
#include "records.bpf.h"

/*
 * The processes memleak traces (pid → 0), kept by user space. The probes themselves are
 * attached per process, so only these processes run the programs; the map tells the exec
 * tracepoint whose records to end.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} traced SEC(".maps");

/* Execs and link-map changes of traced processes, for user space. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 16);
} proc_events SEC(".maps");

/* Set by the loader before load. */
/* memleak's own process: a thread it ptraces (task->parent) waits at a link-map change
 * (SIGSTOP, which memleak's ptrace takes and suppresses) until the new objects are probed. */
const volatile __u32 memleak_tgid = 0;
/* bpf_find_vma exists (5.17): an allocator's own mmaps are told from the program's. */
const volatile bool have_find_vma = false;
/* Some process may run memleak's preload library (in-process capture, -c). */
const volatile bool have_preload = false;
/* Sampling or size filters with the table walk: a call left out takes no return probe (its
 * nested calls are told by their stacks, memleak.h: struct alloc_fn_ranges). */
const volatile bool skip_unsampled = false;

#include "unwind.bpf.h"

/*
 * Per-thread state of the outermost allocator call in flight. Task storage, not a per-CPU
 * scratch map: uprobe_multi programs run with preemption enabled.
 */
struct task_state {
	__u64 outer_sp;  /* rsp at entry of the allocation call in flight (0: none) */
	__u64 size;
	__u64 arg;       /* realloc/mremap: the old block; posix_memalign: memptr; mmap: prot | flags << 32 */
	__u64 arg2;      /* mremap: the old size */
	__u64 arg3;      /* mremap: its flags */
	__u64 stack_id;
	__u32 kind;      /* enum alloc_op of the call in flight */
	__u32 record;    /* the new block passes the size filters and sampling */
	__u32 fn;        /* the probed function's id (COOKIE_ID) */
	__u32 heap_seen; /* this thread has made an allocation call, mmap included (since its exec) */
	struct stack stack;
	struct unwind_scratch unwind;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_state);
} task_states SEC(".maps");

#include "ranges.bpf.h"

/*
 * Processes that made an allocation call through a probed function (value: the first
 * function's id). Set once per thread, the first time: a process missing here after a while
 * allocates through something memleak did not probe (user space warns).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} heap_seen SEC(".maps");

/* Threads stopped at a link-map change: tid -> pid. User space takes the entry when the
 * SIGSTOP reaches its ptrace, and suppresses that signal. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} linkmap_stops SEC(".maps");

/*
 * The files of allocators other than the C library (jemalloc, tcmalloc, mimalloc as shared
 * objects), written by user space: an mmap their own code makes outside any probed call (an
 * arena at start-up, in a constructor, or before memleak attached) serves blocks that are
 * traced one by one; it is not the program's mapping.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct unwind_obj_key);
	__type(value, __u8);
} allocator_files SEC(".maps");

/*
 * In-process capture (docs/in-process-capture.md): processes running memleak's preload library,
 * which records the malloc family itself. pid -> the offset from a thread's thread pointer of
 * the library's word holding the stack pointer of its allocator call in flight (0: none).
 * Written by user space when the process connects (and for its forked children).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __s64);
} preload_tls SEC(".maps");

/* The code of every allocation function, by file (user space writes it at attach). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct unwind_obj_key);
	__type(value, struct alloc_fn_ranges);
} alloc_fns SEC(".maps");

#define SIGSTOP_ 19

/* ---- The unwinder seam: fills st->stack and returns its id (0 if it could not be stored). */

/*
 * Frame-pointer walk from an entry probe: the return address at [rsp] is the caller's frame,
 * always present; rbp still holds the caller's frame pointer, whose chain gives the rest.
 */
static __always_inline __u32 unwind_frame_pointers(struct pt_regs *ctx, struct stack *st)
{
	__u64 sp = PT_REGS_SP(ctx);
	__u64 fp = PT_REGS_FP(ctx);
	__u64 frame[2];
	__u32 depth = 0;

	if (bpf_probe_read_user(&st->ips[0], sizeof(__u64), (void *)sp) || !st->ips[0])
		return 0;
	depth = 1;
	for (int i = 1; i < MAX_STACK_DEPTH; i++) {
		/* Every frame lies above the last one, 8-byte aligned. */
		if (fp <= sp || (fp & 7))
			break;
		if (bpf_probe_read_user(frame, sizeof(frame), (void *)fp))
			break;
		if (!frame[1])
			break;
		st->ips[i] = frame[1];
		depth = i + 1;
		sp = fp;
		fp = frame[0];
	}
	st->truncated = depth == MAX_STACK_DEPTH && fp > sp && !(fp & 7);
	return depth;
}

static __always_inline void walk_stack(struct pt_regs *ctx, struct task_state *ts)
{
	ts->stack.pid = bpf_get_current_pid_tgid() >> 32;
	if (frame_pointers_only)
		ts->stack.depth = unwind_frame_pointers(ctx, &ts->stack);
	else
		ts->stack.depth = unwind_tables(ctx, &ts->unwind, &ts->stack);
}

static __always_inline __u64 capture_stack(struct pt_regs *ctx, struct task_state *ts)
{
	walk_stack(ctx, ts);
	return store_stack(&ts->stack, ts->size);
}

/* Frames looked at for an allocation call in flight: allocator internals are a few deep
 * (glibc: malloc → tcache_init → _int_malloc → arena_get2 → _int_new_arena → new_heap →
 * alloc_new_heap → mmap is 7). */
#define NESTING_FRAMES 16

struct nesting_ctx {
	struct stack *st;
	bool nested;
};

/* Whether frame i's return address lies inside an allocation function. */
static long nesting_frame(__u64 i, struct nesting_ctx *c)
{
	struct vma_found f = {};
	struct unwind_obj_key key = {};
	struct alloc_fn_ranges *r;
	__u64 pc, off;

	if (i >= MAX_STACK_DEPTH || i >= c->st->depth)
		return 1;
	pc = c->st->ips[i];
	if (bpf_find_vma(bpf_get_current_task_btf(), pc, unwind_vma_cb, &f, 0) || !f.has_file)
		return 0;
	key.dev = f.dev;
	key.ino = f.ino;
	r = bpf_map_lookup_elem(&alloc_fns, &key);
	if (!r)
		return 0;
	/* A return address: the call is the byte before it. */
	off = pc - 1 - f.start + (f.pgoff << 12);
	for (int j = 0; j < ALLOC_FN_RANGES; j++) {
		if (j >= r->n)
			break;
		if (off >= r->r[j].start && off < r->r[j].end) {
			c->nested = true;
			return 1;
		}
	}
	return 0;
}

/*
 * With skip_unsampled: whether the call whose stack is in ts->stack was made from inside an
 * allocation call that was sampled out (and so left no state).
 */
static __always_inline bool nested_in_unsampled(struct task_state *ts)
{
	struct nesting_ctx c = { .st = &ts->stack };

	bpf_loop(NESTING_FRAMES, nesting_frame, &c, 0);
	return c.nested;
}

/*
 * Whether the allocation call that entered with rsp == outer_sp is still in flight. Every such
 * call takes its return probe, for which the kernel replaced the return address at [outer_sp]
 * by its uprobe trampoline (the start of the process's uprobe page); once the call has
 * returned, `ret` has consumed that slot and the stack below the caller is soon used again. A
 * state whose slot holds anything else is one whose return was never seen: a longjmp out of
 * the allocator, or a return instance the kernel could not keep.
 */
static __always_inline bool outer_in_flight(__u64 outer_sp)
{
	struct task_struct *task = bpf_get_current_task_btf();
	__u64 slot = 0, trampoline = BPF_CORE_READ(task, mm, uprobes_state.xol_area, vaddr);

	if (!trampoline || bpf_probe_read_user(&slot, sizeof(slot), (void *)outer_sp))
		return false;
	return slot == trampoline;
}

/*
 * Whether a call entering at sp is made inside an allocator call the preload library is
 * recording on this thread (glibc's malloc mapping a large block, realloc's mremap, jemalloc's
 * malloc reached at an address also probed as mallocx): part of that call, counted once by
 * the library, as the nesting rule above counts a probed call inside another.
 */
static __always_inline bool in_preload_call(__u32 pid, __u64 sp)
{
	struct task_struct *task;
	__s64 *off;
	__u64 fs, outer = 0;

	if (!have_preload)
		return false;
	off = bpf_map_lookup_elem(&preload_tls, &pid);
	if (!off)
		return false;
	task = bpf_get_current_task_btf();
	fs = BPF_CORE_READ(task, thread.fsbase);
	if (!fs || bpf_probe_read_user(&outer, sizeof(outer), (void *)(fs + *off)))
		return false;
	return outer && sp <= outer;
}

/* munmap(addr, len): its pages' records end; entry only, like free. */
static __always_inline void on_munmap(__u32 pid, __u64 addr, __u64 len, __u32 fn)
{
	if ((addr & (PAGE_SIZE_ - 1)) || !len || len > (1ULL << 47))
		return; /* EINVAL: nothing is unmapped */
	range_update(addr, addr + PAGE_UP(len), 0, pid, RANGE_OP(RANGE_UNMAP, fn));
}

/*
 * mprotect(addr, len, prot), entry only: PROT_NONE takes pages out of the totals (kept as
 * reserved); access given to reserved pages counts them from now, with this call's stack.
 * One made inside an allocator call (glibc growing a thread's arena) belongs to that call.
 */
static __always_inline void on_mprotect(struct pt_regs *ctx, __u32 pid, __u64 addr, __u64 len, __u32 prot,
					__u32 fn)
{
	struct task_state *ts;
	__u64 sp = PT_REGS_SP(ctx), end, stack_id;

	if ((addr & (PAGE_SIZE_ - 1)) || !len || len > (1ULL << 47))
		return;
	end = addr + PAGE_UP(len);
	ts = bpf_task_storage_get(&task_states, bpf_get_current_task_btf(), 0, 0);
	if (ts && ts->outer_sp && sp <= ts->outer_sp && outer_in_flight(ts->outer_sp))
		return;
	if (in_preload_call(pid, sp))
		return;
	if (prot == PROT_NONE_) {
		range_update(addr, end, 0, pid, RANGE_OP(RANGE_RESERVE, fn));
		return;
	}
	/* Only reserved pages change: most mprotect calls (W^X flips, RELRO) touch none. */
	if (!(range_update(addr, end, 0, pid, RANGE_OP(RANGE_FIND, fn)) & 2))
		return;
	if (!ts)
		ts = bpf_task_storage_get(&task_states, bpf_get_current_task_btf(), 0,
					  BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!ts) {
		count(CNT_STATE_FAILED);
		return;
	}
	stack_id = capture_stack(ctx, ts);
	range_update(addr, end, stack_id, pid, RANGE_OP(RANGE_COMMIT, fn));
}

/*
 * The registers a cookie names: a[0] is 0 ("none"), a[1..6] the argument registers, a[7] rax
 * (where a function's code may have copied an argument before the probed instruction:
 * src/placement.rs). Read at fixed offsets (the verifier refuses a context access at a
 * computed one), then indexed.
 */
struct call_args {
	__u64 a[8];
};

static __always_inline void read_args(struct pt_regs *ctx, struct call_args *args)
{
	args->a[0] = 0;
	args->a[1] = PT_REGS_PARM1(ctx);
	args->a[2] = PT_REGS_PARM2(ctx);
	args->a[3] = PT_REGS_PARM3(ctx);
	args->a[4] = PT_REGS_PARM4(ctx);
	args->a[5] = PT_REGS_PARM5(ctx);
	args->a[6] = PT_REGS_PARM6(ctx);
	args->a[7] = ctx->ax;
}

/* Whether the call whose return address is at sp was made by an allocator's own code. */
static __always_inline bool allocator_own_call(__u64 sp)
{
	struct vma_found f = {};
	struct unwind_obj_key key = {};
	__u64 ret = 0;

	if (!have_find_vma)
		return false;
	if (bpf_probe_read_user(&ret, sizeof(ret), (void *)sp))
		return false;
	if (bpf_find_vma(bpf_get_current_task_btf(), ret, unwind_vma_cb, &f, 0) || !f.has_file)
		return false;
	key.dev = f.dev;
	key.ino = f.ino;
	return bpf_map_lookup_elem(&allocator_files, &key) != NULL;
}

/*
 * _dl_debug_state: the dynamic linker changed the link map. User space is told (it reads the
 * link map and probes the new objects); a thread memleak ptraces also stops until that is done.
 */
static __always_inline void on_linkmap(__u32 pid, __u32 tid)
{
	struct proc_event *e = bpf_ringbuf_reserve(&proc_events, sizeof(*e), 0);
	struct task_struct *task = bpf_get_current_task_btf();

	if (e) {
		e->kind = PEV_LINKMAP;
		e->pid = pid;
		e->tid = tid;
		e->pad = 0;
		e->time_ns = bpf_ktime_get_ns();
		bpf_ringbuf_submit(e, 0);
	} else {
		count(CNT_PROC_EVENTS_LOST);
	}
	if (memleak_tgid && BPF_CORE_READ(task, ptrace) && BPF_CORE_READ(task, parent, tgid) == memleak_tgid &&
	    !bpf_map_update_elem(&linkmap_stops, &tid, &pid, BPF_ANY))
		bpf_send_signal_thread(SIGSTOP_);
}

/*
 * Entry of any probed function; `cookie` says what it does (memleak.h). Returns 0 when the
 * return probe must run, 1 when it need not.
 */
static __always_inline int on_entry(struct pt_regs *ctx, __u64 cookie)
{
	__u64 sp = PT_REGS_SP(ctx), size, arg, arg2 = 0, arg3 = 0, id;
	__u32 pid, op = COOKIE_OP(cookie), fn = COOKIE_ID(cookie);
	struct call_args args;

	/* Not before a sampled-out call or an untracked free has returned: a helper call each. */
	switch (op) {
	case OP_FREE:
		read_args(ctx, &args);
		arg = args.a[COOKIE_PTR(cookie) & 7];
		if (!arg || !maybe_recorded(arg))
			return 1;
		pid = bpf_get_current_pid_tgid() >> 32;
		/*
		 * free and munmap end records and need no per-thread state: one made from inside
		 * another allocator call (realloc(p, 0)'s free, free's munmap of a mapped chunk,
		 * operator delete's free) only ends what the outer call would end anyway, or
		 * finds nothing.
		 */
		record_free(pid, arg, fn);
		return 1;
	case OP_MUNMAP:
		pid = bpf_get_current_pid_tgid() >> 32;
		on_munmap(pid, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), fn);
		return 1;
	case OP_MPROTECT:
		pid = bpf_get_current_pid_tgid() >> 32;
		on_mprotect(ctx, pid, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), (__u32)PT_REGS_PARM3(ctx), fn);
		return 1;
	case OP_LINKMAP:
		id = bpf_get_current_pid_tgid();
		on_linkmap(id >> 32, (__u32)id);
		return 1;
	case OP_MMAP:
		size = PT_REGS_PARM2(ctx);
		arg = (__u32)PT_REGS_PARM3(ctx) | ((__u64)(__u32)PT_REGS_PARM4(ctx) << 32);
		break;
	case OP_MREMAP:
		arg = PT_REGS_PARM1(ctx);
		arg2 = PT_REGS_PARM2(ctx);
		size = PT_REGS_PARM3(ctx);
		arg3 = PT_REGS_PARM4(ctx);
		break;
	case OP_ALLOC:
	case OP_REALLOC:
	case OP_REALLOCF:
	case OP_MEMALIGN_OUT:
		read_args(ctx, &args);
		size = args.a[COOKIE_SIZE(cookie) & 7];
		if (COOKIE_COUNT(cookie))
			size *= args.a[COOKIE_COUNT(cookie) & 7];
		/* realloc's old block; posix_memalign's out pointer */
		arg = args.a[COOKIE_PTR(cookie) & 7];
		/* Sampled out: no state, no return probe (a realloc always ends its old block at
		 * its return, so it takes it). */
		if (skip_unsampled && op != OP_REALLOC && op != OP_REALLOCF && !sampled_in(size))
			return 1;
		break;
	default:
		return 1;
	}
	pid = bpf_get_current_pid_tgid() >> 32;

	struct task_state *ts = bpf_task_storage_get(&task_states, bpf_get_current_task_btf(), 0,
						     BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!ts) {
		count(CNT_STATE_FAILED);
		return 1;
	}
	if (ts->outer_sp) {
		/*
		 * An allocation made from inside another allocator call (malloc's mmap, realloc's
		 * malloc, reallocarray's tail jump to realloc) is part of that call: count it once.
		 * It is at the same depth (a tail call) or deeper, and the outer call is still in
		 * flight: checked, not assumed, so that a call whose return was never seen cannot
		 * hide every later call of its thread.
		 */
		if (sp <= ts->outer_sp && outer_in_flight(ts->outer_sp))
			return 1;
		/* The state's call never returned as seen (or a signal handler on its own stack
		 * interrupted it): its block is untracked, and said. */
		count(CNT_RETURN_MISSED);
	}
	if (in_preload_call(pid, sp))
		return 1;
	/* An allocator's own arena, mapped outside a probed call (see allocator_files). */
	if ((op == OP_MMAP || op == OP_MREMAP) && allocator_own_call(sp))
		return 1;
	if (!ts->heap_seen) {
		/* The first allocation call of this thread: its process allocates through a probe. */
		ts->heap_seen = 1;
		bpf_map_update_elem(&heap_seen, &pid, &fn, BPF_NOEXIST);
	}
	ts->outer_sp = sp;
	ts->kind = op;
	ts->fn = fn;
	ts->size = size;
	ts->arg = arg;
	ts->arg2 = arg2;
	ts->arg3 = arg3;
	if (op == OP_MMAP && (__u32)arg == PROT_NONE_) {
		/* A reservation: address space, never counted, kept whatever its size. */
		ts->record = 1;
		ts->stack_id = 0;
		if (skip_unsampled) {
			walk_stack(ctx, ts);
			if (nested_in_unsampled(ts))
				goto nested;
		}
	} else if (skip_unsampled) {
		/* An allocation call here was sampled in (see above); an mmap or realloc may not be. */
		ts->record = (op == OP_ALLOC || op == OP_MEMALIGN_OUT) || sampled_in(size);
		if (ts->record) {
			walk_stack(ctx, ts);
			if (nested_in_unsampled(ts))
				goto nested;
			ts->stack_id = store_stack(&ts->stack, size);
		}
	} else {
		ts->record = sampled_in(size);
		if (ts->record)
			ts->stack_id = capture_stack(ctx, ts);
	}
	/* Always: the return probe is what ends the call, even one not recorded. */
	return 0;
nested:
	/* Part of an allocation call that was sampled out: nothing of it is recorded. */
	ts->outer_sp = 0;
	return 1;
}

/* mmap's return: the new pages (MAP_FIXED replaced whatever was there). */
static __always_inline void mmap_returned(struct task_state *ts, __u32 pid, __u64 addr)
{
	__u64 len = PAGE_UP(ts->size);
	__u32 prot = (__u32)ts->arg, flags = ts->arg >> 32;

	if (flags & MAP_FIXED_)
		range_update(addr, addr + len, 0, pid, RANGE_OP(RANGE_UNMAP, ts->fn));
	if (ts->record)
		mapping_insert(pid, addr, len, prot == PROT_NONE_, ts->stack_id, ts->fn);
}

/*
 * mremap's return: the old pages go (unless MREMAP_DONTUNMAP, or old_size 0 which duplicates a
 * shared mapping), the new ones are recorded with this call's stack, reserved if the old ones
 * were. An in-place shrink or grow is the same: old range out, new range in.
 */
static __always_inline void mremap_returned(struct task_state *ts, __u32 pid, __u64 addr)
{
	__u64 old = ts->arg, old_len = PAGE_UP(ts->arg2), len = PAGE_UP(ts->size), flags = ts->arg3;
	__u32 held;

	if (flags & MREMAP_FIXED_)
		range_update(addr, addr + len, 0, pid, RANGE_OP(RANGE_UNMAP, ts->fn));
	if (old_len && !(flags & MREMAP_DONTUNMAP_))
		held = range_update(old, old + old_len, 0, pid, RANGE_OP(RANGE_UNMAP, ts->fn));
	else
		held = range_update(old, old + old_len, 0, pid, RANGE_OP(RANGE_FIND, ts->fn));
	if (held == 2)
		mapping_insert(pid, addr, len, true, 0, ts->fn);
	else if (ts->record)
		mapping_insert(pid, addr, len, false, ts->stack_id, ts->fn);
}

static __always_inline int on_return(struct pt_regs *ctx)
{
	struct task_state *ts;
	__u64 ret = PT_REGS_RC(ctx), addr = ret;
	__u32 pid = bpf_get_current_pid_tgid() >> 32;

	ts = bpf_task_storage_get(&task_states, bpf_get_current_task_btf(), 0, 0);
	/* Only the return of the outermost call in flight: after `ret`, rsp is 8 above entry. */
	if (!ts || !ts->outer_sp || PT_REGS_SP(ctx) != ts->outer_sp + 8)
		return 0;
	ts->outer_sp = 0;

	switch (ts->kind) {
	case OP_REALLOC:
		/* realloc(p, 0) frees p and returns NULL; a failed realloc leaves p alone. */
		if (ts->arg && (ret || !ts->size))
			record_free(pid, ts->arg, ts->fn);
		break;
	case OP_REALLOCF:
		/* reallocf frees p whatever happens. */
		if (ts->arg)
			record_free(pid, ts->arg, ts->fn);
		break;
	case OP_MREMAP:
		if (ret == (__u64)-1)
			goto failed;
		mremap_returned(ts, pid, ret);
		return 0;
	case OP_MMAP:
		if (ret == (__u64)-1)
			goto failed;
		mmap_returned(ts, pid, ret);
		return 0;
	case OP_MEMALIGN_OUT:
		if ((int)ret != 0)
			goto failed;
		addr = 0;
		bpf_probe_read_user(&addr, sizeof(addr), (void *)ts->arg);
		break;
	default:
		break;
	}
	if (!addr)
		goto failed;
	end_missed_free(pid, addr, ts->fn);
	if (ts->record)
		record_insert(pid, addr, ts->size, ts->stack_id, ts->fn);
	return 0;
failed:
	/* Nothing was allocated (realloc(p, 0) included): the stack's allocation count says so. */
	if (ts->record)
		uncount_alloc(ts->stack_id, ts->size);
	return 0;
}

extern bool bpf_session_is_return(void) __ksym __weak;

SEC("uprobe.session")
int memleak_session(struct pt_regs *ctx)
{
	if (bpf_session_is_return())
		return on_return(ctx);
	return on_entry(ctx, bpf_get_attach_cookie(ctx));
}

/* Linux 6.6 to 6.12: uprobe_multi without sessions, one link for the entries, one for the returns. */
SEC("uprobe.multi")
int memleak_multi_entry(struct pt_regs *ctx)
{
	on_entry(ctx, bpf_get_attach_cookie(ctx));
	return 0;
}

SEC("uretprobe.multi")
int memleak_multi_return(struct pt_regs *ctx)
{
	return on_return(ctx);
}

/* Older kernels: a classic uprobe per entry point and uretprobe per allocating function. */
SEC("uprobe")
int memleak_entry(struct pt_regs *ctx)
{
	on_entry(ctx, bpf_get_attach_cookie(ctx));
	return 0;
}

SEC("uretprobe")
int memleak_return(struct pt_regs *ctx)
{
	return on_return(ctx);
}

/* Ends the records of the process that exec'd (ctx: its pid) in one bucket: its old image's
 * memory is gone. */
static long drop_records(void *map, __u32 *key, struct alloc_bucket *b, __u32 *pid)
{
	for (int i = 0; i < REC_SLOTS; i++) {
		__u64 addr = b->addr[i], stack_id = b->info[i].stack_id, size = b->info[i].size;

		if (addr <= REC_BUSY || b->pid[i] != *pid)
			continue;
		if (__sync_val_compare_and_swap(&b->addr[i], addr, REC_EMPTY) != addr)
			continue;
		__sync_fetch_and_add(&live_records, -1);
		if (combined_only)
			combined_add(stack_id, -(__s64)size, -1);
	}
	return 0;
}

/*
 * exec of a traced process: the old image's memory is gone, so the blocks it held are too and
 * their records end; user space is told (a process memleak does not ptrace gets its allocator
 * found again).
 */
SEC("tp_btf/sched_process_exec")
int BPF_PROG(memleak_exec, struct task_struct *p, __u32 old_pid, struct linux_binprm *bprm)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	struct proc_event *e;
	struct task_state *ts;

	if (!bpf_map_lookup_elem(&traced, &pid))
		return 0;
	/* The new image's allocation calls are checked afresh (it may bypass what was probed). */
	ts = bpf_task_storage_get(&task_states, bpf_get_current_task_btf(), 0, 0);
	if (ts) {
		ts->heap_seen = 0;
		ts->outer_sp = 0;
	}
	bpf_map_delete_elem(&heap_seen, &pid);
	bpf_for_each_map_elem(&allocs, drop_records, &pid, 0);
	bpf_for_each_map_elem(&mappings, drop_mapping, &pid, 0);
	e = bpf_ringbuf_reserve(&proc_events, sizeof(*e), 0);
	if (e) {
		e->kind = PEV_EXEC;
		e->pid = pid;
		e->tid = pid;
		e->pad = 0;
		e->time_ns = bpf_ktime_get_ns();
		bpf_ringbuf_submit(e, 0);
	} else {
		count(CNT_PROC_EVENTS_LOST);
	}
	return 0;
}

/* The proc_event types into BTF, for the skeleton's Rust types. */
struct proc_event btf_proc_event __attribute__((unused));
enum proc_event_kind btf_proc_event_kind __attribute__((unused));
