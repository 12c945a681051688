package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/ttrpc"

	pagesvc "github.com/cowmig/cowmig/transport/pagesvc/v1"
)

// Client-side tuning of the page service.
const (
	// ClientRequestBytes is the most data Client.GetPages asks for in one
	// request; larger reads are split.
	ClientRequestBytes = 2 << 20
	// ClientRequestsInFlight bounds the concurrent requests of one GetPages.
	ClientRequestsInFlight = 4

	// streamWindowChunks bounds the chunks of one StreamPages call: with the
	// final status message it must stay under ttrpc's per-stream queue of 64
	// messages (see the package doc on flow control).
	streamWindowChunks = 16
	// streamWindowBytes bounds the data of one window, so that the client's
	// queued data (streamWindowsInFlight windows) stays bounded whatever
	// the chunk size.
	streamWindowBytes = 16 << 20
	// streamWindowsInFlight is how many windows Stream keeps requested: the
	// one being consumed and the ones the server fills meanwhile.
	streamWindowsInFlight = 3
	// closeTimeout bounds the wait for the server's close ack.
	closeTimeout = 10 * time.Second
)

// Client is a restoring side's session with a page server. Its methods may be
// called concurrently.
type Client struct {
	// rpc carries Open, GetPages and the other short calls; Stream uses a
	// second connection (bulk), so that a fault's GetPages never queues
	// behind megabytes of background fill in the server's writer.
	rpc        *ttrpc.Client
	svc        pagesvc.PagesClient
	service    string // the service's full name, for direct ttrpc calls
	addr       string
	tlsCfg     *tls.Config
	token      []byte
	id         string
	snapshotID string
	procs      []ProcessInfo
	pageSize   uint64

	// ctx lives as long as the client; streams are created with it so that
	// a stream abandoned by Stream can still be drained. Close cancels it.
	ctx    context.Context
	cancel context.CancelFunc
	// workers counts the goroutines spawn started (receives and drains of
	// streams); Close waits for them after cancelling ctx.
	workers sync.WaitGroup
	mu      sync.Mutex
	// closing is set by Close before it waits for workers; guarded by mu.
	closing bool
	// bulk is the Stream connection, dialled on first use; guarded by mu.
	bulk    *ttrpc.Client
	bulkSvc pagesvc.PagesClient

	// heldBufs holds *[]byte of MaxChunkSize for StreamHeld over ttrpc.
	heldBufs sync.Pool
	// bulkOffered: the server's Open offered the bulk stream. A server
	// that predates it would read the bulk magic as the header of a
	// ~1.1 GiB ttrpc message and wait for it forever.
	bulkOffered bool
	// bulkSetupTimeout bounds the wait for the server's first bulk frame
	// (bulkSetupTimeout; shorter in tests).
	bulkSetupTimeout time.Duration
	// noBulk makes streams use ttrpc on a unix socket too (tests).
	noBulk bool

	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

// Dial connects to the page server at addr (see ParseAddr), with TLS on TCP
// when tlsCfg is set, and opens a session as clientID. A token the server
// rejects gives an error wrapping ErrBadToken.
func Dial(ctx context.Context, addr string, token []byte, clientID string, tlsCfg *tls.Config) (*Client, error) {
	if clientID == "" {
		return nil, fmt.Errorf("dial %s: empty client id: %w", addr, ErrBadRequest)
	}
	conn, err := dial(ctx, addr, tlsCfg)
	if err != nil {
		return nil, err
	}
	rpc := ttrpc.NewClient(conn)
	cctx, cancel := context.WithCancel(context.Background())
	c := &Client{
		rpc:      rpc,
		svc:      pagesvc.NewPagesClient(rpc),
		service:  string(pagesvc.File_pages_proto.Services().ByName("Pages").FullName()),
		addr:     addr,
		tlsCfg:   tlsCfg,
		token:    append([]byte(nil), token...),
		id:       clientID,
		pageSize: uint64(os.Getpagesize()),
		ctx:      cctx,
		cancel:   cancel,

		bulkSetupTimeout: bulkSetupTimeout,
	}
	c.heldBufs.New = func() any {
		b := make([]byte, MaxChunkSize)
		return &b
	}
	resp, err := c.svc.Open(ctx, &pagesvc.OpenRequest{
		Token:           c.token,
		ProtocolVersion: ProtocolVersion,
		ClientId:        clientID,
	})
	if err != nil {
		cancel()
		rpc.Close()
		return nil, fromStatus("open "+addr, err)
	}
	if v := resp.GetProtocolVersion(); v != ProtocolVersion {
		cancel()
		rpc.Close()
		return nil, fmt.Errorf("open %s: server answered version %d: %w", addr, v, ErrVersion)
	}
	c.snapshotID = resp.GetSnapshotId()
	c.bulkOffered = resp.GetBulkStream()
	for _, p := range resp.GetProcesses() {
		c.procs = append(c.procs, ProcessInfo{ID: p.GetId(), PagesTotal: p.GetPagesTotal()})
	}
	return c, nil
}

// Processes returns the snapshot's processes as Open reported them.
func (c *Client) Processes() []ProcessInfo {
	return append([]ProcessInfo(nil), c.procs...)
}

// SnapshotID returns the snapshot's id as Open reported it.
func (c *Client) SnapshotID() string { return c.snapshotID }

// GetPages fills buf with the concatenated content of ranges of process
// proc; len(buf) must equal the ranges' total. Reads above
// ClientRequestBytes are split into several requests, up to
// ClientRequestsInFlight at a time. On error buf's content is undefined.
func (c *Client) GetPages(ctx context.Context, proc uint32, ranges []Range, buf []byte) error {
	if c.closed.Load() {
		return fmt.Errorf("get pages: %w", ErrClosed)
	}
	total, err := c.checkRanges(ranges)
	if err != nil {
		return fmt.Errorf("get pages: %w", err)
	}
	if total != uint64(len(buf)) {
		return fmt.Errorf("get pages: ranges total %d bytes, buffer %d: %w", total, len(buf), ErrBadRequest)
	}
	batches := splitRanges(ranges, ClientRequestBytes, 0)
	if len(batches) == 1 {
		return c.getBatch(ctx, proc, batches[0], buf)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		sem      = make(chan struct{}, ClientRequestsInFlight)
		failOnce sync.Once
		firstErr error // the failure that cancelled the others; set once
	)
	off := uint64(0)
loop:
	for _, b := range batches {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			break loop
		}
		dst := buf[off : off+b.bytes]
		off += b.bytes
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := c.getBatch(ctx, proc, b, dst); err != nil {
				failOnce.Do(func() { firstErr = err })
				cancel()
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}

// getBatch runs one GetPages request and decodes its answer into dst. It
// calls ttrpc directly, not through the generated client, so that the data
// is decoded straight into dst (see codec.go).
func (c *Client) getBatch(ctx context.Context, proc uint32, b batch, dst []byte) error {
	req := &pagesvc.GetPagesRequest{Token: c.token, Process: proc, Ranges: b.ranges}
	resp := newPagesIn(dst)
	if err := c.rpc.Call(ctx, c.service, "GetPages", req, resp); err != nil {
		return fromStatus(fmt.Sprintf("get pages %#x+%#x", b.ranges[0].GetAddr(), b.bytes), err)
	}
	if resp.overflow || uint64(resp.n) != b.bytes {
		return fmt.Errorf("get pages %#x: answer too long or short for %d bytes: %w", b.ranges[0].GetAddr(), b.bytes, ErrProtocol)
	}
	return nil
}

// Stream fetches ranges of process proc in chunks of at most chunk bytes (0
// means DefaultChunkSize) and calls fn for each, in address order within
// each range and in range order. data is valid only until fn returns. Stream
// returns nil only after fn saw every byte of every range; an error from fn
// stops the stream and is returned as is.
//
// On a unix socket the pages come through memory shared with the server
// (bulk.go), otherwise as StreamPages messages.
func (c *Client) Stream(ctx context.Context, proc uint32, ranges []Range, chunk int, fn func(addr uint64, data []byte) error) error {
	chunk, err := c.checkStream(ranges, chunk)
	if err != nil {
		return err
	}
	if c.bulkUsable() {
		return c.streamBulk(ctx, proc, ranges, chunk, func(addr uint64, data []byte, release func()) error {
			defer release()
			return fn(addr, data)
		})
	}
	return c.streamRPC(ctx, proc, ranges, chunk, fn)
}

// StreamHeld is Stream for a caller that keeps chunks after fn returns:
// fn owns data until it calls release, exactly once, from any goroutine,
// also after StreamHeld returned. The stream stalls while the caller holds
// many chunks (on a unix socket, the server's ring of 16 chunks; over TCP
// it never stalls, each held chunk is a buffer of its own), so a caller
// must release chunks without waiting for later ones.
func (c *Client) StreamHeld(ctx context.Context, proc uint32, ranges []Range, chunk int, fn func(addr uint64, data []byte, release func()) error) error {
	chunk, err := c.checkStream(ranges, chunk)
	if err != nil {
		return err
	}
	if c.bulkUsable() {
		return c.streamBulk(ctx, proc, ranges, chunk, fn)
	}
	return c.streamRPC(ctx, proc, ranges, chunk, func(addr uint64, data []byte) error {
		bp := c.heldBufs.Get().(*[]byte)
		if len(data) > cap(*bp) {
			// window.consume refuses chunks above the chunk size; this
			// guards the slicing below whatever it lets through.
			c.heldBufs.Put(bp)
			return fmt.Errorf("stream pages: chunk %#x of %d bytes, buffers hold %d: %w", addr, len(data), cap(*bp), ErrProtocol)
		}
		b := (*bp)[:len(data)]
		copy(b, data)
		var once sync.Once
		return fn(addr, b, func() { once.Do(func() { c.heldBufs.Put(bp) }) })
	})
}

// bulkUsable says whether streams go through shared memory: on a unix
// socket to a server that offered it, unless a test turned it off.
func (c *Client) bulkUsable() bool {
	network, _, err := ParseAddr(c.addr)
	return err == nil && network == "unix" && c.bulkOffered && !c.noBulk
}

// checkStream validates a stream's arguments and returns the chunk size.
func (c *Client) checkStream(ranges []Range, chunk int) (int, error) {
	if c.closed.Load() {
		return 0, fmt.Errorf("stream: %w", ErrClosed)
	}
	if chunk == 0 {
		chunk = DefaultChunkSize
	}
	if chunk < 0 || chunk > MaxChunkSize || uint64(chunk)%c.pageSize != 0 {
		return 0, fmt.Errorf("stream: chunk size %d: want a page multiple up to %d: %w", chunk, MaxChunkSize, ErrBadRequest)
	}
	if _, err := c.checkRanges(ranges); err != nil {
		return 0, fmt.Errorf("stream: %w", err)
	}
	return chunk, nil
}

// streamRPC is Stream over StreamPages calls.
func (c *Client) streamRPC(ctx context.Context, proc uint32, ranges []Range, chunk int, fn func(addr uint64, data []byte) error) error {
	svc, err := c.bulkClient(ctx)
	if err != nil {
		return err
	}
	windows := splitRanges(ranges, min(uint64(chunk)*streamWindowChunks, streamWindowBytes), uint64(chunk))
	msg := newChunkIn()

	var queue []*window
	defer func() {
		for _, w := range queue {
			c.abandon(w)
		}
	}()
	next := 0
	for range windows {
		for next < len(windows) && len(queue) < streamWindowsInFlight {
			w, err := c.openWindow(svc, proc, windows[next], chunk, msg)
			if err != nil {
				return err
			}
			queue = append(queue, w)
			next++
		}
		w := queue[0]
		if err := w.consume(ctx, fn); err != nil {
			return err
		}
		queue = queue[1:]
	}
	return nil
}

// Done tells the server that this client has every page of proc it needs.
func (c *Client) Done(ctx context.Context, proc uint32) error {
	if c.closed.Load() {
		return fmt.Errorf("done: %w", ErrClosed)
	}
	_, err := c.svc.Done(ctx, &pagesvc.DoneRequest{Token: c.token, ClientId: c.id, Process: proc})
	return fromStatus(fmt.Sprintf("done process %d", proc), err)
}

// Release asks the server to release the snapshot now.
func (c *Client) Release(ctx context.Context) error {
	if c.closed.Load() {
		return fmt.Errorf("release: %w", ErrClosed)
	}
	_, err := c.svc.Release(ctx, &pagesvc.ReleaseRequest{Token: c.token})
	return fromStatus("release", err)
}

// Close ends the session: it sends Close, waits (at most closeTimeout) for
// the server's ack and closes the connection. It returns an error if no ack
// came; later calls return the first call's result.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		defer cancel()
		resp, err := c.svc.Close(ctx, &pagesvc.CloseRequest{Token: c.token, ClientId: c.id})
		switch {
		case err != nil:
			c.closeErr = fromStatus("close", err)
		case !resp.GetAck():
			c.closeErr = fmt.Errorf("close: server did not ack: %w", ErrProtocol)
		}
		c.mu.Lock()
		c.closing = true
		bulk := c.bulk
		c.mu.Unlock()
		c.cancel()
		c.rpc.Close()
		if bulk != nil {
			bulk.Close()
		}
		c.workers.Wait()
	})
	return c.closeErr
}

