/*
 * Benchmark workload for the unwinder's cost: N malloc/free pairs made at stack depth 10
 * (main -> depth10 -> ... -> depth1 -> malloc), timed inside the process. Prints ns per pair.
 * Usage: unwind_depth [N [wait]]; with "wait" it then waits for a line on stdin, so that a
 * script can read the BPF program's statistics while memleak still has it loaded.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define NOINLINE __attribute__((noinline))

volatile unsigned long sink;

/* Work after free: a tail call to free would hide the next mallocs from the seed's nesting check. */
NOINLINE void depth1(int i) { void *p = malloc(16 + (i & 255)); sink += (unsigned long)p; free(p); sink++; }
NOINLINE void depth2(int i) { depth1(i); sink++; }
NOINLINE void depth3(int i) { depth2(i); sink++; }
NOINLINE void depth4(int i) { depth3(i); sink++; }
NOINLINE void depth5(int i) { depth4(i); sink++; }
NOINLINE void depth6(int i) { depth5(i); sink++; }
NOINLINE void depth7(int i) { depth6(i); sink++; }
NOINLINE void depth8(int i) { depth7(i); sink++; }
NOINLINE void depth9(int i) { depth8(i); sink++; }
NOINLINE void depth10(int i) { depth9(i); sink++; }

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 200000;
	struct timespec a, b;

	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++)
		depth10((int)i);
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("ns per pair: %.0f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
	fflush(stdout);
	if (argc > 2) {
		char line[8];
		if (!fgets(line, sizeof(line), stdin))
			return 1;
	}
	return 0;
}
