package transport

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pagesvc "github.com/cowmig/cowmig/transport/pagesvc/v1"
)

// This file is the client side of the shared-memory bulk stream (see
// bulk.go for the protocol).

const (
	// bulkWindowBytes bounds one request of a bulk stream; the client keeps
	// bulkWindowsAhead requests queued at the server so that it never
	// waits for one between windows.
	bulkWindowBytes  = 256 << 20
	bulkWindowsAhead = 2
	// bulkWindowRanges bounds the ranges of one request, so that its frame
	// stays under the server's maxRequestFrame (a range encodes in at
	// most 24 bytes).
	bulkWindowRanges = 1024
	// maxRingSlots and maxRingBytes bound the ring a server may hand out
	// (slots of at most MaxChunkSize bytes).
	maxRingSlots = 1024
	maxRingBytes = 1 << 30
	// bulkSetupTimeout bounds the wait for the server's first frame after
	// the first request. A server that speaks the bulk stream answers at
	// once (the ring, or a refusal); one that does not would leave the
	// stream, and the clone's faults waiting on it, stalled forever.
	bulkSetupTimeout = 10 * time.Second
)

// clientRing is the client's read-only mapping of a bulk stream's ring. It
// is unmapped when the last reference goes: the stream holds one while it
// runs and every chunk handed to the caller one until released, so no
// caller ever reads unmapped memory.
type clientRing struct {
	mem      []byte
	slots    int
	slotSize int
	refs     atomic.Int64
}

func (r *clientRing) unref() {
	if r.refs.Add(-1) == 0 {
		_ = unix.Munmap(r.mem)
	}
}

// clientRingSeals are the seals mapRing requires: a fixed size (the
// mapping can never SIGBUS) and no new writable mapping (nobody but the
// server, which mapped it before sealing, can change a slot).
const clientRingSeals = unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_FUTURE_WRITE

// mapRing maps the ring fd the server sent, after checking that it is a
// memfd (tmpfs) sealed with clientRingSeals and large enough.
func mapRing(fd, slots, slotSize int) (*clientRing, error) {
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil {
		return nil, fmt.Errorf("ring statfs: %w", err)
	}
	if fs.Type != unix.TMPFS_MAGIC {
		return nil, fmt.Errorf("ring on a file system of type %#x, not tmpfs: %w", fs.Type, ErrProtocol)
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		return nil, fmt.Errorf("ring seals: %w (%w)", ErrProtocol, err)
	}
	if seals&clientRingSeals != clientRingSeals {
		return nil, fmt.Errorf("ring seals %#x, need %#x: %w", seals, clientRingSeals, ErrProtocol)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("ring stat: %w", err)
	}
	size := slots * slotSize
	if st.Size < int64(size) {
		return nil, fmt.Errorf("ring of %d bytes, need %d: %w", st.Size, size, ErrProtocol)
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("map ring: %w", err)
	}
	r := &clientRing{mem: mem, slots: slots, slotSize: slotSize}
	r.refs.Store(1)
	return r, nil
}

// bulkConn is the client's end of one bulk connection.
type bulkConn struct {
	conn *net.UnixConn
	// rbuf holds bytes read and not yet parsed, rbuf[roff:].
	rbuf []byte
	roff int
	oob  []byte
	// got counts the bytes read from conn so far: descriptors may only
	// come with the first read, the one holding the setup frame (always
	// the server's first frame when it comes at all).
	got int64
	// fds received and not yet claimed by a setup frame.
	fds []int
	// setupDeadline is set while the server's first frame is awaited
	// under a read deadline.
	setupDeadline time.Duration
	ring          *clientRing
	// mu guards held: the slots the caller holds.
	mu   sync.Mutex
	held []bool
}

