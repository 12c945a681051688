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
	// A goroutine blocked in a userfault keeps its P; leave enough Ps for
	// the Loop goroutine whatever the machine's core count.
	runtime.GOMAXPROCS(max(4, runtime.GOMAXPROCS(0)))
	os.Exit(m.Run())
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
