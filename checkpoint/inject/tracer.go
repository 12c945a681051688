package inject

import (
	"runtime"
)

// tracer is the one goroutine, locked to one OS thread, that issues every
// ptrace and waitpid call for the processes it serves. The kernel accepts
// ptrace requests only from the thread that attached (the tracer thread),
// and makes that same thread the tracer of children auto-attached through
// PTRACE_O_TRACECLONE/TRACEFORK, so a parent Process and the children made
// by CloneProcess share one tracer.
//
// The goroutine never calls runtime.UnlockOSThread: when it returns, the Go
// runtime terminates the thread, and the kernel detaches whatever is still
// attached to it (kernel/ptrace.c:exit_ptrace). It returns once the last
// Process it serves is detached or killed (users drops to 0).
//
// Each request costs two hand-offs between OS threads (caller → tracer →
// caller), which on a small VM cost more than the injected syscall itself;
// Process.Batch runs many operations in one request.
type tracer struct {
	// reqs carries closures to run on the tracer thread.
	reqs chan func()
	// done is closed when the goroutine has returned.
	done chan struct{}

	// users is the number of live Processes served. Only the tracer
	// goroutine reads or writes it.
	users int
}

// newTracer starts a tracer goroutine. It stops when users is 0 after a
// request, so the first request must add a user or the goroutine ends.
func newTracer() *tracer {
	t := &tracer{reqs: make(chan func()), done: make(chan struct{})}
	go t.loop()
	return t
}

func (t *tracer) loop() {
	runtime.LockOSThread() // never unlocked: see the type comment.
	defer close(t.done)
	for f := range t.reqs {
		f()
		if t.users == 0 {
			return
		}
	}
}

// run executes f on the tracer thread and returns its error, or ErrClosed if
// the tracer has stopped.
func (t *tracer) run(f func() error) error {
	errc := make(chan error, 1)
	select {
	case t.reqs <- func() { errc <- f() }:
	case <-t.done:
		return ErrClosed
	}
	return <-errc
}

// wait blocks until the tracer goroutine has returned.
func (t *tracer) wait() { <-t.done }
