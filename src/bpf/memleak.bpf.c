// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * User-space allocation tracing: probes on the allocator's entry points record every block
 * still allocated (keyed by process and address) with its size, time and call stack.
 *
 * One program serves every entry point; the BPF cookie says which function fired. On kernels
 * with uprobe sessions (6.13+) it runs as a session through one uprobe_multi link: the entry
 * decides whether the return probe runs (free and munmap need none). Linux 6.6 to 6.12 get an
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

/* Set by the loader before load. */
const volatile bool need_exec = false; /* -c: ignore calls until the command has exec'd */
const volatile __u32 target_tgid = 0;

/* Set by sched_process_exec for target_tgid (or by the loader when need_exec is off). */
bool armed = false;

#include "unwind.bpf.h"

/*
 * Per-thread state of the outermost allocator call in flight. Task storage, not a per-CPU
 * scratch map: uprobe_multi programs run with preemption enabled.
 */
struct task_state {
	__u64 outer_sp;  /* rsp at entry of the allocation call in flight (0: none) */
	__u64 size;
	__u64 arg;       /* realloc/mremap: the old block; posix_memalign: memptr */
	__u64 stack_id;
	__u32 kind;
	__u32 record;    /* the new block passes the size filters and sampling */
	struct stack stack;
	struct unwind_scratch unwind;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_state);
} task_states SEC(".maps");

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

static __always_inline __u64 capture_stack(struct pt_regs *ctx, struct task_state *ts)
{
	if (frame_pointers_only)
		ts->stack.depth = unwind_frame_pointers(ctx, &ts->stack);
	else
		ts->stack.depth = unwind_tables(ctx, &ts->unwind, &ts->stack);
	return store_stack(&ts->stack, ts->size);
}

/*
 * Entry of any probed function. Returns 0 when the return probe must run, 1 when it need not.
 */
static __always_inline int on_entry(struct pt_regs *ctx, __u32 kind)
{
	__u64 sp = PT_REGS_SP(ctx), size = 0, arg = 0;

	if (need_exec && !armed)
		return 1;

	switch (kind) {
	case FN_FREE:
	case FN_MUNMAP:
		arg = PT_REGS_PARM1(ctx);
		if (!arg)
			return 1;
		break;
	case FN_MALLOC:
	case FN_VALLOC:
	case FN_PVALLOC:
		size = PT_REGS_PARM1(ctx);
		break;
	case FN_CALLOC:
		size = PT_REGS_PARM1(ctx) * PT_REGS_PARM2(ctx);
		break;
	case FN_ALIGNED_ALLOC:
	case FN_MMAP:
		size = PT_REGS_PARM2(ctx);
		break;
	case FN_POSIX_MEMALIGN:
		arg = PT_REGS_PARM1(ctx);
		size = PT_REGS_PARM3(ctx);
		break;
	case FN_REALLOC:
		arg = PT_REGS_PARM1(ctx);
		size = PT_REGS_PARM2(ctx);
		break;
	case FN_REALLOCARRAY:
		arg = PT_REGS_PARM1(ctx);
		size = PT_REGS_PARM2(ctx) * PT_REGS_PARM3(ctx);
		break;
	case FN_MREMAP:
		arg = PT_REGS_PARM1(ctx);
		size = PT_REGS_PARM3(ctx);
		break;
	default:
		return 1;
	}

	/*
	 * free and munmap end a record and need no per-thread state: one made from inside another
	 * allocator call (realloc(p, 0)'s free, free's munmap of a mapped chunk) only ends what the
	 * outer call would end anyway, or finds nothing.
	 */
	if (kind == FN_FREE || kind == FN_MUNMAP) {
		record_free(bpf_get_current_pid_tgid() >> 32, arg, kind);
		return 1;
	}

	struct task_state *ts = bpf_task_storage_get(&task_states, bpf_get_current_task_btf(), 0,
						     BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!ts) {
		count(CNT_STATE_FAILED);
		return 1;
	}
	/*
	 * An allocation made from inside another allocator call (malloc's mmap, realloc's malloc,
	 * reallocarray's tail jump to realloc) is part of that call: count it once. The outer call
	 * is in flight until its return probe clears outer_sp, and this one is at the same depth
	 * (a tail call) or deeper on the stack.
	 */
	if (ts->outer_sp && sp <= ts->outer_sp)
		return 1;
	ts->outer_sp = sp;
	ts->kind = kind;
	ts->size = size;
	ts->arg = arg;
	ts->record = sampled_in(size);
	if (ts->record)
		ts->stack_id = capture_stack(ctx, ts);
	/* Always: the return probe is what ends the call, even one not recorded. */
	return 0;
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
	case FN_REALLOC:
	case FN_REALLOCARRAY:
		/* realloc(p, 0) frees p and returns NULL; a failed realloc leaves p alone. */
		if (ts->arg && (ret || !ts->size))
			record_free(pid, ts->arg, ts->kind);
		break;
	case FN_MREMAP:
		if (ret == (__u64)-1)
			goto failed;
		record_free(pid, ts->arg, ts->kind);
		break;
	case FN_MMAP:
		if (ret == (__u64)-1)
			goto failed;
		break;
	case FN_POSIX_MEMALIGN:
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
	end_missed_free(pid, addr, ts->kind);
	if (ts->record)
		record_insert(pid, addr, ts->size, ts->stack_id, ts->kind);
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

/* Ends a record of the process that exec'd (ctx: its pid): its old image's memory is gone. */
static long drop_record(void *map, struct alloc_key *key, struct alloc_info *info, __u32 *pid)
{
	if (key->pid != *pid)
		return 0;
	if (combined_only)
		combined_add(info->stack_id, -(__s64)info->size, -1);
	bpf_map_delete_elem(map, key);
	return 0;
}

/*
 * exec of the target: -c opens tracing here (the probes were attached before exec and only the
 * command's own image counts); any later exec replaces the image, so the blocks it held are
 * gone and their records end.
 */
SEC("tp_btf/sched_process_exec")
int BPF_PROG(memleak_exec, struct task_struct *p, __u32 old_pid, struct linux_binprm *bprm)
{
	__u32 pid = bpf_get_current_pid_tgid() >> 32;

	if (pid != target_tgid)
		return 0;
	armed = true;
	bpf_for_each_map_elem(&allocs, drop_record, &pid, 0);
	return 0;
}
