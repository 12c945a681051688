package uffd

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// FD owns a userfaultfd file descriptor. Its methods are safe for
// concurrent use; Close waits for system calls in flight on the fd, so it
// never closes a number another goroutine is still using.
type FD struct {
	// mu guards fd: every system call on fd holds it for reading, Close
	// and Disown hold it for writing. A blocking ReadMsgs (fd opened
	// without O_NONBLOCK and no message pending) therefore delays Close
	// until a message arrives.
	mu sync.RWMutex
	fd int // -1 once closed or disowned

	// granted holds the features granted by API through this FD
	// (0 before, or when the handshake happened elsewhere).
	granted atomic.Uint64
}

// Open creates a uffd for the calling process's mm with userfaultfd(2).
// flags may combine unix.O_NONBLOCK, unix.O_CLOEXEC and UserModeOnly;
// O_CLOEXEC is always added. When the system call is refused with EPERM
// (vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE, or a seccomp
// filter), Open falls back to /dev/userfaultfd and USERFAULTFD_IOC_NEW.
// The returned FD still needs its API handshake.
func Open(flags int) (*FD, error) {
	if flags&^(unix.O_NONBLOCK|unix.O_CLOEXEC|UserModeOnly) != 0 {
		return nil, fmt.Errorf("open userfaultfd: flags %#x: %w", flags, unix.EINVAL)
	}
	flags |= unix.O_CLOEXEC
	fd, err := sysUserfaultfd(flags)
	if err == nil {
		return &FD{fd: fd}, nil
	}
	if errors.Is(err, unix.ENOSYS) {
		return nil, fmt.Errorf("userfaultfd syscall: %w: %w", ErrNotSupported, err)
	}
	if !errors.Is(err, unix.EPERM) {
		return nil, fmt.Errorf("userfaultfd syscall flags %#x: %w", flags, err)
	}
	fd, devErr := openDev(flags)
	if devErr != nil {
		return nil, errors.Join(fmt.Errorf("userfaultfd syscall: %w", err), devErr)
	}
	return &FD{fd: fd}, nil
}

func openDev(flags int) (int, error) {
	dev, err := unix.Open("/dev/userfaultfd", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/userfaultfd: %w", err)
	}
	defer unix.Close(dev)
	fd, err := sysIocNew(dev, flags)
	if err != nil {
		return -1, fmt.Errorf("USERFAULTFD_IOC_NEW flags %#x: %w", flags, err)
	}
	return fd, nil
}

// FromFile adopts a uffd obtained elsewhere, for example from a target
// process with pidfd_getfd(2). The uffd keeps acting on the mm of the
// process that created it. FromFile duplicates the descriptor (close-on-
// exec): the caller still owns f and should close it; the uffd lives until
// both are closed. It fails if f is not a userfaultfd.
func FromFile(f *os.File) (*FD, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("adopt uffd %s: %w", f.Name(), err)
	}
	nfd := -1
	var dupErr error
	if err := rc.Control(func(fd uintptr) {
		nfd, dupErr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, fmt.Errorf("adopt uffd %s: %w", f.Name(), err)
	}
	if dupErr != nil {
		return nil, fmt.Errorf("dup uffd %s: %w", f.Name(), dupErr)
	}
	u, err := FromRaw(nfd)
	if err != nil {
		unix.Close(nfd)
		return nil, err
	}
	return u, nil
}

// FromRaw takes ownership of the raw descriptor fd, which must be a
// userfaultfd. On error the caller keeps ownership of fd.
func FromRaw(fd int) (*FD, error) {
	if fd < 0 {
		return nil, fmt.Errorf("adopt uffd %d: %w", fd, unix.EBADF)
	}
	// The kernel names the anon inode "[userfaultfd]"
	// (fs/userfaultfd.c:new_userfaultfd); anything else would make every
	// later ioctl fail in confusing ways.
	target, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return nil, fmt.Errorf("adopt uffd %d: %w", fd, err)
	}
	if target != "anon_inode:[userfaultfd]" {
		return nil, fmt.Errorf("adopt uffd %d: is %q, not a userfaultfd: %w", fd, target, unix.EINVAL)
	}
	return &FD{fd: fd}, nil
}

