#!/bin/sh
# Cost of kernel mode on a kmalloc/kmem_cache-heavy loop: pipe2()+close() N times (each pipe:
# kmalloc'd pipe_inode_info and buffers, an inode, dentry and two files; all freed on close).
# Prints ns per iteration without tracing, then with memleak in kernel mode. Run as root.
set -eu
N=${N:-200000}
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/target/release/memleak"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/loop.c" <<'C'
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	long n = atol(argv[1]);
	struct timespec a, b;
	int fd[2];
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++) {
		if (pipe2(fd, 0))
			return 1;
		close(fd[0]);
		close(fd[1]);
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.0f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
	return 0;
}
C
cc -O2 -o "$tmp/loop" "$tmp/loop.c"
echo "pipe2+close, ns per iteration (N=$N)"
echo "  untraced:           $("$tmp/loop" "$N")"
for args in "" "--combined-only"; do
	"$bin" $args 3600 > "$tmp/out" 2>&1 &
	pid=$!
	until grep -q "Attaching to" "$tmp/out"; do sleep 0.1; done
	echo "  memleak ${args:-(default)}: $("$tmp/loop" "$N")"
	kill -INT $pid
	wait $pid || true
done
echo "  untraced again:     $("$tmp/loop" "$N")"
