// workload.c: a self-verifying memory workload for cowmig tests.
//
// Every page this program writes carries a header {magic, owner<<32|page,
// gen, ~gen} and a body derived from (owner, page, gen), and every writer
// keeps a step counter in its own memory. A clone restored from a snapshot taken at any
// instant T0 can therefore check, from its own memory alone, that its pages
// match its counters, i.e. that memory and counters come from the same T0.
//
// Invariant of a writer with counter c over npages pages: page j holds
// gen = the largest g < c with g mod npages == j. The initial fill runs
// c from 0 to npages, so every page has been written before "ready". Page
// (c mod npages) may be mid-write while the writer runs; verification pauses
// every writer at a safe point between steps (after the counter store), so
// at that point it holds a complete page and all pages are checked.
//
// The churn thread owns NSLOTS regions. Step s works on slot s mod NSLOTS
// with operation s mod 4 (munmap+mmap, MADV_DONTNEED, mremap, MADV_FREE) and
// refills it with gen s. A slot is marked BUSY before it is touched and
// VALID after, then the churn counter is stored; so at a safe point every
// slot is VALID with gen = the largest g < S with g mod NSLOTS == slot.
//
// Signals are blocked in every thread and taken by the main thread with
// sigwait(), so no work at all happens in signal handlers.
//   SIGUSR1: pause, verify, resume, print "verify ok pages=<n> steps=<sum>"
//            or "verify FAIL <first failure> (bad=<n> pages=<n>)".
//   SIGUSR2: print "counters w0=<c> ... [thp=<c>] [file=<c>] [churn=<s>
//            munmap=<n> dontneed=<n> mremap=<n> free=<n>] [forks=<n>]".
//   SIGTERM, SIGINT: exit 0.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MIB (1024UL * 1024UL)
#define HUGE (2UL * MIB)
#define MAGIC 0x315767696d776f63ULL /* "cowmigW1" little-endian */
#define NSLOTS 16
#define SLOT_UNIT (64UL * 1024UL) /* slots are 1..16 units: 64 KiB..1 MiB */
#define MAXW 64
#define FILE_LEN MIB
#define FORK_SCRIBBLE MIB
#define FORK_PERIOD_NS (50L * 1000L * 1000L)

enum { OWNER_THP = 0x80, OWNER_FILE = 0x100, OWNER_SLOT = 0x200 };
enum { SLOT_EMPTY = 0, SLOT_BUSY = 1, SLOT_VALID = 2 };
enum { OP_MUNMAP = 0, OP_DONTNEED = 1, OP_MREMAP = 2, OP_FREE = 3 };

// A page writer. Lives in the anonymous control mapping, one cache line
// each, so that counters are ordinary process memory like the pages.
struct worker {
	uint64_t counter; // steps done; the next step writes page counter % npages
	uint64_t npages;
	unsigned char *base;
	uint32_t owner;
	int halted; // set by the selftest while the writer is paused; guarded by G.mu
	char name[16];
} __attribute__((aligned(64)));

struct slot {
	unsigned char *addr;
	uint64_t len;
	uint64_t gen;
	uint32_t state; // SLOT_*; BUSY while the churn thread works on it
};

struct ctl {
	struct worker w[MAXW];
	struct slot slot[NSLOTS];
	uint64_t churn_steps; // next churn step; slot churn_steps % NSLOTS is the one in progress
	uint64_t churn_ops[4];
	uint64_t forks;
	uint64_t fork_bad;       // fork children that did not exit 0
	int fork_bad_status;     // wait status of the last bad child
};

// Process-wide state. Fields other than the pause protocol are written
// only by main() before the threads start.
static struct {
	struct ctl *ctl;
	int nw;       // page writers in ctl->w: writers, then thp, then file
	int nthreads; // plain writers
	int thp, churn, fork, quiet;
	int corrupt; // 0, or the corrupt() mode: 1 = -selftest-corrupt, 2 = -selftest-tear
	uint64_t rate; // pages per second per thread, 0 = unlimited
	const char *filemap;

	pthread_mutex_t mu;
	pthread_cond_t cv;
	int pause_req; // atomic; writers read it between steps
	int npaused;   // threads inside safe_point(); guarded by mu
	int nactive;   // threads that honour pause requests; guarded by mu
} G = {
	.mu = PTHREAD_MUTEX_INITIALIZER,
	.cv = PTHREAD_COND_INITIALIZER,
};

