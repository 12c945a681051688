package uffd

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Error kinds, for errors.Is. The errno that caused one stays in the chain.
var (
	// ErrNotSupported: the kernel lacks userfaultfd, a feature or an ioctl.
	ErrNotSupported = errors.New("userfaultfd feature not supported")
	// ErrClosed: the FD or Loop was closed or disowned.
	ErrClosed = errors.New("userfaultfd closed")
	// ErrExist: the destination page is already populated (EEXIST). For a
	// fault resolver this means "already done".
	ErrExist = errors.New("page already present")
	// ErrAgain: the mm is changing under a non-cooperative event
	// (remove, unmap, remap, fork) that has not been read yet (EAGAIN).
	// Read the uffd's events, then retry.
	ErrAgain = errors.New("uffd event pending, retry after reading events")
	// ErrGone: the mm the uffd acts on has exited (ESRCH, ENOSPC).
	ErrGone = errors.New("address space gone")
	// ErrUnmapped: the destination is not (any more) a range registered
	// with this uffd (ENOENT), e.g. the process unmapped it, or a
	// multi-page request straddles two mappings.
	ErrUnmapped = errors.New("range not registered with uffd")
)

// classify maps an errno returned by a resolving ioctl (COPY, ZEROPAGE,
// MOVE, CONTINUE, POISON, WRITEPROTECT, WAKE) to this package's kinds. It is
// the one place that does so; callers never compare errnos themselves.
//
//   - EEXIST: mfill_atomic found a populated pte; another resolver (or an
//     earlier copy of ours) got there first, so the page is done.
//   - EAGAIN: ctx->mmap_changing is raised between the moment a
//     non-cooperative event is queued and the moment its originator wakes
//     after the monitor read it (fs/userfaultfd.c:
//     userfaultfd_event_wait_completion). The kernel also uses EAGAIN for a
//     partial copy, which the resolvers in this package retry themselves.
//   - ESRCH: mmget_not_zero(ctx->mm) failed, the process is gone; older
//     kernels reported the same situation as ENOSPC.
//   - ENOENT: no vma registered with this ctx covers the whole range.
//
// Anything else is returned unclassified (still wrapping the errno).
func classify(errno error) error {
	var kind error
	switch {
	case errors.Is(errno, unix.EEXIST):
		kind = ErrExist
	case errors.Is(errno, unix.EAGAIN):
		kind = ErrAgain
	case errors.Is(errno, unix.ESRCH), errors.Is(errno, unix.ENOSPC):
		kind = ErrGone
	case errors.Is(errno, unix.ENOENT):
		kind = ErrUnmapped
	default:
		return errno
	}
	return fmt.Errorf("%w: %w", kind, errno)
}
