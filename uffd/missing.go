package uffd

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// PageFetcher supplies page content for Lazy.
type PageFetcher interface {
	// Fetch fills buf with the content of [addr, addr+len(buf)) as it was
	// at checkpoint time. addr and len(buf) are page aligned; addr is the
	// original address even after the process moved the memory. An error
	// is fatal for the restore.
	Fetch(addr uint64, buf []byte) error
}

// ViewFetcher is an optional interface of a PageFetcher that holds
// fetched content in memory of its own (a readahead buffer, a mapping
// shared with a page server): Fill then copies pages into the process
// straight from there instead of through a buffer of its own.
type ViewFetcher interface {
	// FetchView calls fn with the content of [addr, addr+m) for some
	// 0 < m <= n, m a multiple of PageSize, if the fetcher holds the page
	// at addr, and reports whether it did; with false, Fill uses Fetch.
	// data is valid only during fn; fn's error is returned as is.
	FetchView(addr uint64, n int, fn func(data []byte) error) (bool, error)
}

// Lazy is a MISSING-mode server for one uffd: the policy that fills
// registered memory on demand (Fault) and in the background (Fill). It
// implements Handler and EventLocker; run it in a Loop with
// Loop.AddWith(u, lazy) (or as the Loop's handler), and call Fill from
// another goroutine.
//
// Lazy tracks per page whether it is local, i.e. needs no fetch: copied,
// found present, discarded by the process (UFFD_EVENT_REMOVE: it reads as
// zero now) or unreachable. It follows the process's mremap and munmap
// through UFFD_EVENT_REMAP and UFFD_EVENT_UNMAP; the uffd's API handshake
// should therefore include LazyFeatures. Fault fetches synchronously on
// the Loop's goroutine: while it waits for the fetcher, the uffd's other
// faults and events wait too.
//
// Lazy fails closed: a fetch error, a copy error other than "already
// present", or a vanished address space ends Fault or Fill with an error;
// the caller must then kill the process, whose unfilled pages would
// otherwise read as zero once the uffd is closed.
type Lazy struct {
	u     *FD
	f     PageFetcher
	batch uint64 // bytes fetched around a fault, a multiple of PageSize
	total uint64 // bytes tracked for fetching at creation

	// evMu keeps resolving ioctls apart from the reading of events (see
	// EventLocker). Every copy or zero-fill into tracked memory, together
	// with the lookups that chose its addresses and the marking that
	// follows it, holds evMu for reading; LockEvents holds it for writing
	// from before the Loop's read(2) until the batch's events have been
	// dispatched. Lock order: evMu before mu.
	evMu sync.RWMutex

	// mu guards spans, lastRemap, sawEvent, evGen, done, closedDone and
	// onFork.
	mu         sync.Mutex
	spans      *spanSet
	lastRemap  Range         // destination of the last event if it was a REMAP, else zero
	sawEvent   bool          // an event was dispatched since LockEvents
	evGen      chan struct{} // closed and replaced after a batch containing events
	done       chan struct{} // closed once spans.pending is 0
	closedDone bool
	onFork     func(child *FD) error

	// faultBuf is used only by Fault, which a Loop calls from its one
	// goroutine; Fault must not be called concurrently with itself.
	faultBuf []byte
	runs     []run // scratch of Fault, same rule
}

var (
	_ Handler     = (*Lazy)(nil)
	_ EventLocker = (*Lazy)(nil)
)

// NewLazy returns a server for u. ranges are the page-aligned ranges whose
// content comes from f; zero are registered ranges that must read as zero.
// The caller registers exactly ranges ∪ zero with ModeMissing (Lazy
// answers a fault at an untracked address with the zero page, which is
// right for memory the process grew with mremap). batch is how many bytes
// around a faulting page Fault fetches at once, a multiple of PageSize; 0
// means one page. Lazy does not own u.
func NewLazy(u *FD, ranges []Range, zero []Range, f PageFetcher, batch int) (*Lazy, error) {
	if batch == 0 {
		batch = PageSize
	}
	if batch < 0 || batch%PageSize != 0 {
		return nil, fmt.Errorf("new lazy server: batch %d is not a positive multiple of %d: %w", batch, PageSize, unix.EINVAL)
	}
	if f == nil && len(ranges) > 0 {
		return nil, fmt.Errorf("new lazy server: nil fetcher: %w", unix.EINVAL)
	}
	spans, err := newSpanSet(ranges, zero)
	if err != nil {
		return nil, fmt.Errorf("new lazy server: %w", err)
	}
	l := &Lazy{
		u:        u,
		f:        f,
		batch:    uint64(batch),
		total:    spans.pending * PageSize,
		spans:    spans,
		evGen:    make(chan struct{}),
		done:     make(chan struct{}),
		faultBuf: make([]byte, batch),
	}
	l.checkDoneLocked()
	return l, nil
}