static void write_all(int fd, const char *buf, size_t n)
{
	while (n > 0) {
		ssize_t k = write(fd, buf, n);
		if (k < 0) {
			if (errno == EINTR)
				continue;
			return; // nobody is listening; nothing better to do
		}
		buf += k;
		n -= (size_t)k;
	}
}

// say prints one line to stdout with a single write(2), so lines from
// different moments never interleave and nothing sits in a stdio buffer.
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char buf[4096];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof buf)
		n = sizeof buf - 1;
	write_all(1, buf, (size_t)n);
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n > sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	write_all(2, "workload: ", 10);
	write_all(2, buf, (size_t)n);
	exit(2);
}

static uint64_t splitmix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static uint64_t page_seed(uint32_t owner, uint32_t page, uint64_t gen)
{
	return splitmix(splitmix(gen) ^ ((uint64_t)owner << 32 | page));
}

// The body is four interleaved xorshift64 streams: independent lanes let
// the CPU overlap them, which makes a page about four times cheaper than a
// single stream, and every word still depends on (owner, page, gen).
#define LANES 4
#define HDR_WORDS 4

static void lanes_init(uint64_t x[LANES], uint32_t owner, uint32_t page, uint64_t gen)
{
	uint64_t s = page_seed(owner, page, gen);
	for (int l = 0; l < LANES; l++) {
		x[l] = splitmix(s + (uint64_t)l);
		if (x[l] == 0)
			x[l] = 0x9e3779b97f4a7c15ULL; // xorshift must not start at 0
	}
}