// Fd returns the raw descriptor, or -1 after Close or Disown. The FD still
// owns it.
func (u *FD) Fd() int {
	u.mu.RLock()
	defer u.mu.RUnlock()
	return u.fd
}

// Close closes the descriptor. It waits for system calls in flight on it.
// Closing the last reference to a uffd unregisters its ranges: MISSING
// ranges not yet filled then read as zero, write-protected pages become
// writable (fs/userfaultfd.c:userfaultfd_release). Close is idempotent.
func (u *FD) Close() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.fd < 0 {
		return nil
	}
	fd := u.fd
	u.fd = -1
	if err := unix.Close(fd); err != nil {
		return fmt.Errorf("close uffd %d: %w", fd, err)
	}
	return nil
}

// Disown gives up ownership without closing and returns the raw
// descriptor (-1 if already closed). Later calls on u fail with ErrClosed.
func (u *FD) Disown() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	fd := u.fd
	u.fd = -1
	return fd
}

// use runs f with the descriptor held open.
func (u *FD) use(f func(fd int) error) error {
	u.mu.RLock()
	defer u.mu.RUnlock()
	if u.fd < 0 {
		return ErrClosed
	}
	return f(u.fd)
}

// Probe returns the features the running kernel offers, by an API
// handshake on a throwaway uffd of the calling process.
func Probe() (Feature, error) {
	u, err := Open(0)
	if err != nil {
		return 0, fmt.Errorf("probe uffd features: %w", err)
	}
	defer u.Close()
	a := uffdioAPIArg{api: uffdAPI}
	if err := u.use(func(fd int) error { return apiIoctl(fd, &a) }); err != nil {
		return 0, fmt.Errorf("probe uffd features: UFFDIO_API: %w", err)
	}
	return Feature(a.features), nil
}

// API performs the UFFDIO_API handshake, enabling exactly want. It must be
// called exactly once per uffd (the kernel refuses a second handshake),
// before any other operation. It returns the features granted: want, plus
// FeatureWPUnpopulated when want has FeatureWPAsync (the kernel implies
// it). If the kernel lacks some wanted feature the error wraps
// ErrNotSupported and names them. FeatureEventFork needs CAP_SYS_PTRACE
// (EPERM otherwise).
func (u *FD) API(want Feature) (Feature, error) {
	a := uffdioAPIArg{api: uffdAPI, features: uint64(want)}
	err := u.use(func(fd int) error { return apiIoctl(fd, &a) })
	if err != nil {
		// On EINVAL the kernel zeroes the struct, so ask a fresh uffd
		// which features exist to tell "unsupported" from "misused".
		if errors.Is(err, unix.EINVAL) {
			if avail, perr := Probe(); perr == nil && want&^avail != 0 {
				return 0, fmt.Errorf("uffd api handshake: kernel lacks %v: %w: %w", want&^avail, ErrNotSupported, err)
			}
		}
		return 0, fmt.Errorf("uffd api handshake %v: %w", want, err)
	}
	granted := want
	if want&FeatureWPAsync != 0 {
		granted |= FeatureWPUnpopulated
	}
	u.granted.Store(uint64(granted))
	return granted, nil
}

// Features returns the features granted by API on this FD, or 0 if the
// handshake has not happened through it.
func (u *FD) Features() Feature { return Feature(u.granted.Load()) }

// Register registers [start, start+length) in mode and returns the mask
// of ioctls (Ioctl*) the kernel allows on the range. The range must be
// page aligned and cover whole mappings of a suitable kind.
func (u *FD) Register(start, length uint64, mode Mode) (ioctls uint64, err error) {
	r := uffdioRegisterArg{rng: uffdioRange{start, length}, mode: uint64(mode)}
	if err := u.use(func(fd int) error { return registerIoctl(fd, &r) }); err != nil {
		return 0, fmt.Errorf("register uffd range %#x+%#x mode %#x: %w", start, length, uint64(mode), err)
	}
	return r.ioctls, nil
}

