// Package checkpoint is cowmig's checkpoint/restore engine: it dumps a
// running process into an image (package image) while the process keeps
// running, and restores an image by morphing a stub process.
//
// Dump (source side), in order:
//
//	attached → frozen: every thread is ptrace-seized and interrupted
//	state: registers, xstate, rseq, signals, creds, rlimits, mm, fds
//	memory: per mapping a class (see memClass): write-protected and pinned
//	  (private anonymous), copied now (private file COW pages, shared
//	  anonymous, unreadable anonymous), or skipped (file content, vDSO)
//	detached: the process runs again; the COW window is open
//
// How the snapshot survives the process's later writes is the COW method
// (see COW). With COWUffd (the default), during the COW window the
// snapshot's anonymous memory lives in pipes the engine owns (vmsplice
// pins, DESIGN §3). The pipes are the only source of
// truth: a write-protect fault never reads the target's memory, it drains
// the pipe that holds the page and then unprotects it, so munmap, madvise,
// mremap and fork in the target cannot change the snapshot. A background
// drain empties every pipe and unprotects as it goes; the window closes when
// all pipes are drained. With COWFork, the last step of the freeze forks
// the process into a ptrace-stopped shadow (shadow.go) whose memory the
// kernel's own copy-on-write keeps as it was; pages are read from it until
// the snapshot is released.
//
// Restore: a stub (StubELF) is pid 1 of a new pid namespace; the engine
// clones the checkpointed pid out of it with clone3(set_tid), rebuilds the
// address space at the original addresses, registers userfaultfd MISSING on
// lazy ranges, restores fds, signals, threads, credentials and registers,
// and detaches. The caller runs the pager (Restored.Serve) that fills
// missing pages from a PageFetcher; if the pager fails the clone is killed.
//
// Lock order: Snapshot.mu before pinPipe.mu.
package checkpoint
