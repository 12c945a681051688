package live

import (
	"context"
	"errors"
	"sync"

	"github.com/cowmig/cowmig/transport"
)

// readahead streams a process's lazy pages from the page server in
// address order — the order the pager's background fill asks for them —
// so that the fill does not pay a round trip per chunk. The fill copies
// streamed chunks into the clone straight from where the stream put them
// (view; on a unix socket that is memory shared with the server, so the
// page data crosses no socket). Fetches it cannot serve from what has
// arrived (faults far from the stream's head, pages the stream already
// passed) go to GetPages.
type readahead struct {
	c    *transport.Client
	proc uint32
	// start begins the stream (once, when the background fill starts):
	// until then the morph has the CPU to itself.
	start func()
	// finished is closed when the stream's goroutine has returned.
	finished chan struct{}

	mu   sync.Mutex // guards the fields below; cond waits on it
	cond *sync.Cond
	// chunks are streamed chunks not yet consumed, in address order.
	chunks   []*chunk
	buffered int
	// head is the end of the last chunk received.
	head uint64
	// started is set once start ran: before, fetches go to GetPages.
	started bool
	// done is set when the stream ended. Why does not matter: fetches
	// then go to GetPages, which reports a server that is gone.
	done bool
}

// chunk is a streamed chunk the readahead holds; release gives its memory
// back to the stream. A chunk that view is reading from is pinned: it is
// released only when the last reader is done.
//
// release may write to a socket (the bulk stream's release frame), so it
// is never called with readahead.mu held: the fault path (take, view)
// would wait for that write behind the lock.
type chunk struct {
	addr    uint64
	data    []byte
	release func()
	pins    int  // guarded by readahead.mu
	dropped bool // guarded by readahead.mu: release once unpinned
}

const (
	// raLimit bounds the bytes buffered ahead of the fill (on a unix
	// socket the server's ring, 32 MiB, bounds them first).
	raLimit = 64 << 20
	// raWait: a fetch this close ahead of the stream's head waits for it.
	// It must stay well below what the stream can buffer, so that the
	// stream can always reach a fetch that waits (take drops the chunks
	// below it).
	raWait = 16 << 20
)

func newReadahead(ctx context.Context, c *transport.Client, proc uint32, ranges []transport.Range) *readahead {
	ra := &readahead{c: c, proc: proc, finished: make(chan struct{})}
	ra.cond = sync.NewCond(&ra.mu)
	if len(ranges) > 0 {
		ra.head = ranges[0].Addr
	}
	ra.start = func() {
		ra.mu.Lock()
		if ra.done { // stopped before it started
			ra.mu.Unlock()
			return
		}
		ra.started = true
		ra.mu.Unlock()
		go func() {
			defer close(ra.finished)
			c.StreamHeld(ctx, proc, ranges, transport.MaxChunkSize, ra.add)
			ra.mu.Lock()
			ra.done = true
			ra.cond.Broadcast()
			ra.mu.Unlock()
		}()
	}
	return ra
}

// add receives one streamed chunk, which it holds until release.
func (ra *readahead) add(addr uint64, data []byte, release func()) error {
	ra.mu.Lock()
	for ra.buffered >= raLimit && !ra.done {
		ra.cond.Wait()
	}
	if ra.done {
		ra.mu.Unlock()
		release()
		return errStopped
	}
	ra.chunks = append(ra.chunks, &chunk{addr: addr, data: data, release: release})
	ra.buffered += len(data)
	ra.head = addr + uint64(len(data))
	ra.cond.Broadcast()
	ra.mu.Unlock()
	return nil
}

var errStopped = errors.New("readahead stopped")

// stop ends the stream's consumption (the pager is done) and waits for the
// stream to end; ctx (newReadahead's) must be cancelled too.
func (ra *readahead) stop(cancel context.CancelFunc) {
	ra.mu.Lock()
	ra.done = true
	var free []*chunk
	for _, c := range ra.chunks {
		free = ra.dropLocked(free, c)
	}
	ra.chunks, ra.buffered = nil, 0
	started := ra.started
	ra.cond.Broadcast()
	ra.mu.Unlock()
	releaseChunks(free)
	cancel()
	if started {
		<-ra.finished
	}
}

