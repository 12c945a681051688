// Package procfs reads what cowmig's checkpoint engine needs to know about a
// live process from /proc (threads, memory layout, credentials, signals,
// rlimits, open files, sockets of its network namespace) and wraps the
// PAGEMAP_SCAN ioctl of /proc/PID/pagemap.
//
// Every reader takes a pid (and, where the kernel keeps the value per thread,
// a tid) and returns plain values; nothing is cached and no state is kept
// between calls. The pure parsers are separate functions that take the file
// contents, so they can be tested on strings.
//
// Consistency: /proc files are generated while they are read, in chunks, with
// the target's locks dropped between chunks. A snapshot is only coherent when
// the target is stopped (frozen cgroup, ptrace-stopped), which is how the
// engine uses this package.
//
// Errors: when the process or thread is gone (ENOENT, ESRCH) the error wraps
// both ErrNotFound and the errno; contents the parsers do not understand wrap
// ErrParse. The package imports nothing of cowmig's.
package procfs

import "errors"

var (
	// ErrNotFound reports that the process or thread no longer exists
	// (or never did): the kernel answered ENOENT or ESRCH.
	ErrNotFound = errors.New("process or thread not found")

	// ErrParse reports /proc contents that do not have the expected format.
	ErrParse = errors.New("malformed /proc data")

	// ErrNotSupported reports that the running kernel lacks an interface,
	// or that a lookup found nothing it could answer from.
	ErrNotSupported = errors.New("not supported")
)
