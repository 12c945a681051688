package live

import (
	"context"
	"errors"
	"sync"

	"github.com/cowmig/cowmig/transport"
)

// readahead streams a process's lazy pages from the page server in
// address order — the order the pager's background fill asks for them —
// so that the fill does not pay a round trip per chunk. Fetches it cannot
// serve from what has arrived (faults far from the stream's head, pages
// the stream already passed) go to GetPages.
type readahead struct {
	c    *transport.Client
	proc uint32
	// start begins the stream (once, when the background fill starts):
	// until then the morph has the CPU to itself.
	start func()

	mu   sync.Mutex // guards the fields below; cond waits on it
	cond *sync.Cond
	// chunks are streamed pages not yet consumed, in address order.
	chunks []chunk
	// free are the buffers of consumed chunks, for add to reuse.
	free     [][]byte
	buffered int
	// head is the end of the last chunk received.
	head uint64
	// started is set once start ran: before, fetches go to GetPages.
	started bool
	// done is set when the stream ended. Why does not matter: fetches
	// then go to GetPages, which reports a server that is gone.
	done bool
}

type chunk struct {
	addr uint64
	data []byte
}

const (
	// raLimit bounds the bytes buffered ahead of the fill.
	raLimit = 64 << 20
	// raWait: a fetch this close ahead of the stream's head waits for it.
	raWait = 16 << 20
)

func newReadahead(ctx context.Context, c *transport.Client, proc uint32, ranges []transport.Range) *readahead {
	ra := &readahead{c: c, proc: proc}
	ra.cond = sync.NewCond(&ra.mu)
	if len(ranges) > 0 {
		ra.head = ranges[0].Addr
	}
	ra.start = func() {
		ra.mu.Lock()
		ra.started = true
		ra.mu.Unlock()
		go func() {
			c.Stream(ctx, proc, ranges, transport.MaxChunkSize, ra.add)
			ra.mu.Lock()
			ra.done = true
			ra.cond.Broadcast()
			ra.mu.Unlock()
		}()
	}
	return ra
}

// add receives one streamed chunk (data is reused by the client: copy).
// The copy goes into a buffer a consumed chunk left (fresh memory costs a
// page fault per 4 KiB here) and is made outside the lock, so that take
// can serve a fault meanwhile.
func (ra *readahead) add(addr uint64, data []byte) error {
	ra.mu.Lock()
	for ra.buffered >= raLimit && !ra.done {
		ra.cond.Wait()
	}
	if ra.done {
		ra.mu.Unlock()
		return errStopped
	}
	var b []byte
	if n := len(ra.free); n > 0 {
		b, ra.free = ra.free[n-1], ra.free[:n-1]
	}
	ra.buffered += len(data)
	ra.mu.Unlock()
	if cap(b) < len(data) {
		b = make([]byte, len(data))
	}
	b = b[:len(data)]
	copy(b, data)
	ra.mu.Lock()
	ra.chunks = append(ra.chunks, chunk{addr, b})
	ra.head = addr + uint64(len(data))
	ra.cond.Broadcast()
	ra.mu.Unlock()
	return nil
}

var errStopped = errors.New("readahead stopped")

// stop ends the stream's consumption (the pager is done).
func (ra *readahead) stop() {
	ra.mu.Lock()
	ra.done = true
	ra.chunks, ra.buffered = nil, 0
	ra.cond.Broadcast()
	ra.mu.Unlock()
}

// take fills buf from the stream if it has (or will shortly have) every
// page of [addr, addr+len(buf)).
func (ra *readahead) take(addr uint64, buf []byte) bool {
	ra.mu.Lock()
	defer ra.mu.Unlock()
	if !ra.started {
		return false
	}
	end := addr + uint64(len(buf))
	for {
		// Chunks wholly below addr will not be asked for again: the
		// fill moves up, and faults below it find their pages local.
		i := 0
		for i < len(ra.chunks) && ra.chunks[i].addr+uint64(len(ra.chunks[i].data)) <= addr {
			ra.buffered -= len(ra.chunks[i].data)
			if len(ra.free) < raLimit/transport.MaxChunkSize {
				ra.free = append(ra.free, ra.chunks[i].data)
			}
			i++
		}
		if i > 0 {
			ra.chunks = ra.chunks[i:]
			ra.cond.Broadcast()
		}
		if ra.covered(addr, end, buf) {
			return true
		}
		if ra.done || end <= ra.head || addr >= ra.head+raWait {
			return false // passed, stopped, or too far ahead
		}
		ra.cond.Wait()
	}
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