// OnFork installs the handler for UFFD_EVENT_FORK (only delivered with
// FeatureEventFork): it receives the child's uffd and owns it. Without
// one, a fork during the lazy phase is an error: the child's unfilled
// pages would read as zero. Call it before the Loop runs.
func (l *Lazy) OnFork(fn func(child *FD) error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.onFork = fn
}

// Remaining returns the bytes still to be fetched.
func (l *Lazy) Remaining() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.spans.pending * PageSize
}

// Done is closed when nothing is left to fetch.
func (l *Lazy) Done() <-chan struct{} { return l.done }

// LockEvents implements EventLocker.
func (l *Lazy) LockEvents(*FD) { l.evMu.Lock() }

// UnlockEvents implements EventLocker; it also wakes Fill calls that wait
// for events after ErrAgain.
func (l *Lazy) UnlockEvents(*FD) {
	l.mu.Lock()
	if l.sawEvent {
		l.sawEvent = false
		close(l.evGen)
		l.evGen = make(chan struct{})
	}
	l.mu.Unlock()
	l.evMu.Unlock()
}

// Fault serves a missing-page fault: a pending page is fetched together
// with the pending pages next to it in its batch window and copied; a
// page of a zero range, a page already local (e.g. discarded by the
// process) or an untracked page gets the zero page. It returns an error
// wrapping ErrAgain when the copy must wait for an event; the Loop then
// retries it.
func (l *Lazy) Fault(u *FD, m Msg) error {
	if u != l.u {
		return fmt.Errorf("lazy server: fault on foreign uffd %d: %w", u.Fd(), unix.EINVAL)
	}
	addr := alignDown(m.Address)
	l.mu.Lock()
	kind, src, at, n := l.spans.faultPlan(addr, l.batch/PageSize)
	l.mu.Unlock()
	if kind == faultFetch {
		buf := l.faultBuf[:n*PageSize]
		if err := l.f.Fetch(src, buf); err != nil {
			return fmt.Errorf("fetch %#x+%#x (now at %#x) for fault at %#x: %w", src, len(buf), at, addr, err)
		}
		var err error
		l.runs, err = l.install(src, buf, l.runs[:0])
		if err != nil {
			return err
		}
	} else if err := l.zero(addr); err != nil {
		return err
	}
	// The copy woke the range it filled, but the faulting page may have
	// been filled by a concurrent Fill instead; waking again is cheap and
	// never wrong.
	return l.u.Wake(addr, PageSize)
}

// zero maps the zero page at addr unless something is there already.
func (l *Lazy) zero(addr uint64) error {
	l.evMu.RLock()
	defer l.evMu.RUnlock()
	_, err := l.u.ZeroPage(addr, PageSize, false)
	switch {
	case err == nil, errors.Is(err, ErrExist):
		return nil
	case errors.Is(err, ErrUnmapped):
		// A stale fault: the page is no longer in a registered mapping.
		// The woken thread retries and meets whatever is there now.
		return nil
	}
	return err
}

