package uffd

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

const childEnv = "UFFD_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		os.Exit(runChild())
	}
	os.Exit(m.Run())
}

// inProcessFaults prepares a test whose own goroutines fault on memory
// the test's Loop serves. A goroutine blocked in a userfault keeps its P.
// If the Loop then cannot get a P, the runtime preempts the faulting
// goroutine with a signal, which withdraws its still unread fault message
// (fs/userfaultfd.c:handle_userfault), so the Loop wakes to find nothing,
// and the two can chase each other forever with GOMAXPROCS=1 (go test
// -cpu 1). Four Ps leave room for a reader, Fill and the Loop.
func inProcessFaults(t testing.TB) {
	t.Helper()
	prev := runtime.GOMAXPROCS(max(4, runtime.GOMAXPROCS(0)))
	t.Cleanup(func() { runtime.GOMAXPROCS(prev) })
}

// runChild is the target process of TestRemoteMM: it creates a uffd for
// its own mm and a 16-page mapping, prints "fd addr", then answers each
// line on stdin with the byte sum of its first four pages, and exits at
// EOF.
func runChild() int {
	mem, err := unix.Mmap(-1, 0, 16*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child mmap:", err)
		return 1
	}
	fd, err := sysUserfaultfd(unix.O_CLOEXEC)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child userfaultfd:", err)
		return 1
	}
	fmt.Printf("%d %d\n", fd, addrOf(mem))
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if strings.TrimSpace(in.Text()) != "sum" {
			continue
		}
		var sum uint64
		for _, c := range mem[:4*PageSize] {
			sum += uint64(c)
		}
		fmt.Println(sum)
	}
	return 0
}

// checkFDs fails the test if it leaks file descriptors.
func checkFDs(t *testing.T) {
	t.Helper()
	count := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatalf("list fds: %v", err)
		}
		return len(ents)
	}
	before := count()
	t.Cleanup(func() {
		if after := count(); after != before {
			t.Errorf("fd leak: %d open fds before the test, %d after", before, after)
		}
	})
}