// dropLocked marks c dropped and appends it to free if it is to be
// released now; otherwise its last reader releases it.
//
// Preconditions: ra.mu is held; c is no longer in ra.chunks (or is about
// to be removed).
func (ra *readahead) dropLocked(free []*chunk, c *chunk) []*chunk {
	c.dropped = true
	if c.pins == 0 {
		free = append(free, c)
	}
	return free
}

// releaseChunks releases chunks dropped under ra.mu, after it is unlocked.
func releaseChunks(free []*chunk) {
	for _, c := range free {
		c.release()
	}
}

// dropBelowLocked drops the chunks wholly below addr: they will not be
// asked for again (the fill moves up, and faults below it find their
// pages local). It appends those to release to free.
//
// Preconditions: ra.mu is held.
func (ra *readahead) dropBelowLocked(free []*chunk, addr uint64) []*chunk {
	i := 0
	for i < len(ra.chunks) && ra.chunks[i].addr+uint64(len(ra.chunks[i].data)) <= addr {
		ra.buffered -= len(ra.chunks[i].data)
		free = ra.dropLocked(free, ra.chunks[i])
		ra.chunks[i] = nil
		i++
	}
	if i > 0 {
		ra.chunks = ra.chunks[i:]
		ra.cond.Broadcast()
	}
	return free
}

// take fills buf from the stream if it has (or will shortly have) every
// page of [addr, addr+len(buf)).
func (ra *readahead) take(addr uint64, buf []byte) bool {
	var free []*chunk
	ra.mu.Lock()
	ok := ra.takeLocked(&free, addr, buf)
	ra.mu.Unlock()
	releaseChunks(free)
	return ok
}

// takeLocked is take; it appends the chunks to release to *free.
//
// Preconditions: ra.mu is held.
func (ra *readahead) takeLocked(free *[]*chunk, addr uint64, buf []byte) bool {
	if !ra.started {
		return false
	}
	end := addr + uint64(len(buf))
	for {
		*free = ra.dropBelowLocked(*free, addr)
		if ra.covered(addr, end, buf) {
			return true
		}
		if ra.done || end <= ra.head || addr >= ra.head+raWait {
			return false // passed, stopped, or too far ahead
		}
		ra.waitLocked(free)
	}
}

// waitLocked releases the chunks in *free, which the stream may need to
// send more (their slots), then waits for the stream.
//
// Preconditions: ra.mu is held; it is dropped and taken again.
func (ra *readahead) waitLocked(free *[]*chunk) {
	if len(*free) > 0 {
		ra.mu.Unlock()
		releaseChunks(*free)
		*free = nil
		ra.mu.Lock()
		return // the state may have moved: look again before waiting
	}
	ra.cond.Wait()
}

// view calls fn with the streamed content of [addr, addr+m) for some
// 0 < m <= n, from the stream's own memory, if the stream has (or will
// shortly have) the page at addr; it reports whether it did.
func (ra *readahead) view(addr uint64, n int, fn func([]byte) error) (bool, error) {
	ra.mu.Lock()
	if !ra.started {
		ra.mu.Unlock()
		return false, nil
	}
	var (
		c    *chunk
		free []*chunk
	)
	for {
		free = ra.dropBelowLocked(free, addr)
		if len(ra.chunks) > 0 && ra.chunks[0].addr <= addr {
			c = ra.chunks[0] // the first chunk ends above addr
			break
		}
		if ra.done || addr < ra.head || addr >= ra.head+raWait {
			ra.mu.Unlock()
			releaseChunks(free)
			return false, nil // passed, stopped, or too far ahead
		}
		ra.waitLocked(&free)
	}
	c.pins++
	ra.mu.Unlock()
	releaseChunks(free)
	off := addr - c.addr
	err := fn(c.data[off:min(uint64(len(c.data)), off+uint64(n))])
	ra.mu.Lock()
	c.pins--
	last := c.pins == 0 && c.dropped
	ra.mu.Unlock()
	if last {
		c.release()
	}
	return true, err
}

// covered copies [addr, end) out of the buffered chunks if they hold all
// of it.
//
// Preconditions: ra.mu is held.
func (ra *readahead) covered(addr, end uint64, buf []byte) bool {
	at := addr
	for _, c := range ra.chunks {
		cend := c.addr + uint64(len(c.data))
		if cend <= at {
			continue
		}
		if c.addr > at {
			return false
		}
		n := min(cend, end) - at
		copy(buf[at-addr:], c.data[at-c.addr:at-c.addr+n])
		at += n
		if at == end {
			return true
		}
	}
	return false
}
