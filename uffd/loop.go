package uffd

import (
	"errors"
	"fmt"
	"slices"
	"sync"

	"golang.org/x/sys/unix"
)

// Handler receives the messages a Loop reads. Both methods run on the
// goroutine that called Loop.Run, one message at a time; while one runs,
// the Loop reads nothing else, so a handler should resolve quickly.
// Returning an error stops the Loop, and Run returns that error: a handler
// returns one only for unrecoverable situations (fail closed), except that
// a Fault error wrapping ErrAgain asks the Loop to retry the fault later.
type Handler interface {
	// Fault handles a MsgPagefault (missing, write-protect or minor).
	Fault(u *FD, m Msg) error
	// Event handles MsgFork, MsgRemap, MsgRemove, MsgUnmap (and kinds a
	// future kernel may add). For MsgFork the handler owns m.ForkFD.
	Event(u *FD, m Msg) error
}

// EventLocker is an optional interface of a Handler whose resolving
// ioctls run on other goroutines too (for example Lazy.Fill). The kernel
// completes a non-cooperative event as soon as read(2) returns it, and the
// process then goes on, e.g. zaps the pages of a MADV_DONTNEED
// (fs/userfaultfd.c:userfaultfd_event_wait_completion). A copy issued in
// the gap between that read and the handler learning of the event would
// refill discarded memory with stale data. So the Loop calls LockEvents(u)
// before each read(2) of u and UnlockEvents(u) after it has dispatched the
// batch's events, before the batch's faults. The handler holds its
// resolvers off in between.
type EventLocker interface {
	LockEvents(u *FD)
	UnlockEvents(u *FD)
}

// Loop polls one or more uffds with epoll and dispatches their messages to
// Handlers. It owns its epoll fd and an eventfd used by Stop, and no
// goroutine: Run runs on the caller's. The Loop does not own the FDs added
// to it: remove an FD before closing it, close the FDs yourself.
//
// Serving faults of the Go program that runs the Loop (a uffd made with
// Open on memory this process touches) needs more Ps than goroutines that
// can be blocked in faults at once: such a goroutine keeps its P, and when
// the runtime preempts it with a signal so the Loop can run, the kernel
// withdraws its unread fault message (fs/userfaultfd.c:handle_userfault);
// with GOMAXPROCS=1 the two chase each other forever. Faults of other
// processes, the normal case, have no such constraint.
type Loop struct {
	h      Handler
	epfd   int // owned, closed by Close
	stopfd int // owned eventfd, closed by Close

	// mu guards entries, nextID, closed and running. The deferred and
	// faults lists of an entry are touched only by the goroutine in Run.
	mu      sync.Mutex
	entries map[int32]*loopEntry
	nextID  int32
	closed  bool
	running bool
}

type loopEntry struct {
	u        *FD
	h        Handler
	deferred []Msg // faults whose handler returned ErrAgain
	faults   []Msg // scratch for one batch
}

// stopID is the epoll data of the stop eventfd; uffd entries get ids >= 1.
const stopID = 0

// loopBatch is how many messages one read(2) fetches: small, so that a
// batch's events are dispatched soon after the kernel completed them.
const loopBatch = 16

// deferredRetryMillis is the epoll timeout while faults are deferred. A
// fault gets ErrAgain while ctx->mmap_changing is raised; the counter drops
// when the event's originator wakes after our read, which raises nothing
// on the uffd, so the Loop polls for it.
const deferredRetryMillis = 1

// NewLoop creates a Loop whose default handler is h (used by Add).
func NewLoop(h Handler) (*Loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("create uffd loop epoll: %w", err)
	}
	stopfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("create uffd loop eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: stopID}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, stopfd, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(stopfd)
		return nil, fmt.Errorf("add uffd loop eventfd: %w", err)
	}
	return &Loop{h: h, epfd: epfd, stopfd: stopfd, entries: map[int32]*loopEntry{}, nextID: stopID + 1}, nil
}