// Unregister removes every registration of this uffd in [start, start+length)
// and wakes threads blocked on faults there.
func (u *FD) Unregister(start, length uint64) error {
	r := uffdioRange{start, length}
	if err := u.use(func(fd int) error { return rangeIoctl(fd, uffdioUnregister, &r) }); err != nil {
		return fmt.Errorf("unregister uffd range %#x+%#x: %w", start, length, err)
	}
	return nil
}

// WriteProtect sets (protect) or clears write protection on a range
// registered with ModeWP. Clearing wakes the threads blocked on the range
// unless dontWake.
func (u *FD) WriteProtect(start, length uint64, protect bool, dontWake bool) error {
	w := uffdioWriteprotectArg{rng: uffdioRange{start, length}}
	if protect {
		w.mode |= writeprotectModeWP
	}
	if dontWake {
		w.mode |= writeprotectModeDontWake
	}
	if err := u.use(func(fd int) error { return writeprotectIoctl(fd, &w) }); err != nil {
		return fmt.Errorf("writeprotect uffd range %#x+%#x protect=%t: %w", start, length, protect, classify(err))
	}
	return nil
}

// Wake wakes the threads blocked on faults in [start, start+length)
// without resolving anything; they retry their access.
func (u *FD) Wake(start, length uint64) error {
	r := uffdioRange{start, length}
	if err := u.use(func(fd int) error { return rangeIoctl(fd, uffdioWake, &r) }); err != nil {
		return fmt.Errorf("wake uffd range %#x+%#x: %w", start, length, classify(err))
	}
	return nil
}

// Copy atomically fills unpopulated pages at dst with src (UFFDIO_COPY).
// len(src) must be a multiple of PageSize. The kernel may stop part way;
// Copy continues as long as it makes progress and returns the bytes copied
// with the error that stopped it: ErrExist means the page at
// dst+copied is already populated, ErrAgain that an event must be read
// first, ErrGone that the process is gone, ErrUnmapped that the range is
// not registered with this uffd (or straddles two mappings).
func (u *FD) Copy(dst uint64, src []byte, mode CopyMode) (int64, error) {
	n, err := u.resolve(dst, uint64(len(src)), func(fd int, off uint64) (int64, error) {
		return copyIoctl(fd, dst+off, src[off:], uint64(mode))
	})
	if err != nil {
		return n, fmt.Errorf("uffd copy %#x+%#x: %w", dst, len(src), err)
	}
	return n, nil
}

// ZeroPage maps the zero page on the unpopulated pages of
// [start, start+length) (UFFDIO_ZEROPAGE), with Copy's partial-progress
// and error semantics.
func (u *FD) ZeroPage(start, length uint64, dontWake bool) (int64, error) {
	var mode uint64
	if dontWake {
		mode = zeropageModeDontWake
	}
	n, err := u.resolve(start, length, func(fd int, off uint64) (int64, error) {
		return rangeOpIoctl(fd, uffdioZeropage, start+off, length-off, mode)
	})
	if err != nil {
		return n, fmt.Errorf("uffd zeropage %#x+%#x: %w", start, length, err)
	}
	return n, nil
}

// Move moves the pages of [src, src+length) to the unpopulated range at
// dst without copying (UFFDIO_MOVE, needs FeatureMove); both ranges are in
// the uffd's mm, dst registered with it. Partial progress and errors as in
// Copy; EBUSY means a source page is shared (e.g. after fork) and cannot be
// moved.
func (u *FD) Move(dst, src, length uint64, mode MoveMode) (int64, error) {
	n, err := u.resolve(dst, length, func(fd int, off uint64) (int64, error) {
		return moveIoctl(fd, dst+off, src+off, length-off, uint64(mode))
	})
	if err != nil {
		return n, fmt.Errorf("uffd move %#x+%#x to %#x: %w", src, length, dst, err)
	}
	return n, nil
}

