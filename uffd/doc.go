// Package uffd drives Linux userfaultfd(2): it creates or adopts a uffd,
// negotiates its features, registers ranges, resolves faults (COPY,
// ZEROPAGE, MOVE, CONTINUE, POISON, WRITEPROTECT, WAKE), reads its messages
// and runs an event loop that dispatches them to a Handler. It also ships
// one fetch policy, Lazy, a MISSING-mode server that fills registered
// memory from a PageFetcher; everything else that decides what to copy
// belongs to the caller (mechanism here, policy elsewhere).
//
// The package imports nothing of cowmig and only targets x86_64 Linux
// (kernel 6.x); structures and ioctl numbers follow
// include/uapi/linux/userfaultfd.h and are pinned constants.
//
// # Ownership
//
// An FD owns one uffd file descriptor; Close releases it, Disown hands the
// raw number to the caller. A uffd acts on the mm of the process that
// created it, not of the process that holds it: Open acts on the caller's
// memory, FromFile adopts a uffd made elsewhere (typically fetched from a
// target with pidfd_getfd) and acts on that target's memory. A Loop never
// owns the FDs added to it. The fd of a UFFD_EVENT_FORK message belongs to
// whoever reads it, i.e. to the Handler that receives the message.
//
// # Errors
//
// Ioctl errnos are mapped to kinds in one place, classify in errors.go:
// ErrExist (the page is already there: treat as done), ErrAgain (a
// non-cooperative event is pending: read events, then retry), ErrGone (the
// mm is gone), ErrUnmapped (the destination is not registered with this
// uffd any more). The errno stays in the chain for errors.Is.
//
// # Lock order
//
// Within Lazy: Lazy.evMu before Lazy.mu. FD.mu is a leaf: it is held only
// for the duration of one system call. Loop.mu is a leaf as well.
package uffd