// Event handles the non-cooperative events. The Loop calls it between
// LockEvents and UnlockEvents, so no copy of Fill is in flight.
//
//   - MsgRemove (MADV_DONTNEED and friends): the pages read as zero now;
//     they become local and are never fetched.
//   - MsgUnmap: the range is forgotten; threads blocked on it are woken.
//   - MsgRemap: tracking moves with the pages; they are still fetched
//     from their original addresses.
//   - MsgFork: handed to the OnFork handler, else an error.
//
// mremap(MREMAP_FIXED) onto memory registered with the same uffd also
// unmaps the old destination. Kernel 6.18 reports UNMAP(destination),
// REMAP, UNMAP(source) in that order (TestLazyRemapEvents); older
// mm/mremap.c completed the REMAP before the destination's early unmap,
// which would drop the tracking just moved there. So an UNMAP that
// directly follows a REMAP leaves that REMAP's destination alone. A
// genuine munmap caught by that rule leaves stale tracking behind, which
// copies then find unregistered (ErrUnmapped) and discard.
func (l *Lazy) Event(u *FD, m Msg) error {
	if u != l.u {
		if m.Kind == MsgFork {
			unix.Close(m.ForkFD)
		}
		return fmt.Errorf("lazy server: event on foreign uffd %d: %w", u.Fd(), unix.EINVAL)
	}
	switch m.Kind {
	case MsgPagefault:
		return l.Fault(u, m)
	case MsgRemove:
		l.mu.Lock()
		defer l.mu.Unlock()
		l.sawEvent = true
		l.lastRemap = Range{}
		l.spans.markLocal(alignDown(m.Start), alignUp(m.End))
		l.checkDoneLocked()
		return nil
	case MsgUnmap:
		lo, hi := alignDown(m.Start), alignUp(m.End)
		l.mu.Lock()
		l.sawEvent = true
		if d := l.lastRemap; d.Len != 0 && lo < d.End() && d.Start < hi {
			l.spans.drop(lo, max(lo, d.Start))
			l.spans.drop(min(hi, d.End()), hi)
		} else {
			l.spans.drop(lo, hi)
		}
		l.checkDoneLocked()
		l.mu.Unlock()
		if hi > lo {
			return l.u.Wake(lo, hi-lo)
		}
		return nil
	case MsgRemap:
		l.mu.Lock()
		defer l.mu.Unlock()
		l.sawEvent = true
		length := alignUp(m.Len)
		l.spans.move(alignDown(m.From), alignDown(m.To), length)
		l.lastRemap = Range{Start: alignDown(m.To), Len: length}
		l.checkDoneLocked()
		return nil
	case MsgFork:
		l.mu.Lock()
		l.sawEvent = true
		l.lastRemap = Range{}
		fn := l.onFork
		l.mu.Unlock()
		if fn == nil {
			unix.Close(m.ForkFD)
			return fmt.Errorf("lazy server: process forked during lazy restore and no fork handler is set: %w", ErrNotSupported)
		}
		child, err := FromRaw(m.ForkFD)
		if err != nil {
			unix.Close(m.ForkFD)
			return fmt.Errorf("lazy server: adopt forked uffd: %w", err)
		}
		return fn(child)
	}
	return fmt.Errorf("lazy server: unexpected uffd message %s: %w", m, ErrNotSupported)
}

// Fill fetches and copies every page not yet local, in address order, in
// chunks of chunk bytes (a multiple of PageSize), calling progress (if not
// nil) after each chunk with the bytes done and the bytes tracked at the
// start. It runs concurrently with the Loop serving faults; two copies of
// the same page are harmless, the second finds it present. When a copy
// must wait for an event (ErrAgain), Fill waits for the Loop to dispatch
// events, polling with a short backoff because the kernel signals the end
// of an event's window to nobody. Fill returns nil once nothing is left,
// ctx's error when ctx ends, or the first fetch or copy error.
func (l *Lazy) Fill(ctx context.Context, chunk int, progress func(done, total uint64)) error {
	if chunk <= 0 || chunk%PageSize != 0 {
		return fmt.Errorf("lazy fill: chunk %d is not a positive multiple of %d: %w", chunk, PageSize, unix.EINVAL)
	}
	vf, _ := l.f.(ViewFetcher)
	var buf []byte // allocated if Fetch is needed
	var runs []run
	var cursor uint64
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("lazy fill: %w", err)
		}
		l.mu.Lock()
		src, n, ok := l.spans.nextPending(cursor, uint64(chunk)/PageSize)
		pending := l.spans.pending
		l.mu.Unlock()
		if !ok {
			// Pages never turn pending again and src addresses never
			// change, so a pass that finds nothing is the end, unless
			// the cursor skipped something.
			if pending == 0 {
				return nil
			}
			if cursor == 0 {
				return fmt.Errorf("lazy fill: %d pages pending but none found: %w", pending, unix.EIO)
			}
			cursor = 0
			continue
		}
		if vf != nil {
			got, err := l.fillView(ctx, vf, src, n*PageSize, &runs)
			if err != nil {
				return err
			}
			if got > 0 {
				cursor = src + got
				if progress != nil {
					progress(l.total-l.Remaining(), l.total)
				}
				continue
			}
		}
		if buf == nil {
			buf = make([]byte, chunk)
		}
		b := buf[:n*PageSize]
		if err := l.f.Fetch(src, b); err != nil {
			return fmt.Errorf("lazy fill: fetch %#x+%#x: %w", src, len(b), err)
		}
		if err := l.installRetry(ctx, src, b, &runs); err != nil {
			return fmt.Errorf("lazy fill: %w", err)
		}
		cursor = src + uint64(len(b))
		if progress != nil {
			progress(l.total-l.Remaining(), l.total)
		}
	}
}