// bulkClient returns the Stream connection, dialling it on first use.
func (c *Client) bulkClient(ctx context.Context) (pagesvc.PagesClient, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return nil, fmt.Errorf("stream: %w", ErrClosed)
	}
	if c.bulk == nil {
		conn, err := dial(ctx, c.addr, c.tlsCfg)
		if err != nil {
			return nil, fmt.Errorf("stream: %w", err)
		}
		c.bulk = ttrpc.NewClient(conn)
		c.bulkSvc = pagesvc.NewPagesClient(c.bulk)
	}
	return c.bulkSvc, nil
}

// checkRanges validates ranges like the server does, so that a bad request
// fails before it is split, and returns their total length.
func (c *Client) checkRanges(ranges []Range) (uint64, error) {
	if len(ranges) == 0 {
		return 0, fmt.Errorf("no ranges: %w", ErrBadRequest)
	}
	var total uint64
	for _, r := range ranges {
		switch {
		case r.Len == 0:
			return 0, fmt.Errorf("range %#x: empty: %w", r.Addr, ErrBadRequest)
		case r.Addr%c.pageSize != 0 || r.Len%c.pageSize != 0:
			return 0, fmt.Errorf("range %#x+%#x: not page aligned: %w", r.Addr, r.Len, ErrBadRequest)
		case r.Addr+r.Len < r.Addr || total+r.Len < total:
			return 0, fmt.Errorf("range %#x+%#x: wraps around: %w", r.Addr, r.Len, ErrBadRequest)
		}
		total += r.Len
	}
	return total, nil
}

