package inject

import (
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Minimal userfaultfd ioctls for the tests (include/uapi/linux/userfaultfd.h).
const (
	uffdAPIVersion = 0xAA
	uffdioAPI      = 0xc018aa3f
	uffdioRegister = 0xc020aa00
	uffdioCopy     = 0xc028aa03
	uffdRegMissing = 1
)

func uffdIoctl(f *os.File, req uintptr, arg unsafe.Pointer) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, uintptr(arg))
	if e != 0 {
		return e
	}
	return nil
}

func uffdAPI(f *os.File) error {
	a := struct{ API, Features, Ioctls uint64 }{API: uffdAPIVersion}
	return uffdIoctl(f, uffdioAPI, unsafe.Pointer(&a))
}

func uffdRegister(f *os.File, addr, size uint64) error {
	r := struct{ Start, Len, Mode, Ioctls uint64 }{addr, size, uffdRegMissing, 0}
	return uffdIoctl(f, uffdioRegister, unsafe.Pointer(&r))
}

func uffdCopy(f *os.File, dst uint64, src []byte) error {
	c := struct {
		Dst, Src, Len, Mode uint64
		Copy                int64
	}{dst, uint64(uintptr(unsafe.Pointer(&src[0]))), uint64(len(src)), 0, 0}
	return uffdIoctl(f, uffdioCopy, unsafe.Pointer(&c))
}

// mappedHere reports whether addr is mapped in the test process (msync
// fails with ENOMEM on an unmapped address).
func mappedHere(addr uint64) bool {
	_, _, e := unix.Syscall(unix.SYS_MSYNC, uintptr(addr), 4096, unix.MS_ASYNC)
	return e != unix.ENOMEM
}