// streamBulk is Stream over the bulk protocol: fn owns each chunk's data
// until it calls release.
func (c *Client) streamBulk(ctx context.Context, proc uint32, ranges []Range, chunk int, fn func(addr uint64, data []byte, release func()) error) (err error) {
	network, address, err := ParseAddr(c.addr)
	if err != nil || network != "unix" {
		return fmt.Errorf("stream: bulk needs a unix socket, not %q: %w", c.addr, ErrBadAddress)
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", address)
	if err != nil {
		return fmt.Errorf("stream: dial %s: %w (%w)", c.addr, ErrClosed, err)
	}
	b := &bulkConn{conn: nc.(*net.UnixConn), rbuf: make([]byte, 0, 4096), oob: make([]byte, unix.CmsgSpace(4*4))}
	// Cancellation and Client.Close cut the connection, which ends every
	// read and write below.
	var cut atomic.Pointer[error]
	stop1 := context.AfterFunc(ctx, func() {
		e := ctx.Err()
		cut.CompareAndSwap(nil, &e)
		b.conn.Close()
	})
	stop2 := context.AfterFunc(c.ctx, func() {
		e := fmt.Errorf("client closed: %w", ErrClosed)
		cut.CompareAndSwap(nil, &e)
		b.conn.Close()
	})
	defer func() {
		stop1()
		stop2()
		b.conn.Close()
		closeFds(b.fds)
		if b.ring != nil {
			b.ring.unref()
		}
		if e := cut.Load(); e != nil && err != nil && !errors.Is(err, *e) {
			err = fmt.Errorf("%w (%w)", *e, err)
		}
	}()
	if _, err := b.conn.Write(bulkMagic[:]); err != nil {
		return fmt.Errorf("stream: %w (%w)", ErrClosed, err)
	}
	windows := capRanges(splitRanges(ranges, bulkWindowBytes, uint64(chunk)), bulkWindowRanges)
	sent := 0
	for i, w := range windows {
		for sent < len(windows) && sent <= i+bulkWindowsAhead-1 {
			if err := b.request(c, proc, windows[sent], chunk); err != nil {
				return err
			}
			sent++
		}
		if i == 0 {
			// Cancellation cuts the connection rather than using
			// deadlines, so this one is the only deadline on it.
			if err := b.conn.SetReadDeadline(time.Now().Add(c.bulkSetupTimeout)); err != nil {
				return fmt.Errorf("stream: %w (%w)", ErrClosed, err)
			}
			b.setupDeadline = c.bulkSetupTimeout
		}
		if err := b.consume(ctx, w, chunk, fn); err != nil {
			return err
		}
	}
	return nil
}

// request sends one window's request.
func (b *bulkConn) request(c *Client, proc uint32, w batch, chunk int) error {
	p, err := proto.Marshal(&pagesvc.StreamPagesRequest{Token: c.token, Process: proc, Ranges: w.ranges, ChunkSize: uint32(chunk)})
	if err != nil {
		return fmt.Errorf("stream: encode request: %w", err)
	}
	if len(p) > maxRequestFrame {
		// Only a huge token gets here: windows hold at most
		// bulkWindowRanges ranges.
		return fmt.Errorf("stream pages %#x: request of %d bytes, the bulk stream takes %d: %w", w.ranges[0].GetAddr(), len(p), maxRequestFrame, ErrBadRequest)
	}
	f := appendFrameHeader(make([]byte, 0, frameHeader+len(p)), frameRequest, len(p))
	if _, err := b.conn.Write(append(f, p...)); err != nil {
		return fmt.Errorf("stream pages %#x: send request: %w (%w)", w.ranges[0].GetAddr(), ErrClosed, err)
	}
	return nil
}

// consume receives one window's chunks, checks that they cover its ranges
// exactly and in order, and hands them to fn.
func (b *bulkConn) consume(ctx context.Context, w batch, chunk int, fn func(uint64, []byte, func()) error) error {
	i, off := 0, uint64(0) // position in w
	for {
		// Frames may already be buffered when ctx ends.
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("stream pages %#x: %w", w.ranges[0].GetAddr(), err)
		}
		typ, p, err := b.frame()
		if err != nil {
			if b.setupDeadline != 0 && errors.Is(err, os.ErrDeadlineExceeded) {
				return fmt.Errorf("stream pages %#x: no answer to the bulk stream's first request within %v (a server without the bulk stream?): %w (%w)",
					w.ranges[0].GetAddr(), b.setupDeadline, ErrProtocol, err)
			}
			return fmt.Errorf("stream pages %#x: %w (%w)", w.ranges[0].GetAddr(), ErrClosed, err)
		}
		if b.setupDeadline != 0 {
			b.setupDeadline = 0
			if err := b.conn.SetReadDeadline(time.Time{}); err != nil {
				return fmt.Errorf("stream pages: %w (%w)", ErrClosed, err)
			}
		}
		if typ != frameSetup && len(b.fds) > 0 {
			n := len(b.fds)
			closeFds(b.fds)
			b.fds = nil
			return fmt.Errorf("stream pages: %d descriptors with a frame of type %d: %w", n, typ, ErrProtocol)
		}
		switch typ {
		case frameSetup:
			if err := b.setup(p, chunk); err != nil {
				return fmt.Errorf("stream pages: %w", err)
			}
		case frameEnd:
			if len(p) < 4 {
				return fmt.Errorf("stream pages: end frame of %d bytes: %w", len(p), ErrProtocol)
			}
			if code := binary.LittleEndian.Uint32(p); code != 0 {
				return fromStatus("stream pages", status.Error(codes.Code(code), string(p[4:])))
			}
			if i != len(w.ranges) {
				return fmt.Errorf("stream pages: ended before %#x: %w", w.ranges[min(i, len(w.ranges)-1)].GetAddr()+off, ErrProtocol)
			}
			return nil
		case frameChunk:
			if len(p) != 16 || b.ring == nil {
				return fmt.Errorf("stream pages: chunk frame of %d bytes, ring set up %v: %w", len(p), b.ring != nil, ErrProtocol)
			}
			slot := int(binary.LittleEndian.Uint32(p))
			addr := binary.LittleEndian.Uint64(p[4:])
			n := uint64(binary.LittleEndian.Uint32(p[12:]))
			if i == len(w.ranges) {
				return fmt.Errorf("stream pages: chunk %#x after the last one: %w", addr, ErrProtocol)
			}
			r := w.ranges[i]
			if addr != r.GetAddr()+off || n == 0 || n > uint64(chunk) || n%uint64(pageSizeOf()) != 0 || n > r.GetLength()-off || slot >= b.ring.slots {
				return fmt.Errorf("stream pages: chunk %#x+%#x in slot %d, expected one at %#x+%#x at most, in pages, of at most %#x, in one of %d slots: %w",
					addr, n, slot, r.GetAddr()+off, r.GetLength()-off, chunk, b.ring.slots, ErrProtocol)
			}
			b.mu.Lock()
			dup := b.held[slot]
			b.held[slot] = true
			b.mu.Unlock()
			if dup {
				return fmt.Errorf("stream pages: slot %d handed out twice: %w", slot, ErrProtocol)
			}
			at := slot * b.ring.slotSize
			b.ring.refs.Add(1)
			if err := fn(addr, b.ring.mem[at:at+int(n):at+int(n)], b.releaser(slot)); err != nil {
				return err
			}
			off += n
			if off == r.GetLength() {
				i, off = i+1, 0
			}
		default:
			return fmt.Errorf("stream pages: frame type %d from server: %w", typ, ErrProtocol)
		}
	}
}

