// memload: the workload of cowmig's benchmark (bench/cowbench builds it).
//
//   memload -mib N [-thp] [-writes W] [-verify]
//
// It maps N MiB of private anonymous memory (2 MiB aligned; MADV_HUGEPAGE
// with -thp, MADV_NOHUGEPAGE otherwise so the result does not depend on the
// system's THP setting), writes a position-dependent pattern into every
// word, prints "ready <pid>" and then waits for signals:
//
//   SIGUSR1  write phase: W 8-byte writes, each to a distinct page chosen by
//            a fixed permutation, each timed with CLOCK_MONOTONIC; prints
//            "writes n=W p50_ns= p90_ns= p99_ns= max_ns= mean_ns= total_us="
//   SIGUSR2  prints "sum <hex>", a position-dependent checksum of the region
//   SIGTERM, SIGINT  exit 0
//
// With -verify the checksum is also printed once after the fill, before
// "ready". A clone restored from a checkpoint must report the checksum its
// source had at checkpoint time (take it with SIGUSR2 right before).
//
// The process stays single-threaded: the signals are blocked and taken with
// sigwaitinfo in the main loop, so no code runs in a signal handler and the
// checkpoint engine sees one thread. sigwaitinfo returns EINTR when the
// process is seized or restored in the middle of it; the loop just retries.
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define HUGE (2UL << 20)
#define SEED 0x5bd1e9955bd1e995ULL

static uint64_t *region;   // the workload memory
static size_t nwords;      // region size in 8-byte words
static size_t npages;      // region size in pages
static size_t nwrites;     // writes per phase
static uint64_t *lat;      // per-write latencies of the current phase
static uint64_t *sorted;   // scratch for percentiles
static unsigned phase;     // write phases run so far