// Add starts polling u and dispatching its messages to the Loop's
// handler. See AddWith.
func (l *Loop) Add(u *FD) error {
	return l.AddWith(u, l.h)
}

// AddWith starts polling u and dispatching its messages to h. It may be
// called while Run runs (e.g. from a Handler, for a forked child's uffd).
// The Loop does not take ownership of u. It sets O_NONBLOCK on u's open
// file description (shared with every duplicate of the fd, including one
// in the target process): the kernel reports EPOLLERR for a blocking uffd
// (fs/userfaultfd.c:userfaultfd_poll). u must have completed its API
// handshake.
func (l *Loop) AddWith(u *FD, h Handler) error {
	if h == nil {
		return fmt.Errorf("add uffd to loop: nil handler: %w", unix.EINVAL)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("add uffd to loop: %w", ErrClosed)
	}
	for _, e := range l.entries {
		if e.u == u {
			return fmt.Errorf("add uffd %d to loop: %w", u.Fd(), unix.EEXIST)
		}
	}
	id := l.nextID
	err := u.use(func(fd int) error {
		if err := unix.SetNonblock(fd, true); err != nil {
			return fmt.Errorf("set O_NONBLOCK: %w", err)
		}
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: id}
		if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
			return fmt.Errorf("epoll add: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("add uffd %d to loop: %w", u.Fd(), err)
	}
	l.nextID++
	if l.nextID <= stopID {
		l.nextID = stopID + 1
	}
	l.entries[id] = &loopEntry{u: u, h: h}
	return nil
}

// Remove stops polling u; faults of u deferred by the Loop are dropped.
// Call it before closing u (the target process may hold another reference
// to the uffd, which keeps it in the epoll set). It may be called while
// Run runs, also from a Handler.
func (l *Loop) Remove(u *FD) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for id, e := range l.entries {
		if e.u != u {
			continue
		}
		delete(l.entries, id)
		err := u.use(func(fd int) error { return unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil) })
		if err != nil && !errors.Is(err, ErrClosed) {
			return fmt.Errorf("remove uffd %d from loop: %w", u.Fd(), err)
		}
		return nil
	}
	return fmt.Errorf("remove uffd from loop: %w", unix.ENOENT)
}

// Run polls and dispatches until Stop is called (it then returns nil), a
// handler fails or a uffd cannot be read (it returns that error). Only one
// Run may be active; a stopped Loop stays stopped.
func (l *Loop) Run() error {
	l.mu.Lock()
	switch {
	case l.closed:
		l.mu.Unlock()
		return fmt.Errorf("run uffd loop: %w", ErrClosed)
	case l.running:
		l.mu.Unlock()
		return fmt.Errorf("run uffd loop: already running: %w", unix.EBUSY)
	}
	l.running = true
	l.mu.Unlock()
	defer func() {
		l.mu.Lock()
		l.running = false
		l.mu.Unlock()
	}()

	events := make([]unix.EpollEvent, 8)
	msgs := make([]Msg, loopBatch)
	raw := make([]byte, loopBatch*msgSize)
	var served []*loopEntry
	for {
		timeout := -1
		if l.hasDeferred() {
			timeout = deferredRetryMillis
		}
		n, err := unix.EpollWait(l.epfd, events, timeout)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("uffd loop epoll wait: %w", err)
		}
		for _, ev := range events[:n] {
			if ev.Fd == stopID {
				return nil
			}
		}
		served = served[:0]
		for _, ev := range events[:n] {
			e := l.lookup(ev.Fd)
			if e == nil {
				continue // removed since epoll_wait returned
			}
			if ev.Events&unix.EPOLLERR != 0 {
				return fmt.Errorf("uffd %d: poll error (no API handshake, or O_NONBLOCK cleared): %w", e.u.Fd(), unix.EIO)
			}
			if err := l.serve(e, msgs, raw); err != nil {
				return err
			}
			served = append(served, e)
		}
		// serve retried the deferred faults of the uffds it read; the
		// others get their retry here, also when other uffds keep
		// epoll_wait from timing out.
		if !l.hasDeferred() {
			continue
		}
		for _, e := range l.snapshot() {
			if slices.Contains(served, e) {
				continue
			}
			if err := l.retryDeferred(e); err != nil {
				return err
			}
		}
	}
}