// releaser returns the release function of a chunk in slot: it gives the
// slot back to the server once, and the ring's reference.
func (b *bulkConn) releaser(slot int) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			b.mu.Lock()
			b.held[slot] = false
			b.mu.Unlock()
			var f [frameHeader + 4]byte
			h := appendFrameHeader(f[:0], frameRelease, 4)
			h = binary.LittleEndian.AppendUint32(h, uint32(slot))
			// After the stream ended the write fails, harmlessly: the
			// server has let go of the ring.
			_, _ = b.conn.Write(h)
			b.ring.unref()
		})
	}
}

// setup maps the ring a setup frame announces.
func (b *bulkConn) setup(p []byte, chunk int) error {
	// The mapping keeps the memfd alive; its descriptors are not needed
	// past this frame, whatever its fate.
	fds := b.fds
	b.fds = nil
	defer closeFds(fds)
	if b.ring != nil || len(p) != 8 || len(fds) != 1 {
		return fmt.Errorf("setup frame of %d bytes with %d fds (ring already set up: %v): %w", len(p), len(fds), b.ring != nil, ErrProtocol)
	}
	slots := int(binary.LittleEndian.Uint32(p))
	size := int(binary.LittleEndian.Uint32(p[4:]))
	// Each bounded first, so that the product cannot overflow.
	if slots < 1 || slots > maxRingSlots || size < chunk || size > MaxChunkSize || size%pageSizeOf() != 0 || slots*size > maxRingBytes {
		return fmt.Errorf("ring of %d slots of %d bytes for chunks of %d: %w", slots, size, chunk, ErrProtocol)
	}
	r, err := mapRing(fds[0], slots, size)
	if err != nil {
		return err
	}
	b.ring = r
	b.held = make([]bool, slots)
	return nil
}

