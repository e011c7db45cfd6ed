/*
 * Workload for bench/scan: a heap of known shape for memleak --scan to classify.
 *   scan_target BLOCKS SIZE POINTERS SECONDS
 * allocates BLOCKS blocks of SIZE bytes; in each, POINTERS words point at other blocks
 * (chosen at random, some of them into the interior), the other words hold data that points
 * nowhere. Every 16th block is kept only by other blocks, every 64th by nothing. Prints
 * "ready PID" once all is built, then sleeps SECONDS.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 5)
		return 2;
	long n = atol(argv[1]);
	size_t size = (size_t)atol(argv[2]);
	long ptrs = atol(argv[3]);
	int secs = atoi(argv[4]);
	long words = (long)(size / 8);
	void ***blocks = malloc(n * sizeof(*blocks));
	unsigned long x = 88172645463325252UL;
	if (!blocks)
		return 1;
	for (long i = 0; i < n; i++) {
		blocks[i] = malloc(size);
		if (!blocks[i])
			return 1;
		memset(blocks[i], 0x5a, size);
	}
	for (long i = 0; i < n; i++) {
		for (long k = 0; k < ptrs && k < words; k++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			char *t = (char *)blocks[x % n];
			blocks[i][k] = t + ((x >> 32) % 4 == 0 ? 8 : 0);
		}
	}
	/* The root keeps most blocks; the others are kept by blocks or by nothing. */
	for (long i = 0; i < n; i++)
		if (i % 16 == 0)
			blocks[i] = NULL;
	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	sleep(secs);
	return 0;
}
