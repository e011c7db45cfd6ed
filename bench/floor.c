/*
 * The floor of any tracer that traps on every allocator call: empty BPF programs in memleak's
 * own probe shape, attached as memleak attaches (one uprobe_multi session link, pid filter).
 *
 *   floor LIBC MALLOC_OFF FREE_OFF [--entries] -- CMD [ARGS...]
 *
 * MALLOC_OFF and FREE_OFF are file offsets in LIBC (memleak -v prints where it probes). One
 * program serves both, returning its BPF cookie: 0 at malloc (so the session's return probe
 * runs, as memleak's does for every recorded allocation), 1 at free (entry only). With
 * --entries malloc's cookie is 1 too: no return probe (what a sampled-out call costs).
 * CMD runs as a child, held until the link is attached; floor exits with its status.
 *
 * Raw bpf(2), no library: three instructions (r0 = bpf_get_attach_cookie() & 1; exit).
 */
#include <errno.h>
#include <linux/bpf.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* Linux 6.13's values; this machine's headers may predate them. */
#define TRACE_UPROBE_SESSION 57
#define FUNC_GET_ATTACH_COOKIE 174

/* The link_create part of union bpf_attr for a uprobe_multi link (Linux 6.6+). */
struct link_create_uprobe_multi {
	uint32_t prog_fd;
	uint32_t target_fd;
	uint32_t attach_type;
	uint32_t flags;
	uint64_t path;
	uint64_t offsets;
	uint64_t ref_ctr_offsets;
	uint64_t cookies;
	uint32_t cnt;
	uint32_t umflags;
	uint32_t pid;
	uint32_t pad[16];
};

static long sys_bpf(int cmd, void *attr, unsigned size)
{
	return syscall(SYS_bpf, cmd, attr, size);
}

static int load_prog(void)
{
	struct bpf_insn insns[3] = {
		{ .code = BPF_JMP | BPF_CALL, .imm = FUNC_GET_ATTACH_COOKIE },
		{ .code = BPF_ALU64 | BPF_AND | BPF_K, .dst_reg = BPF_REG_0, .imm = 1 },
		{ .code = BPF_JMP | BPF_EXIT },
	};
	char log[4096] = "";
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.prog_type = BPF_PROG_TYPE_KPROBE;
	attr.expected_attach_type = TRACE_UPROBE_SESSION;
	attr.insns = (uint64_t)(uintptr_t)insns;
	attr.insn_cnt = 3;
	attr.license = (uint64_t)(uintptr_t) "Dual BSD/GPL";
	attr.log_buf = (uint64_t)(uintptr_t)log;
	attr.log_size = sizeof(log);
	attr.log_level = 1;
	int fd = sys_bpf(BPF_PROG_LOAD, &attr, sizeof(attr));
	if (fd < 0)
		fprintf(stderr, "floor: BPF_PROG_LOAD: %s\n%s", strerror(errno), log);
	return fd;
}

int main(int argc, char **argv)
{
	int entries = 0, cmd = 0, go[2];

	for (int i = 4; i < argc; i++) {
		if (!strcmp(argv[i], "--entries"))
			entries = 1;
		else if (!strcmp(argv[i], "--")) {
			cmd = i + 1;
			break;
		}
	}
	if (argc < 6 || !cmd || cmd >= argc) {
		fprintf(stderr, "usage: floor LIBC MALLOC_OFF FREE_OFF [--entries] -- CMD [ARGS...]\n");
		return 2;
	}
	uint64_t offsets[2] = { strtoull(argv[2], NULL, 0), strtoull(argv[3], NULL, 0) };
	uint64_t cookies[2] = { entries, 1 };
	int prog = load_prog();
	if (prog < 0 || pipe(go))
		return 1;
	pid_t child = fork();
	if (child == 0) {
		char c;
		close(go[1]);
		if (read(go[0], &c, 1) != 1)
			_exit(127);
		execvp(argv[cmd], argv + cmd);
		perror("floor: exec");
		_exit(127);
	}
	close(go[0]);
	struct link_create_uprobe_multi lc;
	memset(&lc, 0, sizeof(lc));
	lc.prog_fd = prog;
	lc.attach_type = TRACE_UPROBE_SESSION;
	lc.path = (uint64_t)(uintptr_t)argv[1];
	lc.offsets = (uint64_t)(uintptr_t)offsets;
	lc.cookies = (uint64_t)(uintptr_t)cookies;
	lc.cnt = 2;
	lc.pid = child;
	int link = sys_bpf(BPF_LINK_CREATE, &lc, sizeof(lc));
	if (link < 0) {
		fprintf(stderr, "floor: BPF_LINK_CREATE (uprobe session): %s\n", strerror(errno));
		kill(child, 9);
		return 1;
	}
	if (write(go[1], "g", 1) != 1)
		return 1;
	close(go[1]);
	int status;
	if (waitpid(child, &status, 0) < 0)
		return 1;
	close(link);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
