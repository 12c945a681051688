// Test target for package inject. Modes (argv[1]):
//   cmd      read commands from stdin, one per line:
//              "readfd N"  read up to 255 bytes from fd N and print "data:<bytes>"
//              "quit"      exit 0
//   threads  like cmd, plus 4 threads spinning on counters and the main
//            thread in a clock_nanosleep loop; commands are served by a
//            thread blocked in read(0). "check" waits until every spinner
//            advanced, then prints "running"; a failed nanosleep prints
//            "nanosleep-failed" and exits 3.
//   churn    cmd, plus 2 threads that keep creating and joining short-lived
//            threads (the thread set changes while it is being seized).
//   seccomp  cmd behind a seccomp filter: userfaultfd and socketpair -> EPERM.
//   sigign   cmd with SIGTRAP ignored.
//   init     pid 1 of a pid namespace: reaps children, printing
//            "reaped <pid> <status>" for each, until stdin says "quit".
// Every mode prints "ready <pid> <tid of the stdin reader>" when set up.
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#define NSPIN 4
static volatile unsigned long counters[NSPIN];

static void *spin(void *arg) {
	long i = (long)arg;
	for (;;) counters[i]++;
	return NULL;
}

static int serve(void) {
	char line[256];
	for (;;) {
		ssize_t n = 0;
		// Read one line byte by byte so that nothing is lost in a buffer.
		for (;;) {
			ssize_t r = read(0, line + n, 1);
			if (r < 0 && errno == EINTR) { printf("read-eintr\n"); return 4; }
			if (r <= 0) return 0;
			if (line[n] == '\n' || n == (ssize_t)sizeof line - 2) break;
			n++;
		}
		line[n] = 0;
		if (!strcmp(line, "quit")) { printf("bye\n"); return 0; }
		if (!strncmp(line, "readfd ", 7)) {
			char buf[256];
			ssize_t r = read(atoi(line + 7), buf, 255);
			if (r < 0) { printf("readfd-error %d\n", errno); continue; }
			buf[r] = 0;
			printf("data:%s\n", buf);
			continue;
		}
		if (!strcmp(line, "check")) {
			unsigned long before[NSPIN];
			for (int i = 0; i < NSPIN; i++) before[i] = counters[i];
			struct timespec t0, t;
			clock_gettime(CLOCK_MONOTONIC, &t0);
			for (;;) {
				int all = 1;
				for (int i = 0; i < NSPIN; i++) if (counters[i] == before[i]) all = 0;
				if (all) { printf("running\n"); break; }
				clock_gettime(CLOCK_MONOTONIC, &t);
				if (t.tv_sec - t0.tv_sec > 10) { printf("stuck\n"); break; }
				sched_yield();
			}
			continue;
		}
		printf("unknown:%s\n", line);
	}
}

static void *reader(void *arg) {
	(void)arg;
	printf("ready %d %ld\n", getpid(), (long)syscall(SYS_gettid));
	exit(serve());
}

static void onchld(int s) { (void)s; }

static void *shortlived(void *arg) {
	volatile int x = 0;
	for (int i = 0; i < 1000; i++) x += i;
	return arg;
}

static void *spawner(void *arg) {
	for (;;) {
		pthread_t t;
		if (pthread_create(&t, NULL, shortlived, arg) == 0) pthread_join(t, NULL);
	}
	return NULL;
}

int main(int argc, char **argv) {
	setvbuf(stdout, NULL, _IONBF, 0);
	const char *mode = argc > 1 ? argv[1] : "cmd";
	if (!strcmp(mode, "threads")) {
		pthread_t t;
		for (long i = 0; i < NSPIN; i++) pthread_create(&t, NULL, spin, (void *)i);
		pthread_create(&t, NULL, reader, NULL);
		for (;;) {
			struct timespec ts = {0, 20 * 1000 * 1000};
			if (clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL) != 0) { printf("nanosleep-failed\n"); exit(3); }
		}
	}
	if (!strcmp(mode, "churn")) {
		pthread_t t;
		pthread_create(&t, NULL, spawner, NULL);
		pthread_create(&t, NULL, spawner, NULL);
	}
	if (!strcmp(mode, "seccomp")) {
		struct sock_filter f[] = {
			BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
			BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_userfaultfd, 1, 0),
			BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_socketpair, 0, 1),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		};
		struct sock_fprog prog = {sizeof f / sizeof f[0], f};
		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)) {
			printf("seccomp-failed %d\n", errno);
			return 2;
		}
	}
	if (!strcmp(mode, "sigign")) signal(SIGTRAP, SIG_IGN);
	if (!strcmp(mode, "init")) {
		sigset_t chld, old;
		sigemptyset(&chld);
		sigaddset(&chld, SIGCHLD);
		struct sigaction sa = {0};
		sa.sa_handler = onchld;
		sigaction(SIGCHLD, &sa, NULL);
		sigprocmask(SIG_BLOCK, &chld, &old);
		printf("ready %d %d\n", getpid(), getpid());
		for (;;) {
			int st;
			pid_t p;
			while ((p = waitpid(-1, &st, WNOHANG)) > 0)
				printf("reaped %d %d\n", p, WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
			sigsuspend(&old);
		}
	}
	printf("ready %d %d\n", getpid(), getpid());
	return serve();
}
