package uffd

import (
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Test helpers that handle raw memory.

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: userfaultfd with kernel faults and pidfd_getfd need CAP_SYS_PTRACE")
	}
}

// mmapAnon maps npages of private anonymous memory (never Go heap, so the
// runtime never touches it behind the test's back) and unmaps it at
// cleanup. Tests that unmap or move parts of it use mmapOwned instead.
func mmapAnon(t testing.TB, npages int) []byte {
	t.Helper()
	b := mmapRaw(t, npages)
	t.Cleanup(func() { munmapPart(b) })
	return b
}

// mmapOwned is mmapAnon for memory the test punches holes in: the
// cleanup unmaps only the pages not given up with disown, because the
// runtime may have mapped its own memory into the holes meanwhile.
type ownedMapping struct {
	mem   []byte
	owned []bool // per page
}

func mmapOwned(t testing.TB, npages int) *ownedMapping {
	t.Helper()
	m := &ownedMapping{mem: mmapRaw(t, npages), owned: make([]bool, npages)}
	for i := range m.owned {
		m.owned[i] = true
	}
	t.Cleanup(func() {
		for i := 0; i < npages; {
			if !m.owned[i] {
				i++
				continue
			}
			j := i
			for j < npages && m.owned[j] {
				j++
			}
			munmapPart(m.mem[i*PageSize : j*PageSize])
			i = j
		}
	})
	return m
}

// disown records that pages [lo, hi) were unmapped or moved away.
func (m *ownedMapping) disown(lo, hi int) {
	for i := lo; i < hi; i++ {
		m.owned[i] = false
	}
}

func mmapRaw(t testing.TB, npages int) []byte {
	t.Helper()
	p, err := unix.MmapPtr(-1, 0, nil, uintptr(npages*PageSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatalf("mmap %d pages: %v", npages, err)
	}
	b := unsafe.Slice((*byte)(p), npages*PageSize)
	// No THP: the tests count pages and faults at 4 KiB.
	if err := unix.Madvise(b, unix.MADV_NOHUGEPAGE); err != nil {
		t.Fatalf("madvise nohugepage: %v", err)
	}
	return b
}

func addrOf(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b)))) }

// mremapFixed moves the pages of old onto the (same-sized) pages of dst
// with MREMAP_MAYMOVE|MREMAP_FIXED.
func mremapFixed(old, dst []byte) error {
	_, err := unix.MremapPtr(unsafe.Pointer(unsafe.SliceData(old)), uintptr(len(old)), unsafe.Pointer(unsafe.SliceData(dst)), uintptr(len(dst)), unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED)
	return err
}

// munmapPart unmaps the pages of b, a part of a mapping.
func munmapPart(b []byte) error {
	return unix.MunmapPtr(unsafe.Pointer(unsafe.SliceData(b)), uintptr(len(b)))
}

// rawForkExit forks the process with fork(2), the way a C program would
// (Go's own fork shares the mm, which raises no UFFD_EVENT_FORK); the
// child exits at once without running any Go code. It returns the child's
// pid, to be reaped by the caller.
//
//go:norace
//go:nosplit
func rawForkExit() (int, unix.Errno) {
	pid, _, errno := unix.RawSyscall(unix.SYS_FORK, 0, 0, 0)
	if errno != 0 {
		return 0, errno
	}
	if pid == 0 {
		unix.RawSyscall(unix.SYS_EXIT_GROUP, 0, 0, 0)
	}
	return int(pid), 0
}