// batch is a run of ranges for one request.
type batch struct {
	ranges []*pagesvc.Range
	bytes  uint64
}

// splitRanges cuts ranges into batches of at most limit bytes, splitting a
// range where a batch fills up. With chunk > 0 a batch also holds at most
// limit/chunk chunks as the server will cut them (a range of n bytes is
// ceil(n/chunk) chunks), so that a stream of small ranges stays bounded too.
// limit and chunk are page multiples, so every piece stays page aligned.
func splitRanges(ranges []Range, limit, chunk uint64) []batch {
	var (
		out    []batch
		cur    batch
		chunks uint64
	)
	maxChunks := uint64(0)
	if chunk > 0 {
		maxChunks = limit / chunk
	}
	flush := func() {
		if len(cur.ranges) > 0 {
			out = append(out, cur)
		}
		cur, chunks = batch{}, 0
	}
	for _, r := range ranges {
		addr, left := r.Addr, r.Len
		for left > 0 {
			n := min(left, limit-cur.bytes)
			if chunk > 0 {
				if chunks == maxChunks {
					flush()
					continue
				}
				n = min(n, (maxChunks-chunks)*chunk)
				chunks += (n + chunk - 1) / chunk
			}
			cur.ranges = append(cur.ranges, &pagesvc.Range{Addr: addr, Length: n})
			cur.bytes += n
			addr += n
			left -= n
			if cur.bytes == limit {
				flush()
			}
		}
	}
	flush()
	return out
}