static void die(const char *what) {
	fprintf(stderr, "memload: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

// fill writes word i = (i * golden) ^ SEED: no word of a page repeats in
// another page, so a page restored at the wrong address changes the sum.
static void fill(void) {
	for (size_t i = 0; i < nwords; i++)
		region[i] = (i * 0x9e3779b97f4a7c15ULL) ^ SEED;
}

// checksum mixes every word with its index (xor, multiply, xor-shift,
// multiply: a bijection of the word for a fixed index), so a page restored
// at the wrong address or read as zero changes the sum; two accumulators
// keep both multipliers busy.
static inline uint64_t mix(uint64_t w, uint64_t i) {
	uint64_t x = w ^ (i * 0xd6e8feb86659fd93ULL);
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 32;
	return x * 0xc4ceb9fe1a85ec53ULL;
}

static uint64_t checksum(void) {
	uint64_t a = 0, b = 0;
	size_t i = 0;
	for (; i + 1 < nwords; i += 2) {
		a += mix(region[i], i);
		b += mix(region[i + 1], i + 1);
	}
	for (; i < nwords; i++)
		a += mix(region[i], i);
	return a ^ (b << 1 | b >> 63);
}

static size_t gcd(size_t a, size_t b) {
	while (b) {
		size_t t = a % b;
		a = b;
		b = t;
	}
	return a;
}

static int cmp_u64(const void *x, const void *y) {
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
	return a < b ? -1 : a > b;
}

// pct is the nearest-rank percentile of the sorted latencies.
static uint64_t pct(size_t n, unsigned p) {
	size_t k = (n * p + 99) / 100;
	if (k == 0)
		k = 1;
	return sorted[k - 1];
}

// write_phase touches nwrites distinct pages: page(k) = start + k*stride mod
// npages with stride coprime to npages visits distinct pages for k < npages.
// Every phase starts elsewhere, so phases mostly hit different pages.
static void write_phase(void) {
	size_t stride = (size_t)(0x9e3779b1ULL % npages);
	if (stride == 0)
		stride = 1;
	while (gcd(stride, npages) != 1)
		stride++;
	size_t start = ((size_t)phase * 7919u) % npages;
	uint64_t val = 0xc0ffee0000000000ULL | ((uint64_t)phase << 32);
	phase++;

	uint64_t t0 = now_ns();
	size_t pg = start;
	for (size_t k = 0; k < nwrites; k++) {
		volatile uint64_t *p = region + pg * (PAGE / 8) + (k % (PAGE / 8));
		uint64_t a = now_ns();
		__asm__ volatile("" ::: "memory");
		*p = val | k;
		__asm__ volatile("" ::: "memory");
		uint64_t b = now_ns();
		lat[k] = b - a;
		pg += stride;
		if (pg >= npages)
			pg -= npages;
	}
	uint64_t total = now_ns() - t0;

	uint64_t sum = 0;
	memcpy(sorted, lat, nwrites * sizeof *lat);
	for (size_t k = 0; k < nwrites; k++)
		sum += lat[k];
	qsort(sorted, nwrites, sizeof *sorted, cmp_u64);
	printf("writes n=%zu p50_ns=%" PRIu64 " p90_ns=%" PRIu64 " p99_ns=%" PRIu64
	       " max_ns=%" PRIu64 " mean_ns=%" PRIu64 " total_us=%" PRIu64 "\n",
	       nwrites, pct(nwrites, 50), pct(nwrites, 90), pct(nwrites, 99),
	       sorted[nwrites - 1], sum / nwrites, total / 1000);
	fflush(stdout);
}

static void usage(void) {
	fprintf(stderr, "usage: memload -mib N [-thp] [-writes W] [-verify]\n");
	exit(2);
}

int main(int argc, char **argv) {
	size_t mib = 0;
	int thp = 0, verify = 0;
	nwrites = 20000;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "-mib") && i + 1 < argc)
			mib = strtoull(argv[++i], NULL, 10);
		else if (!strcmp(argv[i], "-writes") && i + 1 < argc)
			nwrites = strtoull(argv[++i], NULL, 10);
		else if (!strcmp(argv[i], "-thp"))
			thp = 1;
		else if (!strcmp(argv[i], "-verify"))
			verify = 1;
		else
			usage();
	}
	if (mib == 0 || nwrites == 0)
		usage();

	// Block the signals first: one sent early stays pending, never kills.
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGUSR2);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	if (sigprocmask(SIG_BLOCK, &set, NULL))
		die("sigprocmask");

	size_t len = mib << 20;
	// Over-map by 2 MiB and trim so the region is one 2 MiB-aligned VMA.
	char *raw = mmap(NULL, len + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (raw == MAP_FAILED)
		die("mmap");
	char *base = (char *)(((uintptr_t)raw + HUGE - 1) & ~(uintptr_t)(HUGE - 1));
	if (base > raw && munmap(raw, base - raw))
		die("munmap head");
	size_t tail = (size_t)(raw + len + HUGE - (base + len));
	if (tail && munmap(base + len, tail))
		die("munmap tail");
	if (madvise(base, len, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE))
		die("madvise");
	region = (uint64_t *)base;
	nwords = len / 8;
	npages = len / PAGE;
	if (nwrites > npages)
		nwrites = npages;

	lat = malloc(nwrites * sizeof *lat);
	sorted = malloc(nwrites * sizeof *sorted);
	if (!lat || !sorted)
		die("malloc");
	// Touch the scratch now so a write phase does not fault it in.
	memset(lat, 0, nwrites * sizeof *lat);
	memset(sorted, 0, nwrites * sizeof *sorted);

	fill();
	if (verify)
		printf("sum %016" PRIx64 "\n", checksum());
	printf("ready %d\n", (int)getpid());
	fflush(stdout);

	for (;;) {
		siginfo_t si;
		int sig = sigwaitinfo(&set, &si);
		if (sig < 0) {
			if (errno == EINTR)
				continue;
			die("sigwaitinfo");
		}
		switch (sig) {
		case SIGUSR1:
			write_phase();
			break;
		case SIGUSR2:
			printf("sum %016" PRIx64 "\n", checksum());
			fflush(stdout);
			break;
		default:
			return 0;
		}
	}
}