// fillView installs what vf holds from src on (at most n bytes) straight
// from its memory and returns how many bytes that was, 0 if it held
// nothing.
func (l *Lazy) fillView(ctx context.Context, vf ViewFetcher, src, n uint64, runs *[]run) (uint64, error) {
	var got uint64
	var installErr error
	ok, err := vf.FetchView(src, int(n), func(data []byte) error {
		if len(data) == 0 || uint64(len(data)) > n || len(data)%PageSize != 0 {
			return fmt.Errorf("lazy fill: view of %#x+%#x gave %#x bytes: %w", src, n, len(data), unix.EINVAL)
		}
		got = uint64(len(data))
		installErr = l.installRetry(ctx, src, data, runs)
		return installErr
	})
	switch {
	case installErr != nil:
		return 0, fmt.Errorf("lazy fill: %w", installErr)
	case err != nil:
		return 0, fmt.Errorf("lazy fill: fetch view %#x+%#x: %w", src, n, err)
	case !ok:
		return 0, nil
	}
	return got, nil
}

// installRetry installs a fetched chunk, waiting out ErrAgain.
func (l *Lazy) installRetry(ctx context.Context, src uint64, b []byte, runs *[]run) error {
	backoff := 50 * time.Microsecond
	for {
		l.mu.Lock()
		gen := l.evGen
		l.mu.Unlock()
		var err error
		*runs, err = l.install(src, b, (*runs)[:0])
		if !errors.Is(err, ErrAgain) {
			return err
		}
		t := time.NewTimer(backoff)
		select {
		case <-gen:
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
		t.Stop()
		backoff = min(2*backoff, 5*time.Millisecond)
	}
}

// install copies the pages of a fetched source range that are still
// pending to where they are now. It returns the scratch runs for reuse.
func (l *Lazy) install(src uint64, buf []byte, runs []run) ([]run, error) {
	l.evMu.RLock()
	defer l.evMu.RUnlock()
	l.mu.Lock()
	runs = l.spans.pendingRuns(src, uint64(len(buf))/PageSize, runs)
	l.mu.Unlock()
	for _, r := range runs {
		if err := l.copyRun(r.addr, buf[r.off*PageSize:(r.off+r.n)*PageSize]); err != nil {
			return runs, err
		}
	}
	return runs, nil
}

// copyRun copies b to addr, marking what lands, what was already there and
// what turns out to be unregistered as local.
//
// Preconditions: l.evMu is held for reading.
func (l *Lazy) copyRun(addr uint64, b []byte) error {
	single := false
	for len(b) > 0 {
		chunk := b
		if single {
			chunk = b[:PageSize]
		}
		n, err := l.u.Copy(addr, chunk, 0)
		if n > 0 {
			l.markLocal(addr, addr+uint64(n))
			addr += uint64(n)
			b = b[n:]
		}
		switch {
		case err == nil:
		case errors.Is(err, ErrExist):
			l.markLocal(addr, addr+PageSize)
			addr += PageSize
			b = b[PageSize:]
		case errors.Is(err, ErrUnmapped):
			// A multi-page copy fails with ENOENT when it straddles
			// two mappings (the process split one with mprotect);
			// only a single page's ENOENT says the page is not ours.
			if !single && len(b) > PageSize {
				single = true
				continue
			}
			l.markLocal(addr, addr+PageSize)
			addr += PageSize
			b = b[PageSize:]
		default:
			return err
		}
	}
	return nil
}

func (l *Lazy) markLocal(lo, hi uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.spans.markLocal(lo, hi)
	l.checkDoneLocked()
}

// checkDoneLocked closes done once nothing is pending.
//
// Preconditions: l.mu is held.
func (l *Lazy) checkDoneLocked() {
	if l.spans.pending == 0 && !l.closedDone {
		l.closedDone = true
		close(l.done)
	}
}