// frame returns the next frame; its payload is valid until the next call.
func (b *bulkConn) frame() (byte, []byte, error) {
	if err := b.fill(frameHeader); err != nil {
		return 0, nil, err
	}
	n := int(binary.LittleEndian.Uint32(b.rbuf[b.roff:]))
	if n < 1 || n-1 > maxEndFrame {
		return 0, nil, fmt.Errorf("bulk frame of %d bytes: %w", n, ErrProtocol)
	}
	if err := b.fill(4 + n); err != nil {
		return 0, nil, err
	}
	typ := b.rbuf[b.roff+4]
	p := b.rbuf[b.roff+frameHeader : b.roff+4+n]
	b.roff += 4 + n
	return typ, p, nil
}

// fill reads until at least n unparsed bytes are buffered, collecting the
// file descriptors that come along.
func (b *bulkConn) fill(n int) error {
	if len(b.rbuf)-b.roff >= n {
		return nil
	}
	// Move the unparsed bytes to the front (the previous frame's payload
	// is no longer in use).
	k := copy(b.rbuf[:cap(b.rbuf)], b.rbuf[b.roff:])
	b.rbuf, b.roff = b.rbuf[:k], 0
	if cap(b.rbuf) < n {
		nb := make([]byte, k, n+4096)
		copy(nb, b.rbuf)
		b.rbuf = nb
	}
	for len(b.rbuf) < n {
		m, oobn, flags, _, err := b.conn.ReadMsgUnix(b.rbuf[len(b.rbuf):cap(b.rbuf)], b.oob)
		m, oobn = max(m, 0), max(oobn, 0) // -1 on some errors
		if oobn > 0 {
			if perr := b.takeFds(b.oob[:oobn], b.got == 0); perr != nil {
				return perr
			}
		}
		b.got += int64(m)
		if flags&unix.MSG_CTRUNC != 0 {
			return fmt.Errorf("bulk stream: ancillary data truncated: %w", ErrProtocol)
		}
		b.rbuf = b.rbuf[:len(b.rbuf)+m]
		if err != nil {
			if errors.Is(err, io.EOF) && len(b.rbuf) >= n {
				return nil
			}
			return err
		}
		if m == 0 {
			return io.EOF
		}
	}
	return nil
}

// takeFds records the descriptors of SCM_RIGHTS messages: exactly one,
// the ring's, on the read that holds the setup frame (first says this read
// is the connection's first). Any other descriptors break the protocol and
// are closed at once, so that a hostile server cannot fill the client's
// descriptor table.
func (b *bulkConn) takeFds(oob []byte, first bool) error {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return fmt.Errorf("bulk stream: ancillary data: %w (%w)", ErrProtocol, err)
	}
	var fds []int
	for _, m := range msgs {
		f, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue // not SCM_RIGHTS
		}
		fds = append(fds, f...)
	}
	if len(fds) == 0 {
		return nil
	}
	if !first || len(fds) != 1 || len(b.fds) > 0 || b.ring != nil {
		// The stream is over: those received before go too.
		closeFds(fds)
		closeFds(b.fds)
		b.fds = nil
		return fmt.Errorf("bulk stream: %d descriptors outside the setup frame: %w", len(fds), ErrProtocol)
	}
	b.fds = append(b.fds, fds...)
	return nil
}

func closeFds(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// capRanges splits the batches of more than limit ranges.
func capRanges(bs []batch, limit int) []batch {
	out := make([]batch, 0, len(bs))
	for _, b := range bs {
		for len(b.ranges) > limit {
			head := batch{ranges: b.ranges[:limit:limit]}
			for _, r := range head.ranges {
				head.bytes += r.GetLength()
			}
			out = append(out, head)
			b.ranges, b.bytes = b.ranges[limit:], b.bytes-head.bytes
		}
		out = append(out, b)
	}
	return out
}

func pageSizeOf() int { return unix.Getpagesize() }
