/*
 * bench/outputs' workload: N blocks of 16 bytes, each allocated from a stack of its own (a
 * path of BITS calls through path_a and path_b, chosen by the bits of its index), held until
 * stdin reaches its end. Prints "ready" once they are all allocated.
 * Usage: stacks N   (N <= 2^BITS)
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define BITS 14
#define NOINLINE __attribute__((noinline))

NOINLINE void *path_a(int level, unsigned long bits);
NOINLINE void *path_b(int level, unsigned long bits);

static void *path(int level, unsigned long bits)
{
	if (level == 0)
		return malloc(16);
	return (bits & 1) ? path_a(level - 1, bits >> 1) : path_b(level - 1, bits >> 1);
}

NOINLINE void *path_a(int level, unsigned long bits) { return path(level, bits); }
NOINLINE void *path_b(int level, unsigned long bits) { return path(level, bits); }

int main(int argc, char **argv)
{
	unsigned long n = argc > 1 ? strtoul(argv[1], NULL, 0) : 10000;
	void **kept = calloc(n, sizeof(*kept));
	char c;

	if (!kept || n > (1UL << BITS))
		return 1;
	for (unsigned long i = 0; i < n; i++)
		kept[i] = path(BITS, i);
	printf("ready\n");
	fflush(stdout);
	while (read(0, &c, 1) > 0)
		;
	return kept[0] == NULL;
}