// Continue maps the page-cache pages already present for a range
// registered with ModeMinor (UFFDIO_CONTINUE), with Copy's partial-progress
// and error semantics.
func (u *FD) Continue(start, length uint64, mode ContinueMode) (int64, error) {
	n, err := u.resolve(start, length, func(fd int, off uint64) (int64, error) {
		return rangeOpIoctl(fd, uffdioContinue, start+off, length-off, uint64(mode))
	})
	if err != nil {
		return n, fmt.Errorf("uffd continue %#x+%#x: %w", start, length, err)
	}
	return n, nil
}

// Poison marks the unpopulated pages of a range as poisoned
// (UFFDIO_POISON, needs FeaturePoison): an access raises SIGBUS, as for a
// hardware memory error. Partial progress and errors as in Copy.
func (u *FD) Poison(start, length uint64, dontWake bool) (int64, error) {
	var mode uint64
	if dontWake {
		mode = poisonModeDontWake
	}
	n, err := u.resolve(start, length, func(fd int, off uint64) (int64, error) {
		return rangeOpIoctl(fd, uffdioPoison, start+off, length-off, mode)
	})
	if err != nil {
		return n, fmt.Errorf("uffd poison %#x+%#x: %w", start, length, err)
	}
	return n, nil
}

// resolve drives one of the filling ioctls over length bytes. op gets the
// offset already done and returns the kernel's result field: bytes done
// (>0) or -errno. The kernel reports a partial fill as EAGAIN with a
// positive count (mm/userfaultfd.c:mfill_atomic, fs/userfaultfd.c:
// userfaultfd_copy); resolve retries from there, so the error it returns
// is the one about the page at start+done.
func (u *FD) resolve(start, length uint64, op func(fd int, off uint64) (int64, error)) (int64, error) {
	var done uint64
	for done < length {
		var res int64
		err := u.use(func(fd int) error {
			var err error
			res, err = op(fd, done)
			return err
		})
		if res > 0 {
			done += uint64(res)
		}
		if err == nil {
			if res <= 0 {
				// Success with no progress would loop forever.
				return int64(done), fmt.Errorf("kernel reported %d bytes at %#x: %w", res, start+done, unix.EIO)
			}
			continue
		}
		if errors.Is(err, unix.EAGAIN) && res > 0 {
			continue
		}
		return int64(done), classify(err)
	}
	return int64(done), nil
}

// maxReadMsgs bounds one read(2): 64 messages, 2 KiB.
const maxReadMsgs = 64

// ReadMsgs reads up to min(len(buf), 64) messages with one read(2) and
// returns how many it decoded. On a non-blocking uffd with nothing pending
// it returns 0, nil. A MsgFork message carries a new fd that the caller
// now owns.
func (u *FD) ReadMsgs(buf []Msg) (int, error) {
	var raw [maxReadMsgs * msgSize]byte
	return u.readMsgs(buf, raw[:])
}

func (u *FD) readMsgs(buf []Msg, raw []byte) (int, error) {
	n := min(len(buf), len(raw)/msgSize)
	if n == 0 {
		return 0, nil
	}
	var got int
	err := u.use(func(fd int) error {
		for {
			r, err := unix.Read(fd, raw[:n*msgSize])
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return nil
			case err != nil:
				return err
			}
			got = r
			return nil
		}
	})
	if err != nil {
		return 0, fmt.Errorf("read uffd messages: %w", err)
	}
	if got%msgSize != 0 {
		return 0, fmt.Errorf("read uffd messages: short read of %d bytes: %w", got, unix.EIO)
	}
	for i := 0; i < got/msgSize; i++ {
		buf[i] = decodeMsg(raw[i*msgSize:])
	}
	return got / msgSize, nil
}