static inline uint64_t xorshift(uint64_t x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

// fill_page writes one whole page: the header {magic, owner<<32|page, gen,
// ~gen}, then the body.
static void fill_page(unsigned char *p, uint32_t owner, uint32_t page, uint64_t gen)
{
	uint64_t *q = (uint64_t *)p;
	uint64_t x[LANES];
	q[0] = MAGIC;
	q[1] = (uint64_t)owner << 32 | page;
	q[2] = gen;
	q[3] = ~gen;
	lanes_init(x, owner, page, gen);
	for (size_t i = HDR_WORDS; i < PAGE / 8; i += LANES) {
		for (int l = 0; l < LANES; l++) {
			x[l] = xorshift(x[l]);
			q[i + (size_t)l] = x[l];
		}
	}
}

// check_page returns 0 if p is exactly what fill_page(owner, page, gen)
// writes, else 1 with a description in why.
static int check_page(const unsigned char *p, uint32_t owner, uint32_t page, uint64_t gen,
		      char *why, size_t n)
{
	const uint64_t *q = (const uint64_t *)p;
	uint64_t x[LANES];
	if (q[0] != MAGIC || q[1] != ((uint64_t)owner << 32 | page) || q[2] != gen || q[3] != ~gen) {
		snprintf(why, n, "expected gen %llu, found magic %#llx owner %#llx page %llu gen %llu",
			 (unsigned long long)gen, (unsigned long long)q[0],
			 (unsigned long long)(q[1] >> 32), (unsigned long long)(q[1] & 0xffffffffu),
			 (unsigned long long)q[2]);
		return 1;
	}
	lanes_init(x, owner, page, gen);
	for (size_t i = HDR_WORDS; i < PAGE / 8; i += LANES) {
		for (int l = 0; l < LANES; l++) {
			x[l] = xorshift(x[l]);
			if (q[i + (size_t)l] != x[l]) {
				snprintf(why, n, "gen %llu header ok but body differs at byte %zu",
					 (unsigned long long)gen, (i + (size_t)l) * 8);
				return 1;
			}
		}
	}
	return 0;
}

// expected_gen is the largest g < c with g mod n == j (requires c >= n).
static uint64_t expected_gen(uint64_t c, uint64_t j, uint64_t n)
{
	return (c - 1) - (((c - 1) - j) % n);
}

static void sleep_ns(long ns)
{
	struct timespec ts = {.tv_sec = ns / 1000000000L, .tv_nsec = ns % 1000000000L};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

// A pacer holds a thread near its rate of pages per second. The machine has two
// cores and tests run several workloads at once, so unlimited writers would
// starve everything else. It resets when it is far behind (after a pause or
// a checkpoint freeze) or far ahead (the monotonic clock differs after a
// restore on another boot), so it never sleeps long or bursts to catch up.
struct pacer {
	uint64_t rate; // pages per second, 0 = unlimited
	int64_t t0;
	uint64_t done, unchecked;
};

static void pace(struct pacer *p, uint64_t pages)
{
	p->done += pages;
	p->unchecked += pages;
	if (p->unchecked < 64)
		return;
	p->unchecked = 0;
	if (p->rate == 0) {
		if (p->done % 4096 < 64)
			sched_yield();
		return;
	}
	int64_t now = now_ns();
	int64_t target = p->t0 + (int64_t)(p->done * 1000000000ULL / p->rate);
	int64_t ahead = target - now;
	if (ahead > 100000000LL || ahead < -100000000LL) {
		p->t0 = now;
		p->done = 0;
		return;
	}
	if (ahead > 0)
		sleep_ns(ahead > 10000000LL ? 10000000L : (long)ahead);
	else if (p->done % 4096 < 64)
		sched_yield();
}

// safe_point parks the calling thread while a pause is requested. It
// returns 1 if the thread was halted by the selftest while parked.
static int safe_point(struct worker *w)
{
	if (!__atomic_load_n(&G.pause_req, __ATOMIC_ACQUIRE))
		return 0;
	pthread_mutex_lock(&G.mu);
	G.npaused++;
	pthread_cond_broadcast(&G.cv);
	while (G.pause_req)
		pthread_cond_wait(&G.cv, &G.mu);
	if (w != NULL && w->halted) {
		// pause_all's caller already took us out of npaused and nactive.
		pthread_mutex_unlock(&G.mu);
		return 1;
	}
	G.npaused--;
	pthread_mutex_unlock(&G.mu);
	return 0;
}

static void pause_all(void)
{
	pthread_mutex_lock(&G.mu);
	__atomic_store_n(&G.pause_req, 1, __ATOMIC_RELEASE);
	while (G.npaused < G.nactive)
		pthread_cond_wait(&G.cv, &G.mu);
	pthread_mutex_unlock(&G.mu);
}

static void resume_all(void)
{
	pthread_mutex_lock(&G.mu);
	__atomic_store_n(&G.pause_req, 0, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&G.cv);
	pthread_mutex_unlock(&G.mu);
}

static void writer_step(struct worker *w)
{
	uint64_t c = __atomic_load_n(&w->counter, __ATOMIC_RELAXED);
	uint64_t j = c % w->npages;
	fill_page(w->base + j * PAGE, w->owner, (uint32_t)j, c);
	// Release: the page is complete in memory before the counter says so.
	__atomic_store_n(&w->counter, c + 1, __ATOMIC_RELEASE);
}

static void *writer_main(void *arg)
{
	struct worker *w = arg;
	struct pacer pc = {.rate = G.rate, .t0 = now_ns()};
	for (;;) {
		if (safe_point(w))
			return NULL;
		writer_step(w);
		pace(&pc, 1);
	}
	return NULL;
}

static size_t slot_len(int k, uint64_t s)
{
	return SLOT_UNIT * (1 + splitmix(((uint64_t)k << 56) ^ s) % 16);
}

static unsigned char *map_anon(size_t len, int prot)
{
	void *p = mmap(NULL, len, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap %zu bytes: %s", len, strerror(errno));
	return p;
}

static void fill_slot(struct slot *sl, int k)
{
	for (uint64_t i = 0; i < sl->len / PAGE; i++)
		fill_page(sl->addr + i * PAGE, OWNER_SLOT + (uint32_t)k, (uint32_t)i, sl->gen);
}

// churn_step performs step s on slot s % NSLOTS and returns the pages it wrote.
static uint64_t churn_step(uint64_t s)
{
	struct ctl *ctl = G.ctl;
	int k = (int)(s % NSLOTS);
	int op = (int)(s % 4);
	struct slot *sl = &ctl->slot[k];
	size_t newlen = slot_len(k, s);

	__atomic_store_n(&sl->state, SLOT_BUSY, __ATOMIC_RELEASE);
	__atomic_signal_fence(__ATOMIC_SEQ_CST);
	unsigned char *addr = sl->addr;
	size_t len = sl->len;
	switch (op) {
	case OP_MUNMAP:
		if (munmap(addr, len) != 0)
			die("munmap slot %d: %s", k, strerror(errno));
		addr = map_anon(newlen, PROT_READ | PROT_WRITE);
		len = newlen;
		break;
	case OP_DONTNEED:
		if (madvise(addr, len, MADV_DONTNEED) != 0)
			die("madvise(DONTNEED) slot %d: %s", k, strerror(errno));
		break;
	case OP_MREMAP:
		if ((s / 4) % 2 == 0) {
			// Move onto a placeholder mapping so the target address is
			// ours for sure, replacing it atomically.
			void *dst = map_anon(newlen, PROT_NONE);
			void *p = mremap(addr, len, newlen, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
			if (p == MAP_FAILED)
				die("mremap(FIXED) slot %d: %s", k, strerror(errno));
			addr = p;
		} else {
			void *p = mremap(addr, len, newlen, MREMAP_MAYMOVE);
			if (p == MAP_FAILED)
				die("mremap(MAYMOVE) slot %d: %s", k, strerror(errno));
			addr = p;
		}
		len = newlen;
		break;
	case OP_FREE:
		if (madvise(addr, len, MADV_FREE) != 0)
			die("madvise(FREE) slot %d: %s", k, strerror(errno));
		break;
	}
	sl->addr = addr;
	sl->len = len;
	sl->gen = s;
	fill_slot(sl, k);
	__atomic_store_n(&sl->state, SLOT_VALID, __ATOMIC_RELEASE);
	__atomic_add_fetch(&ctl->churn_ops[op], 1, __ATOMIC_RELAXED);
	__atomic_store_n(&ctl->churn_steps, s + 1, __ATOMIC_RELEASE);
	return len / PAGE;
}

static void *churn_main(void *arg)
{
	(void)arg;
	// Churn pages cost page faults and syscalls on top of the fill; a
	// quarter of the writers' rate (25k pages/s by default) is still about
	// 200 munmap/madvise/mremap operations per second.
	struct pacer pc = {.rate = G.rate == 0 ? 0 : (G.rate + 3) / 4, .t0 = now_ns()};
	for (;;) {
		safe_point(NULL);
		uint64_t s = __atomic_load_n(&G.ctl->churn_steps, __ATOMIC_RELAXED);
		pace(&pc, churn_step(s));
	}
	return NULL;
}

// fork_child runs in the forked child: only async-signal-safe work, no
// malloc. It overwrites FORK_SCRIBBLE bytes of the writers' pages, which
// must stay invisible to the parent (and to any snapshot of the parent).
static void fork_child(uint64_t n)
{
	struct ctl *ctl = G.ctl;
	for (uint64_t i = 0; i < FORK_SCRIBBLE / PAGE; i++) {
		struct worker *w = &ctl->w[i % (uint64_t)G.nw];
		uint64_t j = (n * 37 + i) % w->npages;
		memset(w->base + j * PAGE, 0xa5, PAGE);
	}
	_exit(0);
}

static void *fork_main(void *arg)
{
	(void)arg;
	struct ctl *ctl = G.ctl;
	for (uint64_t n = 0;; n++) {
		sleep_ns(FORK_PERIOD_NS);
		pid_t pid = fork();
		if (pid == 0)
			fork_child(n);
		if (pid < 0) {
			if (errno == EAGAIN || errno == ENOMEM)
				continue;
			die("fork: %s", strerror(errno));
		}
		int status = 0;
		while (waitpid(pid, &status, 0) < 0) {
			if (errno != EINTR)
				die("waitpid %d: %s", (int)pid, strerror(errno));
		}
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			__atomic_store_n(&ctl->fork_bad_status, status, __ATOMIC_RELAXED);
			__atomic_add_fetch(&ctl->fork_bad, 1, __ATOMIC_RELAXED);
		}
		__atomic_add_fetch(&ctl->forks, 1, __ATOMIC_RELAXED);
	}
	return NULL;
}

struct vres {
	uint64_t pages, steps, bad;
	char first[512];
};

static void fail(struct vres *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(struct vres *r, const char *fmt, ...)
{
	if (r->bad++ == 0) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(r->first, sizeof r->first, fmt, ap);
		va_end(ap);
	}
}

// verify checks every page, slot and counter. Preconditions: all threads
// that honour pauses are parked (pause_all).
static void verify(struct vres *r)
{
	struct ctl *ctl = G.ctl;
	char why[256];
	for (int i = 0; i < G.nw; i++) {
		struct worker *w = &ctl->w[i];
		uint64_t c = __atomic_load_n(&w->counter, __ATOMIC_ACQUIRE);
		r->steps += c;
		if (c < w->npages) {
			fail(r, "%s counter %llu below its %llu pages", w->name,
			     (unsigned long long)c, (unsigned long long)w->npages);
			continue;
		}
		for (uint64_t j = 0; j < w->npages; j++) {
			r->pages++;
			uint64_t g = expected_gen(c, j, w->npages);
			if (check_page(w->base + j * PAGE, w->owner, (uint32_t)j, g, why, sizeof why))
				fail(r, "%s page %llu (counter %llu): %s", w->name,
				     (unsigned long long)j, (unsigned long long)c, why);
		}
	}
	if (G.churn) {
		uint64_t s = __atomic_load_n(&ctl->churn_steps, __ATOMIC_ACQUIRE);
		r->steps += s;
		for (int k = 0; k < NSLOTS; k++) {
			struct slot *sl = &ctl->slot[k];
			uint32_t st = __atomic_load_n(&sl->state, __ATOMIC_ACQUIRE);
			if (st != SLOT_VALID) {
				fail(r, "churn slot %d in state %u at a safe point", k, st);
				continue;
			}
			uint64_t g = s < NSLOTS ? 0 : expected_gen(s, (uint64_t)k, NSLOTS);
			if (s < NSLOTS || sl->gen != g) {
				fail(r, "churn slot %d (steps %llu): expected gen %llu, found gen %llu", k,
				     (unsigned long long)s, (unsigned long long)g,
				     (unsigned long long)sl->gen);
				continue;
			}
			if (sl->len < SLOT_UNIT || sl->len > 16 * SLOT_UNIT || sl->len % SLOT_UNIT) {
				fail(r, "churn slot %d: bad length %llu", k, (unsigned long long)sl->len);
				continue;
			}
			for (uint64_t i = 0; i < sl->len / PAGE; i++) {
				r->pages++;
				if (check_page(sl->addr + i * PAGE, OWNER_SLOT + (uint32_t)k, (uint32_t)i, g,
					       why, sizeof why))
					fail(r, "churn slot %d page %llu: %s", k, (unsigned long long)i, why);
			}
		}
	}
	uint64_t bad = __atomic_load_n(&ctl->fork_bad, __ATOMIC_RELAXED);
	if (bad)
		fail(r, "%llu fork children did not exit 0 (last wait status %#x)",
		     (unsigned long long)bad, __atomic_load_n(&ctl->fork_bad_status, __ATOMIC_RELAXED));
}

static void do_verify(void)
{
	static struct vres r; // main thread only; too large for comfort on the stack
	memset(&r, 0, sizeof r);
	pause_all();
	verify(&r);
	resume_all();
	if (r.bad == 0)
		say("verify ok pages=%llu steps=%llu\n", (unsigned long long)r.pages,
		    (unsigned long long)r.steps);
	else
		say("verify FAIL %s (bad=%llu pages=%llu)\n", r.first, (unsigned long long)r.bad,
		    (unsigned long long)r.pages);
}

static void do_counters(void)
{
	struct ctl *ctl = G.ctl;
	char buf[4096];
	size_t n = 0;
	n += (size_t)snprintf(buf + n, sizeof buf - n, "counters");
	for (int i = 0; i < G.nw && n < sizeof buf; i++)
		n += (size_t)snprintf(buf + n, sizeof buf - n, " %s=%llu", ctl->w[i].name,
				      (unsigned long long)__atomic_load_n(&ctl->w[i].counter, __ATOMIC_RELAXED));
	if (G.churn && n < sizeof buf)
		n += (size_t)snprintf(buf + n, sizeof buf - n,
				      " churn=%llu munmap=%llu dontneed=%llu mremap=%llu free=%llu",
				      (unsigned long long)__atomic_load_n(&ctl->churn_steps, __ATOMIC_RELAXED),
				      (unsigned long long)__atomic_load_n(&ctl->churn_ops[OP_MUNMAP], __ATOMIC_RELAXED),
				      (unsigned long long)__atomic_load_n(&ctl->churn_ops[OP_DONTNEED], __ATOMIC_RELAXED),
				      (unsigned long long)__atomic_load_n(&ctl->churn_ops[OP_MREMAP], __ATOMIC_RELAXED),
				      (unsigned long long)__atomic_load_n(&ctl->churn_ops[OP_FREE], __ATOMIC_RELAXED));
	if (G.fork && n < sizeof buf)
		n += (size_t)snprintf(buf + n, sizeof buf - n, " forks=%llu",
				      (unsigned long long)__atomic_load_n(&ctl->forks, __ATOMIC_RELAXED));
	if (n >= sizeof buf - 1)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	write_all(1, buf, n);
}

// corrupt damages the page writer 0 wrote last and halts writer 0, so the
// damage stays until the next verify (which must then fail). Mode 1 zeroes
// the page; mode 2 tears it: its second half is replaced by the same half
// of the page's next generation, as a snapshot that caught a write made
// after T0 would, which only the body check can see.
static void corrupt(int mode)
{
	static uint64_t next[PAGE / 8]; // main thread only
	struct worker *w = &G.ctl->w[0];
	pause_all();
	uint64_t c = w->counter;
	uint64_t j = (c - 1) % w->npages;
	unsigned char *pg = w->base + j * PAGE;
	if (mode == 1) {
		memset(pg, 0, PAGE);
	} else {
		fill_page((unsigned char *)next, w->owner, (uint32_t)j, c - 1 + w->npages);
		memcpy(pg + PAGE / 2, (unsigned char *)next + PAGE / 2, PAGE / 2);
	}
	pthread_mutex_lock(&G.mu);
	w->halted = 1;
	G.nactive--;
	G.npaused--; // writer 0 is parked in safe_point and leaves without counting itself out
	pthread_mutex_unlock(&G.mu);
	resume_all();
	if (!G.quiet)
		fprintf(stderr, "workload: selftest: %s %s page %llu and halted it\n",
			mode == 1 ? "zeroed" : "tore", w->name, (unsigned long long)j);
}

static struct worker *add_worker(const char *name, uint32_t owner, unsigned char *base, size_t len)
{
	if (G.nw >= MAXW)
		die("too many writers");
	struct worker *w = &G.ctl->w[G.nw++];
	snprintf(w->name, sizeof w->name, "%s", name);
	w->owner = owner;
	w->base = base;
	w->npages = len / PAGE;
	// Initial fill: steps 0..npages-1, so every page has a generation.
	for (uint64_t c = 0; c < w->npages; c++)
		writer_step(w);
	return w;
}

static unsigned char *map_thp(size_t len)
{
	unsigned char *raw = map_anon(len + HUGE, PROT_READ | PROT_WRITE);
	uintptr_t start = ((uintptr_t)raw + HUGE - 1) & ~(uintptr_t)(HUGE - 1);
	size_t head = start - (uintptr_t)raw;
	if (head > 0 && munmap(raw, head) != 0)
		die("munmap thp head: %s", strerror(errno));
	if (HUGE - head > 0 && munmap((unsigned char *)start + len, HUGE - head) != 0)
		die("munmap thp tail: %s", strerror(errno));
	if (madvise((void *)start, len, MADV_HUGEPAGE) != 0)
		die("madvise(HUGEPAGE): %s", strerror(errno));
	return (unsigned char *)start;
}

static unsigned char *map_file(const char *path)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open %s: %s", path, strerror(errno));
	if (ftruncate(fd, (off_t)FILE_LEN) != 0)
		die("ftruncate %s: %s", path, strerror(errno));
	void *p = mmap(NULL, FILE_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	if (p == MAP_FAILED)
		die("mmap %s: %s", path, strerror(errno));
	close(fd);
	return p;
}

static void start_thread(void *(*fn)(void *), void *arg)
{
	pthread_t t;
	int err = pthread_create(&t, NULL, fn, arg);
	if (err != 0)
		die("pthread_create: %s", strerror(err));
	pthread_detach(t);
}

static void usage(void)
{
	die("usage: workload [-mem MiB] [-threads N] [-thp] [-churn] [-fork] [-filemap PATH] "
	    "[-rate PAGES/S] [-quiet] [-selftest-corrupt | -selftest-tear]");
}

static uint64_t num_arg(int argc, char **argv, int *i)
{
	if (*i + 1 >= argc)
		usage();
	char *end;
	errno = 0;
	unsigned long long v = strtoull(argv[++*i], &end, 10);
	if (errno != 0 || *end != '\0' || argv[*i][0] == '-')
		usage();
	return v;
}

static void parse(int argc, char **argv, uint64_t *mem)
{
	*mem = 64;
	G.nthreads = 4;
	G.rate = 100000;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (a[0] == '-' && a[1] == '-')
			a++; // accept --flag as well as -flag
		if (strcmp(a, "-mem") == 0)
			*mem = num_arg(argc, argv, &i);
		else if (strcmp(a, "-threads") == 0)
			G.nthreads = (int)num_arg(argc, argv, &i);
		else if (strcmp(a, "-rate") == 0)
			G.rate = num_arg(argc, argv, &i);
		else if (strcmp(a, "-thp") == 0)
			G.thp = 1;
		else if (strcmp(a, "-churn") == 0)
			G.churn = 1;
		else if (strcmp(a, "-fork") == 0)
			G.fork = 1;
		else if (strcmp(a, "-quiet") == 0)
			G.quiet = 1;
		else if (strcmp(a, "-selftest-corrupt") == 0)
			G.corrupt = 1;
		else if (strcmp(a, "-selftest-tear") == 0)
			G.corrupt = 2;
		else if (strcmp(a, "-filemap") == 0 && i + 1 < argc)
			G.filemap = argv[++i];
		else
			usage();
	}
	if (G.nthreads < 1 || G.nthreads > MAXW - 2)
		die("-threads must be 1..%d", MAXW - 2);
	if (*mem < 1 || *mem > 1024 * 1024)
		die("-mem must be 1..1048576 MiB");
}

int main(int argc, char **argv)
{
	uint64_t mem;
	parse(argc, argv, &mem);

	// Block the control signals before any thread exists: every thread
	// inherits the mask and only sigwait() below ever takes them.
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigaddset(&set, SIGUSR2);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	int err = pthread_sigmask(SIG_BLOCK, &set, NULL);
	if (err != 0)
		die("pthread_sigmask: %s", strerror(err));

	G.ctl = (struct ctl *)map_anon(sizeof(struct ctl), PROT_READ | PROT_WRITE);
	size_t per = (size_t)(mem * MIB / (uint64_t)G.nthreads) & ~(PAGE - 1);
	if (per < PAGE)
		die("-mem %llu is too small for %d threads", (unsigned long long)mem, G.nthreads);
	char name[16];
	for (int i = 0; i < G.nthreads; i++) {
		snprintf(name, sizeof name, "w%d", i);
		add_worker(name, (uint32_t)i, map_anon(per, PROT_READ | PROT_WRITE), per);
	}
	if (G.thp) {
		size_t len = (per + HUGE - 1) & ~(HUGE - 1);
		add_worker("thp", OWNER_THP, map_thp(len), len);
	}
	if (G.filemap)
		add_worker("file", OWNER_FILE, map_file(G.filemap), FILE_LEN);
	if (G.churn) {
		for (int k = 0; k < NSLOTS; k++) {
			struct slot *sl = &G.ctl->slot[k];
			sl->len = slot_len(k, (uint64_t)k);
			sl->addr = map_anon(sl->len, PROT_READ | PROT_WRITE);
			sl->gen = (uint64_t)k;
			fill_slot(sl, k);
			sl->state = SLOT_VALID;
		}
		G.ctl->churn_steps = NSLOTS;
	}

	G.nactive = G.nw + G.churn;
	for (int i = 0; i < G.nw; i++)
		start_thread(writer_main, &G.ctl->w[i]);
	if (G.churn)
		start_thread(churn_main, NULL);
	if (G.fork)
		start_thread(fork_main, NULL);

	if (!G.quiet) {
		fprintf(stderr, "workload: pid %d, %d writers of %zu KiB, rate %llu pages/s%s%s%s%s\n",
			(int)getpid(), G.nthreads, per / 1024, (unsigned long long)G.rate,
			G.thp ? ", thp" : "", G.churn ? ", churn" : "", G.fork ? ", fork" : "",
			G.filemap ? ", filemap" : "");
		for (int i = 0; i < G.nw; i++)
			fprintf(stderr, "workload: %s %p+%#llx\n", G.ctl->w[i].name, (void *)G.ctl->w[i].base,
				(unsigned long long)(G.ctl->w[i].npages * PAGE));
	}
	say("ready %d\n", (int)getpid());
	if (G.corrupt)
		corrupt(G.corrupt);

	for (;;) {
		int sig = 0;
		err = sigwait(&set, &sig);
		if (err == EINTR)
			continue;
		if (err != 0)
			die("sigwait: %s", strerror(err));
		switch (sig) {
		case SIGUSR1:
			do_verify();
			break;
		case SIGUSR2:
			do_counters();
			break;
		case SIGTERM:
		case SIGINT:
			_exit(0);
		}
	}
}
