/* The demo: leaks 16 bytes per iteration from main and frees a 64-byte block each time. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	int iterations = argc > 1 ? atoi(argv[1]) : 1000000;
	useconds_t pause = argc > 2 ? (useconds_t)atoi(argv[2]) : 100000;

	for (int i = 0; i < iterations; i++) {
		void *leak = malloc(16);
		void *tmp = malloc(64);
		free(tmp);
		if (!leak)
			return 1;
		usleep(pause);
	}
	return 0;
}
