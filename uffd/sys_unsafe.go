package uffd

import (
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Raw kernel interface: the uapi structures, the ioctl numbers and the
// system calls that take pointers. Everything that needs unsafe lives here.

// Ioctl request numbers, _IOWR/_IOR(0xAA, nr, struct) from
// include/uapi/linux/userfaultfd.h, computed with the C macros by gcc on
// x86_64 (dir<<30 | size<<16 | 0xAA<<8 | nr).
const (
	uffdioAPI          = 0xc018aa3f // _IOWR(UFFDIO, 0x3F, struct uffdio_api)
	uffdioRegister     = 0xc020aa00 // _IOWR(UFFDIO, 0x00, struct uffdio_register)
	uffdioUnregister   = 0x8010aa01 // _IOR(UFFDIO, 0x01, struct uffdio_range)
	uffdioWake         = 0x8010aa02 // _IOR(UFFDIO, 0x02, struct uffdio_range)
	uffdioCopy         = 0xc028aa03 // _IOWR(UFFDIO, 0x03, struct uffdio_copy)
	uffdioZeropage     = 0xc020aa04 // _IOWR(UFFDIO, 0x04, struct uffdio_zeropage)
	uffdioMove         = 0xc028aa05 // _IOWR(UFFDIO, 0x05, struct uffdio_move)
	uffdioWriteprotect = 0xc018aa06 // _IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)
	uffdioContinue     = 0xc020aa07 // _IOWR(UFFDIO, 0x07, struct uffdio_continue)
	uffdioPoison       = 0xc020aa08 // _IOWR(UFFDIO, 0x08, struct uffdio_poison)

	userfaultfdIocNew = 0xaa00 // _IO(USERFAULTFD_IOC, 0x00), on /dev/userfaultfd

	uffdAPI = 0xaa // UFFD_API

	writeprotectModeWP       = 1 << 0 // UFFDIO_WRITEPROTECT_MODE_WP
	writeprotectModeDontWake = 1 << 1 // UFFDIO_WRITEPROTECT_MODE_DONTWAKE
	zeropageModeDontWake     = 1 << 0 // UFFDIO_ZEROPAGE_MODE_DONTWAKE
	poisonModeDontWake       = 1 << 0 // UFFDIO_POISON_MODE_DONTWAKE
)

type uffdioRange struct {
	start, len uint64
}

type uffdioAPIArg struct {
	api, features, ioctls uint64
}

type uffdioRegisterArg struct {
	rng    uffdioRange
	mode   uint64
	ioctls uint64
}

// uffdioCopyArg is struct uffdio_copy and also struct uffdio_move: both
// are dst, src, len, mode, then the signed result.
type uffdioCopyArg struct {
	dst, src, len, mode uint64
	result              int64
}

// uffdioRangeOp is struct uffdio_zeropage, uffdio_continue and
// uffdio_poison: a range, a mode, then the signed result.
type uffdioRangeOp struct {
	rng    uffdioRange
	mode   uint64
	result int64
}

type uffdioWriteprotectArg struct {
	rng  uffdioRange
	mode uint64
}

// Compile-time size checks against the sizes encoded in the ioctl numbers.
var (
	_ [24]byte = [unsafe.Sizeof(uffdioAPIArg{})]byte{}
	_ [32]byte = [unsafe.Sizeof(uffdioRegisterArg{})]byte{}
	_ [16]byte = [unsafe.Sizeof(uffdioRange{})]byte{}
	_ [40]byte = [unsafe.Sizeof(uffdioCopyArg{})]byte{}
	_ [32]byte = [unsafe.Sizeof(uffdioRangeOp{})]byte{}
	_ [24]byte = [unsafe.Sizeof(uffdioWriteprotectArg{})]byte{}
)

// ioctl issues one ioctl with a pointer argument. EINTR is retried: the
// uffd ioctls either completed nothing or report progress in the struct,
// which the callers re-read.
func ioctl(fd int, req uintptr, arg unsafe.Pointer) error {
	for {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return errno
		}
		return nil
	}
}

func sysUserfaultfd(flags int) (int, error) {
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

// sysIocNew asks /dev/userfaultfd for a uffd on the caller's mm; the
// ioctl's argument is the userfaultfd(2) flags, its result the new fd.
func sysIocNew(devfd, flags int) (int, error) {
	fd, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(devfd), userfaultfdIocNew, uintptr(flags))
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

func apiIoctl(fd int, a *uffdioAPIArg) error {
	return ioctl(fd, uffdioAPI, unsafe.Pointer(a))
}

func registerIoctl(fd int, r *uffdioRegisterArg) error {
	return ioctl(fd, uffdioRegister, unsafe.Pointer(r))
}

func rangeIoctl(fd int, req uintptr, r *uffdioRange) error {
	return ioctl(fd, req, unsafe.Pointer(r))
}

func writeprotectIoctl(fd int, w *uffdioWriteprotectArg) error {
	return ioctl(fd, uffdioWriteprotect, unsafe.Pointer(w))
}

// copyIoctl runs UFFDIO_COPY from src. src must stay alive during the call:
// the kernel reads it through the address stored in the struct, which the
// garbage collector does not see.
func copyIoctl(fd int, dst uint64, src []byte, mode uint64) (int64, error) {
	c := uffdioCopyArg{dst: dst, src: uint64(uintptr(unsafe.Pointer(unsafe.SliceData(src)))), len: uint64(len(src)), mode: mode}
	err := ioctl(fd, uffdioCopy, unsafe.Pointer(&c))
	runtime.KeepAlive(src)
	return c.result, err
}

func moveIoctl(fd int, dst, src, length, mode uint64) (int64, error) {
	c := uffdioCopyArg{dst: dst, src: src, len: length, mode: mode}
	err := ioctl(fd, uffdioMove, unsafe.Pointer(&c))
	return c.result, err
}

func rangeOpIoctl(fd int, req uintptr, start, length, mode uint64) (int64, error) {
	z := uffdioRangeOp{rng: uffdioRange{start, length}, mode: mode}
	err := ioctl(fd, req, unsafe.Pointer(&z))
	return z.result, err
}
