/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The few kernel types and constants the BPF programs use, so that building needs no kernel
 * headers and no vmlinux.h. Structs carry preserve_access_index: CO-RE relocates every field
 * access against the running kernel's BTF, so only the field names have to match.
 */
#ifndef MEMLEAK_KERNEL_TYPES_H
#define MEMLEAK_KERNEL_TYPES_H

/* bpf_tracing.h picks the kernel's pt_regs field names (di, si, ...) when this is defined. */
#define __VMLINUX_H__

typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef short __s16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
#define true 1
#define false 0

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_RINGBUF = 27,
	BPF_MAP_TYPE_TASK_STORAGE = 29,
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

enum {
	BPF_F_NO_PREALLOC = 1,
	BPF_F_MMAPABLE = 1024,
};

enum {
	BPF_LOCAL_STORAGE_GET_F_CREATE = 1,
};

#ifndef E2BIG
#define E2BIG 7
#endif

struct pt_regs {
	unsigned long bp;
	unsigned long ax;
	unsigned long cx;
	unsigned long dx;
	unsigned long si;
	unsigned long di;
	unsigned long r8;
	unsigned long r9;
	unsigned long r10;
	unsigned long ip;
	unsigned long sp;
} __attribute__((preserve_access_index));

struct seqcount {
	unsigned sequence;
} __attribute__((preserve_access_index));

/* The process's uprobe page: a return-probed call's return address is replaced by vaddr. */
struct xol_area {
	unsigned long vaddr;
} __attribute__((preserve_access_index));

struct uprobes_state {
	struct xol_area *xol_area;
} __attribute__((preserve_access_index));

/* Changes whenever the mappings may change (mmap write lock; CONFIG_PER_VMA_LOCK). */
struct mm_struct {
	struct seqcount mm_lock_seq;
	struct uprobes_state uprobes_state;
} __attribute__((preserve_access_index));

/* x86-64: the thread pointer, where a thread's TLS is (in-process capture). */
struct thread_struct {
	unsigned long fsbase;
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	int tgid;
	struct mm_struct *mm;
	unsigned int ptrace;        /* PT_PTRACED when a tracer holds it */
	struct task_struct *parent; /* its tracer while ptraced */
	struct thread_struct thread;
} __attribute__((preserve_access_index));

struct linux_binprm;

/* Kernel mode (kmem.bpf.c). */
struct kmem_cache {
	unsigned int size; /* the slot size of each object: what kmalloc's bytes_alloc reports */
} __attribute__((preserve_access_index));

/* Only its size is used (bpf_core_type_size): the stride of the vmemmap array. */
struct page {
	unsigned long flags;
} __attribute__((preserve_access_index));

#define PAGE_SHIFT 12
#define ___GFP_MOVABLE 0x08u
/* The unwinder: which file backs a code address (bpf_find_vma). */
struct super_block {
	__u32 s_dev;
} __attribute__((preserve_access_index));

struct inode {
	unsigned long i_ino;
	struct super_block *i_sb;
} __attribute__((preserve_access_index));

struct file {
	struct inode *f_inode;
} __attribute__((preserve_access_index));

struct vm_area_struct {
	unsigned long vm_start;
	unsigned long vm_end;
	unsigned long vm_flags;
	unsigned long vm_pgoff;
	struct file *vm_file;
} __attribute__((preserve_access_index));

#define VM_EXEC 0x00000004UL

#endif
