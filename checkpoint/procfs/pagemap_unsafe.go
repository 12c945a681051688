package procfs

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// pmScanArg is struct pm_scan_arg (include/uapi/linux/fs.h).
type pmScanArg struct {
	size             uint64
	flags            uint64
	start            uint64
	end              uint64
	walkEnd          uint64
	vec              uint64
	vecLen           uint64
	maxPages         uint64
	categoryInverted uint64
	categoryMask     uint64
	categoryAnyOf    uint64
	returnMask       uint64
}

// pagemapScan is PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg).
const pagemapScan = 3<<30 | uint(unsafe.Sizeof(pmScanArg{}))<<16 | 'f'<<8 | 16

// Compile-time layout checks against the uapi structs.
var (
	_ [96 - unsafe.Sizeof(pmScanArg{})]byte
	_ [unsafe.Sizeof(pmScanArg{}) - 96]byte
	_ [24 - unsafe.Sizeof(PageRegion{})]byte
	_ [unsafe.Sizeof(PageRegion{}) - 24]byte
)

// Scan runs one PAGEMAP_SCAN ioctl over [a.Start, a.End) and fills out. It
// returns the filled prefix of out and the address where the walk stopped:
// a.End (page aligned) when the whole range was walked, less when out was
// full or MaxPages was reached. With an empty out, nothing is reported and
// only PMScanWPMatching has an effect. Kernels without PAGEMAP_SCAN (before
// 6.7) give an error wrapping ErrNotSupported.
func (p *Pagemap) Scan(a ScanArgs, out []PageRegion) (regions []PageRegion, walkEnd uint64, err error) {
	arg := &pmScanArg{
		size:             uint64(unsafe.Sizeof(pmScanArg{})),
		flags:            a.Flags,
		start:            a.Start,
		end:              a.End,
		maxPages:         a.MaxPages,
		categoryInverted: uint64(a.CategoryInvertedMask),
		categoryMask:     uint64(a.CategoryMask),
		categoryAnyOf:    uint64(a.CategoryAnyOf),
		returnMask:       uint64(a.ReturnMask),
	}
	// The kernel writes through arg (walk_end) and arg.vec, which it only
	// sees as integers: pin both so they stay on the heap, alive and in
	// place for the duration of the call.
	var pin runtime.Pinner
	defer pin.Unpin()
	pin.Pin(arg)
	if len(out) > 0 {
		pin.Pin(&out[0])
		arg.vec = uint64(uintptr(unsafe.Pointer(&out[0])))
		arg.vecLen = uint64(len(out))
	}
	rc, err := p.f.SyscallConn()
	if err != nil {
		return nil, 0, fmt.Errorf("pagemap scan %#x-%#x: %w", a.Start, a.End, err)
	}
	var n uintptr
	var errno unix.Errno
	cerr := rc.Control(func(fd uintptr) {
		n, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, uintptr(pagemapScan), uintptr(unsafe.Pointer(arg)))
	})
	if cerr != nil {
		return nil, 0, fmt.Errorf("pagemap scan %#x-%#x: %w", a.Start, a.End, cerr)
	}
	if errno != 0 {
		if errors.Is(errno, unix.ENOTTY) {
			return nil, 0, fmt.Errorf("pagemap scan %#x-%#x: %w: %w", a.Start, a.End, ErrNotSupported, errno)
		}
		return nil, 0, fmt.Errorf("pagemap scan %#x-%#x: %w", a.Start, a.End, errno)
	}
	if n > uintptr(len(out)) {
		return nil, 0, fmt.Errorf("pagemap scan %#x-%#x: kernel reported %d regions for %d slots", a.Start, a.End, n, len(out))
	}
	return out[:n], arg.walkEnd, nil
}