// Stop makes Run return. It may be called from any goroutine, before or
// during Run, any number of times.
func (l *Loop) Stop() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	var one = [8]byte{1}
	// The eventfd is non-blocking; the write can only fail when the
	// counter is about to overflow, i.e. Stop was already signalled.
	_, _ = unix.Write(l.stopfd, one[:])
}

// Close releases the epoll fd and the eventfd. It fails while Run runs:
// Stop the Loop and wait for Run to return first. It does not close the
// FDs added to the Loop.
func (l *Loop) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	if l.running {
		return fmt.Errorf("close uffd loop: Run is active: %w", unix.EBUSY)
	}
	l.closed = true
	l.entries = nil
	return errors.Join(unix.Close(l.epfd), unix.Close(l.stopfd))
}

func (l *Loop) lookup(id int32) *loopEntry {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.entries[id]
}

func (l *Loop) snapshot() []*loopEntry {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]*loopEntry, 0, len(l.entries))
	for _, e := range l.entries {
		out = append(out, e)
	}
	return out
}

func (l *Loop) hasDeferred() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, e := range l.entries {
		if len(e.deferred) > 0 {
			return true
		}
	}
	return false
}

// serve reads one batch from e and dispatches it: events first, under the
// handler's EventLocker if it has one, then the faults deferred earlier,
// then the batch's faults. Dispatching events before faults that were read
// with them is deliberate: the kernel already completed those events, so
// the handler must know of them before it resolves anything.
func (l *Loop) serve(e *loopEntry, msgs []Msg, raw []byte) error {
	if err := l.readEvents(e, msgs, raw); err != nil {
		return err
	}
	if err := l.retryDeferred(e); err != nil {
		return err
	}
	for _, m := range e.faults {
		if err := l.fault(e, m); err != nil {
			return err
		}
	}
	return nil
}

// readEvents does the read(2) and dispatches the events of the batch; the
// batch's faults are left in e.faults.
func (l *Loop) readEvents(e *loopEntry, msgs []Msg, raw []byte) error {
	if gate, ok := e.h.(EventLocker); ok {
		gate.LockEvents(e.u)
		defer gate.UnlockEvents(e.u)
	}
	e.faults = e.faults[:0]
	n, err := e.u.readMsgs(msgs, raw)
	if err != nil {
		return fmt.Errorf("uffd %d: %w", e.u.Fd(), err)
	}
	var herr error
	for _, m := range msgs[:n] {
		switch {
		case m.Kind == MsgPagefault:
			e.faults = append(e.faults, m)
		case herr != nil:
			// The Loop is failing; nobody will take this child uffd.
			if m.Kind == MsgFork {
				unix.Close(m.ForkFD)
			}
		default:
			if err := e.h.Event(e.u, m); err != nil {
				herr = fmt.Errorf("handle uffd %s: %w", m, err)
			}
		}
	}
	return herr
}

func (l *Loop) retryDeferred(e *loopEntry) error {
	if len(e.deferred) == 0 {
		return nil
	}
	pending := e.deferred
	e.deferred = nil
	for i, m := range pending {
		if err := l.fault(e, m); err != nil {
			e.deferred = append(e.deferred, pending[i+1:]...)
			return err
		}
	}
	return nil
}

// fault dispatches one fault; ErrAgain defers it.
func (l *Loop) fault(e *loopEntry, m Msg) error {
	err := e.h.Fault(e.u, m)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrAgain):
		e.deferred = append(e.deferred, m)
		return nil
	default:
		return fmt.Errorf("handle uffd %s: %w", m, err)
	}
}
