/*
 * Benchmark workload.
 *   churn pairs N [THREADS [LEAK_EVERY]]
 *                             N malloc(16 + (i & 255)) per thread, each freed 64 later; prints
 *                             "ns_per_pair X", timed inside the process (start-up excluded).
 *                             With LEAK_EVERY > 0, every LEAK_EVERY-th iteration also leaks a
 *                             1000-byte block from leak_one(). With CHURN_START=wait in the
 *                             environment it first prints "ready" and waits for a line on
 *                             stdin (a tracer attaching with -p); with CHURN_END=wait it waits
 *                             for one after printing its time (a tracer reading its statistics).
 *   churn hold N [SECONDS]    allocates N blocks of 32 bytes from one stack, keeps them, prints
 *                             "holding N", then sleeps
 *   churn maps N [wait]       N times: mmap 16 pages, munmap the last 4 (a trim: a pass over
 *                             the mapping records), munmap the rest (found by its start); prints
 *                             "ns_per_map X"
 *   churn bigpairs N [wait]   N malloc(256 KiB)/free pairs served by mmap (free's munmap ends
 *                             no record: a pass); prints "ns_per_bigpair X"
 *   With "wait", then waits for a line on stdin (for a tracer to read its statistics).
 */
#include <malloc.h>
#include <pthread.h>
#include <sys/mman.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long pairs;
static long leak_every;
static void *volatile leaked;

__attribute__((noinline)) static void leak_one(void)
{
	leaked = malloc(1000);
}

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void *churn(void *arg)
{
	void *ring[64] = { 0 };

	(void)arg;
	for (long i = 0; i < pairs; i++) {
		free(ring[i & 63]);
		ring[i & 63] = malloc(16 + (i & 255));
		if (leak_every > 0 && i % leak_every == 0)
			leak_one();
	}
	for (int i = 0; i < 64; i++)
		free(ring[i]);
	return NULL;
}

static void wait_line(int wait)
{
	char line[16];

	fflush(stdout);
	if (wait && !fgets(line, sizeof(line), stdin))
		return;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "pairs")) {
		int threads = argc > 3 ? atoi(argv[3]) : 1;
		pthread_t tid[64];
		pairs = atol(argv[2]);
		leak_every = argc > 4 ? atol(argv[4]) : 0;
		if (getenv("CHURN_START") && !strcmp(getenv("CHURN_START"), "wait")) {
			printf("ready\n");
			wait_line(1);
		}
		double t0 = now_ns();
		for (int i = 0; i < threads && i < 64; i++)
			pthread_create(&tid[i], NULL, churn, NULL);
		for (int i = 0; i < threads && i < 64; i++)
			pthread_join(tid[i], NULL);
		double t = now_ns() - t0;
		printf("ns_per_pair %.1f\n", t / ((double)pairs * threads));
		wait_line(getenv("CHURN_END") && !strcmp(getenv("CHURN_END"), "wait"));
		return 0;
	}
	if (argc >= 3 && !strcmp(argv[1], "hold")) {
		long n = atol(argv[2]);
		int secs = argc > 3 ? atoi(argv[3]) : 5;
		void **keep = malloc(sizeof(void *) * n);
		for (long i = 0; i < n; i++)
			keep[i] = malloc(32);
		printf("holding %ld\n", n);
		fflush(stdout);
		sleep(secs);
		return keep[0] == NULL;
	}
	if (argc >= 3 && !strcmp(argv[1], "maps")) {
		long n = atol(argv[2]), page = sysconf(_SC_PAGESIZE);
		double t0 = now_ns();
		for (long i = 0; i < n; i++) {
			char *p = mmap(NULL, 16 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (p == MAP_FAILED || munmap(p + 12 * page, 4 * page) || munmap(p, 12 * page))
				return 1;
		}
		printf("ns_per_map %.1f\n", (now_ns() - t0) / n);
		wait_line(argc > 3);
		return 0;
	}
	if (argc >= 3 && !strcmp(argv[1], "bigpairs")) {
		long n = atol(argv[2]);
		/* A fixed threshold: glibc would otherwise raise it after the first free. */
		mallopt(M_MMAP_THRESHOLD, 128 * 1024);
		double t0 = now_ns();
		for (long i = 0; i < n; i++) {
			void *volatile p = malloc(256 * 1024);
			free(p);
		}
		printf("ns_per_bigpair %.1f\n", (now_ns() - t0) / n);
		wait_line(argc > 3);
		return 0;
	}
	fprintf(stderr, "usage: churn pairs N [THREADS [LEAK_EVERY]] | churn hold N [SECONDS] | churn maps N | churn bigpairs N\n");
	return 2;
}