// window is one StreamPages call of Stream, with what it still expects.
type window struct {
	c      *Client
	stream ttrpc.ClientStream
	ranges []*pagesvc.Range
	// chunk is the requested chunk size, the most data a chunk may carry.
	chunk uint64
	// msg receives the chunks; Stream shares one among its windows, so
	// the data buffer is allocated once per call.
	msg *dataIn
	// finished is set once the server ended the stream (or the
	// connection died), so the stream needs no draining.
	finished bool
}

// openWindow sends the StreamPages request of one window. The stream is tied
// to the client's lifetime, not to Stream's ctx, so that it can be drained if
// Stream gives up on it (ttrpc cannot cancel a stream).
func (c *Client) openWindow(svc pagesvc.PagesClient, proc uint32, b batch, chunk int, msg *dataIn) (*window, error) {
	req := &pagesvc.StreamPagesRequest{Token: c.token, Process: proc, Ranges: b.ranges, ChunkSize: uint32(chunk)}
	st, err := svc.StreamPages(c.ctx, req)
	if err != nil {
		return nil, fromStatus(fmt.Sprintf("stream pages %#x+%#x", b.ranges[0].GetAddr(), b.bytes), err)
	}
	return &window{c: c, stream: st, ranges: b.ranges, chunk: uint64(chunk), msg: msg}, nil
}

