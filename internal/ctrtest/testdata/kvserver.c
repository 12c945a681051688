// kvserver.c: the container workload of cowmig's containerd tests, demo and
// benchmark. Built static (gcc -static -O2 -pthread) so an image needs
// nothing but this binary.
//
//   kvserver -mib N -port P [-threads T] [-rate PAGES/S] [-selftest-corrupt]
//
// It maps N MiB of private anonymous memory, splits it among T writer
// threads and fills it; then each writer rewrites its pages one after the
// other forever. Page j of a writer written at step (generation) g holds a
// header {MAGIC, owner<<32|j, g, ~g} and a body that is a pure function of
// (owner, j, g). Each writer keeps its step counter c in process memory
// (a separate mapping), stored after the page is complete. Invariant at a
// safe point: page j holds generation = the largest g < c with
// g mod npages == j. So the program can check from its own memory alone
// that its pages and counters belong to the same instant, which is what a
// clone restored from a snapshot taken at any moment must satisfy.
//
// The main thread serves a TCP line protocol on 0.0.0.0:P with a plain
// blocking accept() loop: no epoll, poll, eventfd or timerfd, no signal
// handlers, no children (cowmig's checkpoint engine refuses or does not
// need them). One connection carries one request line and one answer line:
//   GET     -> "count <sum of counters> mib <N>"        (no pause: cheap)
//   VERIFY  -> "verify ok count=<c> pages=<n> sum=<hex>" or
//              "verify FAIL <first failure> bad=<n>"
//              (pauses the writers at a safe point unless already paused)
//   PAUSE   -> "paused count=<c> sum=<hex>"  (writers stay parked)
//   RESUME  -> "resumed"
//   other   -> "error unknown command"
// sum is a 64-bit FNV-1a style hash over every 8-byte word of the page
// area, in page order; with the writers paused two processes with the same
// memory print the same sum. stdout gets "ready" once the fill is done and
// the socket listens (connections made earlier wait in the backlog).
//
// -rate limits each writer to PAGES/S pages per second (default 50000,
// 0 = as fast as possible). -selftest-corrupt flips one byte of a page
// right before every VERIFY check (while paused), so VERIFY must fail:
// tests use it to show the check can fail.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define MIB (1024UL * 1024UL)
#define MAGIC 0x3156526576724b76ULL /* "vKrveRV1" little-endian */
#define MAXW 64
#define HDR_WORDS 4
#define LINE_MAX_LEN 128

struct writer {
	uint64_t counter; // steps done; step c writes page c % npages with gen c
	uint64_t npages;
	unsigned char *base;
	uint32_t owner;
} __attribute__((aligned(64)));

// Process-wide state, written by main() before the writers start except
// for the pause protocol fields and the counters.
static struct {
	struct writer *w; // in its own anonymous mapping
	int nw;
	uint64_t mib;
	unsigned char *mem;
	uint64_t npages;
	uint64_t rate;
	int corrupt;

	pthread_mutex_t mu;
	pthread_cond_t cv;
	int pause_req; // atomic; writers read it between steps
	int npaused;   // writers parked in safe_point(); guarded by mu
	int paused;    // PAUSE in effect; main thread only
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
			return;
		}
		buf += k;
		n -= (size_t)k;
	}
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n > sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	write_all(2, "kvserver: ", 10);
	write_all(2, buf, (size_t)n);
	exit(1);
}

static uint64_t splitmix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

// Four independent xorshift lanes keep the fill from being one long
// dependency chain.
#define LANES 4
static void lanes_init(uint64_t x[LANES], uint32_t owner, uint64_t page, uint64_t gen)
{
	uint64_t s = splitmix(((uint64_t)owner << 40) ^ page ^ splitmix(gen));
	for (int l = 0; l < LANES; l++) {
		s = splitmix(s);
		x[l] = s | 1; // xorshift must not start at 0
	}
}

