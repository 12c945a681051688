package procfs

import (
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// requireRoot skips tests that need root (ptrace-read of other processes,
// setns, userfaultfd).
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (euid 0) to read other processes' /proc files and use setns/userfaultfd")
	}
}

// addrOf is the address of an mmap'ed slice.
func addrOf(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }

// mmapT maps memory and unmaps it when the test ends.
func mmapT(t *testing.T, fd int, off int64, length, prot, flags int) []byte {
	t.Helper()
	b, err := unix.Mmap(fd, off, length, prot, flags)
	if err != nil {
		t.Fatalf("mmap %d bytes: %v", length, err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// setAnonName names an anonymous range (PR_SET_VMA_ANON_NAME, Linux 5.17).
func setAnonName(b []byte, name string) error {
	p, err := unix.BytePtrFromString(name)
	if err != nil {
		return err
	}
	return unix.Prctl(unix.PR_SET_VMA, unix.PR_SET_VMA_ANON_NAME, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unsafe.Pointer(p)))
}

// userfaultfd uapi (linux/userfaultfd.h), only what the WP_ASYNC test needs.
const (
	uffdAPI                = 0xAA
	uffdioAPI              = 0xC018AA3F // _IOWR(0xAA, 0x3F, struct uffdio_api)
	uffdioRegister         = 0xC020AA00 // _IOWR(0xAA, 0x00, struct uffdio_register)
	uffdRegisterModeWP     = 1 << 1
	uffdFeaturePagefaultWP = 1 << 0
	uffdFeatureWPAsync     = 1 << 15
)

type uffdioAPIArg struct{ api, features, ioctls uint64 }

type uffdioRegisterArg struct{ start, len, mode, ioctls uint64 }

// uffdWPAsync creates a userfaultfd with async write-protect and registers b
// for WP. It returns the fd, or an errno the test should skip on.
func uffdWPAsync(b []byte) (int, error) {
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno != 0 {
		return -1, errno
	}
	api := &uffdioAPIArg{api: uffdAPI, features: uffdFeatureWPAsync | uffdFeaturePagefaultWP}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, uffdioAPI, uintptr(unsafe.Pointer(api))); errno != 0 {
		unix.Close(int(fd))
		return -1, errno
	}
	reg := &uffdioRegisterArg{start: addrOf(b), len: uint64(len(b)), mode: uffdRegisterModeWP}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, uffdioRegister, uintptr(unsafe.Pointer(reg))); errno != 0 {
		unix.Close(int(fd))
		return -1, errno
	}
	return int(fd), nil
}