// consume receives the window's chunks, checks that they cover its ranges
// exactly and in order, and hands them to fn.
func (w *window) consume(ctx context.Context, fn func(uint64, []byte) error) error {
	msg := w.msg
	for i := 0; i < len(w.ranges); {
		r := w.ranges[i]
		if err := w.recv(ctx, msg); err != nil {
			return fromStatus(fmt.Sprintf("stream pages %#x", r.GetAddr()), err)
		}
		data := msg.data()
		n := uint64(len(data))
		// A chunk above the requested size would overrun StreamHeld's
		// buffers, and one of a partial page could not be mapped.
		if msg.addr != r.GetAddr() || n == 0 || n > r.GetLength() || n > w.chunk || n%w.c.pageSize != 0 {
			return fmt.Errorf("stream pages: chunk %#x+%#x, expected one at %#x+%#x at most, in pages, of at most %#x: %w",
				msg.addr, n, r.GetAddr(), r.GetLength(), w.chunk, ErrProtocol)
		}
		if err := fn(msg.addr, data); err != nil {
			return err
		}
		if n == r.GetLength() {
			i++
		} else {
			w.ranges[i] = &pagesvc.Range{Addr: r.GetAddr() + n, Length: r.GetLength() - n}
		}
	}
	// The server ends the stream after the last chunk; anything else, an
	// extra chunk or an error status, is a failure of the whole window.
	err := w.recv(ctx, msg)
	if err == nil {
		return fmt.Errorf("stream pages: chunk %#x after the last one: %w", msg.addr, ErrProtocol)
	}
	if errors.Is(err, io.EOF) {
		return nil
	}
	return fromStatus("stream pages: end", err)
}

// recv receives one message, giving up when ctx ends. ttrpc's RecvMsg only
// watches the stream's own (client-lifetime) context, so the receive runs in
// a helper goroutine; when ctx ends first, that goroutine keeps the stream
// and drains it.
func (w *window) recv(ctx context.Context, msg *dataIn) error {
	if ctx.Done() == nil {
		err := w.stream.RecvMsg(msg)
		w.finished = err != nil
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	done := make(chan error)
	abandoned := make(chan struct{})
	started := w.c.spawn(func() {
		err := w.stream.RecvMsg(msg)
		select {
		case done <- err:
		case <-abandoned:
			if err == nil {
				w.drainLocked()
			}
		}
	})
	if !started {
		w.finished = true
		return ErrClosed
	}
	select {
	case err := <-done:
		w.finished = err != nil
		return err
	case <-ctx.Done():
		close(abandoned)
		w.finished = true // the helper owns the stream now
		return ctx.Err()
	}
}

// abandon drains a window Stream will not consume, in the background.
func (c *Client) abandon(w *window) {
	if w.finished {
		return
	}
	w.finished = true
	c.spawn(w.drainLocked)
}

// spawn runs f in a goroutine that Close waits for, unless the client is
// closing (then the connection is gone and f is not needed); it reports
// whether f runs.
func (c *Client) spawn(f func()) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return false
	}
	c.workers.Add(1)
	go func() {
		defer c.workers.Done()
		f()
	}()
	return true
}

// drainLocked reads the stream to its end so that ttrpc forgets it and frees
// its queue; it ends early when the client closes (the stream's context).
//
// Preconditions: the caller owns w.stream; no other goroutine uses it.
func (w *window) drainLocked() {
	m := newChunkIn()
	for w.stream.RecvMsg(m) == nil {
	}
}