static inline uint64_t xorshift(uint64_t x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

static void fill_page(unsigned char *p, uint32_t owner, uint64_t page, uint64_t gen)
{
	uint64_t *q = (uint64_t *)p;
	uint64_t x[LANES];
	q[0] = MAGIC;
	q[1] = (uint64_t)owner << 32 | page;
	q[2] = gen;
	q[3] = ~gen;
	lanes_init(x, owner, page, gen);
	for (size_t i = HDR_WORDS; i < PAGE / 8; i += LANES)
		for (int l = 0; l < LANES; l++) {
			x[l] = xorshift(x[l]);
			q[i + (size_t)l] = x[l];
		}
}

// check_page returns 0 if p is what fill_page(owner, page, gen) writes,
// else 1 with the reason in why.
static int check_page(const unsigned char *p, uint32_t owner, uint64_t page, uint64_t gen,
		      char *why, size_t n)
{
	const uint64_t *q = (const uint64_t *)p;
	uint64_t x[LANES];
	if (q[0] != MAGIC || q[1] != ((uint64_t)owner << 32 | page) || q[2] != gen || q[3] != ~gen) {
		snprintf(why, n, "w%u page %llu: want gen %llu, found magic %#llx id %#llx gen %llu",
			 owner, (unsigned long long)page, (unsigned long long)gen,
			 (unsigned long long)q[0], (unsigned long long)q[1],
			 (unsigned long long)q[2]);
		return 1;
	}
	lanes_init(x, owner, page, gen);
	for (size_t i = HDR_WORDS; i < PAGE / 8; i += LANES)
		for (int l = 0; l < LANES; l++) {
			x[l] = xorshift(x[l]);
			if (q[i + (size_t)l] != x[l]) {
				snprintf(why, n, "w%u page %llu: gen %llu header ok, body differs at byte %zu",
					 owner, (unsigned long long)page, (unsigned long long)gen,
					 (i + (size_t)l) * 8);
				return 1;
			}
		}
	return 0;
}

// expected_gen is the largest g < c with g mod n == j (requires c >= n).
static uint64_t expected_gen(uint64_t c, uint64_t j, uint64_t n)
{
	return (c - 1) - (((c - 1) - j) % n);
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

// pace holds a writer near G.rate pages per second. It starts over when far
// behind or ahead (after a pause, a checkpoint freeze, or a restore on a
// host whose monotonic clock differs), so it never bursts or sleeps long.
struct pacer {
	int64_t t0;
	uint64_t done;
};

static void pace(struct pacer *p)
{
	p->done++;
	if (G.rate == 0 || p->done % 64 != 0)
		return;
	int64_t now = now_ns();
	int64_t ahead = p->t0 + (int64_t)(p->done * 1000000000ULL / G.rate) - now;
	if (ahead > 100000000LL || ahead < -100000000LL) {
		p->t0 = now;
		p->done = 0;
		return;
	}
	if (ahead > 0) {
		struct timespec ts = {.tv_sec = 0, .tv_nsec = ahead > 10000000LL ? 10000000L : (long)ahead};
		while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
			;
	}
}

// safe_point parks the calling writer while a pause is requested. Between
// steps every page of the writer is complete and matches its counter.
static void safe_point(void)
{
	if (!__atomic_load_n(&G.pause_req, __ATOMIC_ACQUIRE))
		return;
	pthread_mutex_lock(&G.mu);
	G.npaused++;
	pthread_cond_broadcast(&G.cv);
	while (G.pause_req)
		pthread_cond_wait(&G.cv, &G.mu);
	G.npaused--;
	pthread_mutex_unlock(&G.mu);
}

static void pause_all(void)
{
	pthread_mutex_lock(&G.mu);
	__atomic_store_n(&G.pause_req, 1, __ATOMIC_RELEASE);
	while (G.npaused < G.nw)
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

static void *writer_main(void *arg)
{
	struct writer *w = arg;
	struct pacer pc = {.t0 = now_ns()};
	for (;;) {
		safe_point();
		uint64_t c = __atomic_load_n(&w->counter, __ATOMIC_RELAXED);
		fill_page(w->base + (c % w->npages) * PAGE, w->owner, c % w->npages, c);
		// Release: the page is complete in memory before the counter says so.
		__atomic_store_n(&w->counter, c + 1, __ATOMIC_RELEASE);
		pace(&pc);
	}
	return NULL;
}

static uint64_t count(void)
{
	uint64_t sum = 0;
	for (int i = 0; i < G.nw; i++)
		sum += __atomic_load_n(&G.w[i].counter, __ATOMIC_ACQUIRE);
	return sum;
}

static uint64_t checksum(void)
{
	const uint64_t *q = (const uint64_t *)G.mem;
	uint64_t h = 0xcbf29ce484222325ULL;
	for (uint64_t i = 0; i < G.npages * (PAGE / 8); i++) {
		h ^= q[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

// verify checks every page against its writer's counter. Preconditions:
// the writers are paused.
static void verify(char *out, size_t n)
{
	if (G.corrupt) {
		// The page writer 0 will rewrite next: resuming heals it, so
		// the selftest leaves no lasting damage behind.
		struct writer *w = &G.w[0];
		G.w[0].base[(w->counter % w->npages) * PAGE + 100] ^= 0x5a;
	}
	char first[200] = "";
	uint64_t bad = 0;
	for (int i = 0; i < G.nw; i++) {
		struct writer *w = &G.w[i];
		for (uint64_t j = 0; j < w->npages; j++) {
			char why[200];
			if (check_page(w->base + j * PAGE, w->owner, j, expected_gen(w->counter, j, w->npages),
				       why, sizeof why) != 0) {
				if (bad++ == 0)
					memcpy(first, why, sizeof first);
			}
		}
	}
	if (bad > 0)
		snprintf(out, n, "verify FAIL %s bad=%llu", first, (unsigned long long)bad);
	else
		snprintf(out, n, "verify ok count=%llu pages=%llu sum=%016llx",
			 (unsigned long long)count(), (unsigned long long)G.npages,
			 (unsigned long long)checksum());
}

static void answer(const char *cmd, char *out, size_t n)
{
	if (strcmp(cmd, "GET") == 0) {
		snprintf(out, n, "count %llu mib %llu", (unsigned long long)count(),
			 (unsigned long long)G.mib);
	} else if (strcmp(cmd, "VERIFY") == 0) {
		if (G.paused) {
			verify(out, n);
		} else {
			pause_all();
			verify(out, n);
			resume_all();
		}
	} else if (strcmp(cmd, "PAUSE") == 0) {
		if (!G.paused) {
			pause_all();
			G.paused = 1;
		}
		snprintf(out, n, "paused count=%llu sum=%016llx", (unsigned long long)count(),
			 (unsigned long long)checksum());
	} else if (strcmp(cmd, "RESUME") == 0) {
		if (G.paused) {
			G.paused = 0;
			resume_all();
		}
		snprintf(out, n, "resumed");
	} else {
		snprintf(out, n, "error unknown command");
	}
}

// serve_one reads one request line from connection c and answers it.
static void serve_one(int c)
{
	char line[LINE_MAX_LEN];
	size_t len = 0;
	for (;;) {
		ssize_t k = read(c, line + len, sizeof line - 1 - len);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			break; // EOF, error or SO_RCVTIMEO: answer what we have
		len += (size_t)k;
		if (memchr(line, '\n', len) != NULL || len == sizeof line - 1)
			break;
	}
	line[len] = 0;
	line[strcspn(line, "\r\n")] = 0;
	char out[400];
	answer(line, out, sizeof out - 1);
	size_t m = strlen(out);
	out[m++] = '\n';
	size_t off = 0;
	while (off < m) {
		// MSG_NOSIGNAL: a client gone early must not kill us with SIGPIPE.
		ssize_t k = send(c, out + off, m - off, MSG_NOSIGNAL);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			break;
		off += (size_t)k;
	}
}

static uint64_t parse_u64(const char *flag, const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno != 0 || *s == 0 || *end != 0)
		die("bad value %s for %s", s, flag);
	return v;
}

int main(int argc, char **argv)
{
	uint64_t mib = 0, port = 0, threads = 1;
	G.rate = 50000;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (a[0] == '-' && a[1] == '-')
			a++; // accept --flag as well as -flag
		if (strcmp(a, "-selftest-corrupt") == 0) {
			G.corrupt = 1;
			continue;
		}
		if (i + 1 >= argc)
			die("usage: kvserver -mib N -port P [-threads T] [-rate PAGES/S] [-selftest-corrupt]");
		if (strcmp(a, "-mib") == 0)
			mib = parse_u64(a, argv[++i]);
		else if (strcmp(a, "-port") == 0)
			port = parse_u64(a, argv[++i]);
		else if (strcmp(a, "-threads") == 0)
			threads = parse_u64(a, argv[++i]);
		else if (strcmp(a, "-rate") == 0)
			G.rate = parse_u64(a, argv[++i]);
		else
			die("unknown option %s", argv[i]);
	}
	if (mib == 0 || port == 0 || port > 65535 || threads == 0 || threads > MAXW)
		die("need -mib > 0, -port 1..65535, -threads 1..%d", MAXW);
	G.mib = mib;
	G.nw = (int)threads;
	G.npages = mib * MIB / PAGE;
	if (G.npages < threads)
		die("%llu pages cannot be split among %llu writers", (unsigned long long)G.npages,
		    (unsigned long long)threads);

	// Listen first so clients can connect while the memory fills.
	int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (ls < 0)
		die("socket: %s", strerror(errno));
	int one = 1;
	if (setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0)
		die("SO_REUSEADDR: %s", strerror(errno));
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				 .sin_addr = {.s_addr = htonl(INADDR_ANY)}};
	if (bind(ls, (struct sockaddr *)&sa, sizeof sa) != 0)
		die("bind 0.0.0.0:%llu: %s", (unsigned long long)port, strerror(errno));
	if (listen(ls, 128) != 0)
		die("listen: %s", strerror(errno));

	void *ctl = mmap(NULL, sizeof(struct writer) * MAXW, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void *mem = mmap(NULL, G.npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ctl == MAP_FAILED || mem == MAP_FAILED)
		die("mmap %llu MiB: %s", (unsigned long long)mib, strerror(errno));
	G.w = ctl;
	G.mem = mem;
	uint64_t per = G.npages / threads, start = 0;
	for (int i = 0; i < G.nw; i++) {
		struct writer *w = &G.w[i];
		w->owner = (uint32_t)i;
		w->npages = i == G.nw - 1 ? G.npages - start : per;
		w->base = G.mem + start * PAGE;
		start += w->npages;
		for (uint64_t j = 0; j < w->npages; j++)
			fill_page(w->base + j * PAGE, w->owner, j, j);
		w->counter = w->npages;
	}
	for (int i = 0; i < G.nw; i++) {
		pthread_t th;
		int err = pthread_create(&th, NULL, writer_main, &G.w[i]);
		if (err != 0)
			die("pthread_create: %s", strerror(err));
		pthread_detach(th);
	}
	write_all(1, "ready\n", 6);

	for (;;) {
		int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0) {
			if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE)
				continue;
			die("accept: %s", strerror(errno));
		}
		// A client that connects and says nothing must not block the
		// server for long.
		struct timeval tv = {.tv_sec = 2};
		setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
		serve_one(c);
		close(c);
	}
}
