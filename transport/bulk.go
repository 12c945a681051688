package transport

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pagesvc "github.com/cowmig/cowmig/transport/pagesvc/v1"
)

// This file is the server side of the shared-memory bulk stream, the fast
// path of Client.Stream on a unix socket.
//
// Over ttrpc every streamed byte is copied four times: into the server's
// message, into the socket, out of it, and out of ttrpc's receive buffer.
// The restoring side then hands it to UFFDIO_COPY, a fifth. On two cores
// that caps the fill near 1 GiB/s whatever the framing (a bare unix socket
// moving 2 MiB writes already costs ~0.45 CPU-s per GiB here, UFFDIO_COPY
// another ~0.35). When both peers share a kernel, the page data need not
// cross the socket at all: the server reads pages into a ring of slots in
// a sealed memfd that the client maps read-only, and only 17-byte frames
// naming slots cross the socket. Each byte is then copied once by the
// server (the source's read) and once by the client (UFFDIO_COPY straight
// from the mapped slot), and the two copies run on different cores.
//
// Only a server whose Open answer sets bulk_stream speaks it: an older one
// would take the magic for the header of a ~1.1 GiB ttrpc message and wait
// for it. The client also gives up (ErrProtocol) when the first answer to
// its first request takes longer than bulkSetupTimeout.
//
// Wire format. A bulk connection starts with bulkMagic; ttrpc's first
// message header can never start with it (its length field would read
// ~1.1 GiB, above ttrpc's 4 MiB limit), so the server tells the two apart
// on the first bytes of every unix connection. Then both sides send frames
// of a little-endian uint32 length, a type byte and a payload:
//
//	client → server
//	  frameRequest   StreamPagesRequest (protobuf, as in pages.proto): its
//	                 token is checked like every ttrpc call's; the server
//	                 answers each request with its chunks, then frameEnd
//	  frameRelease   uint32 slot: the client is done with that slot
//	server → client
//	  frameSetup     uint32 slots, uint32 slot size; the ring's memfd rides
//	                 along as SCM_RIGHTS. Sent once, before the first chunk,
//	                 only after a request passed the token check
//	  frameChunk     uint32 slot, uint64 addr, uint32 length: the slot holds
//	                 the pages at addr; the client owns it until it releases it
//	  frameEnd       uint32 status code, then the status message (code 0:
//	                 the request's chunks are complete)
//
// The server writes a slot only while the client does not own it; the
// client checks every chunk like a ttrpc stream's (in order, inside the
// requested ranges, whole pages of at most the chunk size, no slot handed
// out twice). The memfd is sealed against shrinking, growing and new
// writable mappings (the client checks the seals and that it is on tmpfs),
// so the client's mapping can neither fault with SIGBUS nor be written to
// by anyone but the server. Descriptors other than the setup frame's one
// break the protocol.

// bulkMagic opens a bulk connection.
var bulkMagic = [8]byte{'C', 'O', 'W', 'M', 'B', 'L', 'K', '1'}

// Frame types of the bulk stream.
const (
	frameRequest byte = 1
	frameRelease byte = 2
	frameSetup   byte = 3
	frameChunk   byte = 4
	frameEnd     byte = 5
)

const (
	// frameHeader is a frame's length and type.
	frameHeader = 5
	// maxRequestFrame bounds a request frame, so that a peer without the
	// token cannot make the server buffer much. Client sends windows of at
	// most bulkWindowRanges ranges (24 bytes each at most, encoded) and
	// checks that its frame, token included, fits.
	maxRequestFrame = 64 << 10
	// maxEndFrame bounds an end frame's status message.
	maxEndFrame = 64 << 10
	// bulkSlots is the ring's slot count, of MaxChunkSize bytes each:
	// 32 MiB, enough for the server to stay ahead of UFFDIO_COPY and for
	// the restoring side's readahead to serve faults near the fill.
	bulkSlots = 16
	// bulkSlotSize is the size of a ring slot.
	bulkSlotSize = MaxChunkSize
)

// appendFrameHeader appends a frame header for a payload of n bytes.
func appendFrameHeader(b []byte, typ byte, n int) []byte {
	b = binary.LittleEndian.AppendUint32(b, uint32(1+n))
	return append(b, typ)
}

// readFrame reads one frame whose payload is at most limit bytes into buf
// (grown as needed) and returns its type and payload.
func readFrame(r io.Reader, buf []byte, limit int) (byte, []byte, error) {
	var h [frameHeader]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, buf, err
	}
	n := int(binary.LittleEndian.Uint32(h[:4]))
	if n < 1 || n-1 > limit {
		return 0, buf, fmt.Errorf("bulk frame of %d bytes: %w", n, ErrProtocol)
	}
	if cap(buf) < n-1 {
		buf = make([]byte, n-1)
	}
	buf = buf[:n-1]
	if _, err := io.ReadFull(r, buf); err != nil {
		return 0, buf, err
	}
	return h[4], buf, nil
}

// bulkSession is the server side of one bulk connection.
type bulkSession struct {
	s    *Server
	conn *net.UnixConn
	// ring is the server's writable mapping of the memfd, nil until the
	// first request passed the token check.
	ring []byte
	// free receives the slots the client released (and, at setup, every
	// slot); the writer takes one before reading pages into it.
	free chan uint32
	// mu guards owned: the slots the client currently owns. The writer
	// marks a slot before sending it, the reader clears it on release.
	mu    sync.Mutex
	owned [bulkSlots]bool
	// reqs carries requests from the reader to the writer.
	reqs chan *pagesvc.StreamPagesRequest
	// readErr is set by the reader before it closes gone.
	readErr error
	gone    chan struct{}
	// quit is closed once the writer has returned: nobody takes requests
	// any more, so the reader must not wait to hand one over.
	quit chan struct{}
}

// serveBulk runs a bulk session on conn, whose magic has been read, until
// the client hangs up, breaks the protocol, or the server stops. It
// returns when both of its goroutines (the caller's and the reader) ended.
func (s *Server) serveBulk(conn *net.UnixConn) {
	b := &bulkSession{
		s:    s,
		conn: conn,
		free: make(chan uint32, bulkSlots),
		reqs: make(chan *pagesvc.StreamPagesRequest, 4),
		gone: make(chan struct{}),
		quit: make(chan struct{}),
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		b.readLoop()
	}()
	b.writeLoop()
	// The reader ends once it would hand over a request (quit) or once
	// the connection is closed, whichever it is waiting for: a client
	// pipelining requests after a refused one must not keep it parked
	// on reqs until the server stops.
	close(b.quit)
	conn.Close()
	wg.Wait()
	if b.ring != nil {
		_ = unix.Munmap(b.ring)
	}
}

// readLoop reads the client's frames: requests go to the writer, releases
// return their slot.
func (b *bulkSession) readLoop() {
	defer close(b.gone)
	var buf []byte
	for {
		typ, p, err := readFrame(b.conn, buf, maxRequestFrame)
		buf = p
		if err != nil {
			b.readErr = err
			return
		}
		switch typ {
		case frameRequest:
			req := &pagesvc.StreamPagesRequest{}
			if err := proto.Unmarshal(p, req); err != nil {
				b.readErr = fmt.Errorf("bulk request: %w (%w)", ErrProtocol, err)
				return
			}
			select {
			case b.reqs <- req:
			case <-b.quit:
				return
			case <-b.s.ctx.Done():
				return
			}
		case frameRelease:
			if len(p) != 4 {
				b.readErr = fmt.Errorf("bulk release of %d bytes: %w", len(p), ErrProtocol)
				return
			}
			slot := binary.LittleEndian.Uint32(p)
			b.mu.Lock()
			ok := slot < bulkSlots && b.owned[slot]
			if ok {
				b.owned[slot] = false
			}
			b.mu.Unlock()
			if !ok {
				b.readErr = fmt.Errorf("bulk release of slot %d it does not own: %w", slot, ErrProtocol)
				return
			}
			b.free <- slot // never blocks: at most bulkSlots are out
		default:
			b.readErr = fmt.Errorf("bulk frame type %d from client: %w", typ, ErrProtocol)
			return
		}
	}
}

// writeLoop answers requests until the reader or the server stops.
func (b *bulkSession) writeLoop() {
	for {
		var req *pagesvc.StreamPagesRequest
		select {
		case req = <-b.reqs:
		case <-b.gone:
			return
		case <-b.s.ctx.Done():
			b.end(b.s.fail(b.s.ctx, fmt.Errorf("stream pages: %w", b.s.ctx.Err())))
			return
		}
		err := b.serve(req)
		if err == nil {
			continue
		}
		b.end(err)
		return // after a failed request the client gives up anyway
	}
}

// end sends a request's final status (nil: complete).
func (b *bulkSession) end(err error) error {
	var code uint32
	var msg string
	if err != nil {
		st, _ := status.FromError(toStatus(err))
		code, msg = uint32(st.Code()), st.Message()
		if code == 0 { // never report a failure as success
			code = uint32(codes.Unknown)
		}
		if len(msg) > maxEndFrame-4 {
			msg = msg[:maxEndFrame-4]
		}
	}
	f := appendFrameHeader(make([]byte, 0, frameHeader+4+len(msg)), frameEnd, 4+len(msg))
	f = binary.LittleEndian.AppendUint32(f, code)
	f = append(f, msg...)
	_, werr := b.conn.Write(f)
	return werr
}

// serve streams one request's chunks through the ring.
func (b *bulkSession) serve(req *pagesvc.StreamPagesRequest) error {
	s := b.s
	if err := s.checkToken(req.GetToken()); err != nil {
		return err
	}
	chunk := uint64(req.GetChunkSize())
	if chunk == 0 {
		chunk = DefaultChunkSize
	}
	if chunk > bulkSlotSize || chunk%s.pageSize != 0 {
		return fmt.Errorf("stream pages: chunk size %d: want a page multiple up to %d: %w", chunk, bulkSlotSize, ErrBadRequest)
	}
	if _, err := s.checkRanges(req.GetRanges(), ^uint64(0)); err != nil {
		return fmt.Errorf("stream pages: %w", err)
	}
	if b.ring == nil {
		if err := b.setup(); err != nil {
			return err
		}
	}
	ctx := s.ctx
	var f [frameHeader + 16]byte
	for _, r := range req.GetRanges() {
		for off := uint64(0); off < r.GetLength(); {
			// Stop before the next chunk as soon as the server stops or
			// the client hangs up; the select below picks at random
			// among ready cases, so it alone would go on reading pages
			// while slots are free.
			if err := ctx.Err(); err != nil {
				return s.fail(ctx, fmt.Errorf("stream pages: %w", err))
			}
			select {
			case <-b.gone:
				return fmt.Errorf("stream pages: client hung up: %w", ErrClosed)
			default:
			}
			var slot uint32
			select {
			case slot = <-b.free:
			case <-b.gone:
				return fmt.Errorf("stream pages: client hung up: %w", ErrClosed)
			case <-ctx.Done():
				return s.fail(ctx, fmt.Errorf("stream pages: %w", ctx.Err()))
			}
			n := min(chunk, r.GetLength()-off)
			addr := r.GetAddr() + off
			at := uint64(slot) * bulkSlotSize
			if err := s.read(ctx, req.GetProcess(), addr, b.ring[at:at+n]); err != nil {
				return s.fail(ctx, fmt.Errorf("stream pages: %w", err))
			}
			b.mu.Lock()
			b.owned[slot] = true
			b.mu.Unlock()
			h := appendFrameHeader(f[:0], frameChunk, 16)
			h = binary.LittleEndian.AppendUint32(h, slot)
			h = binary.LittleEndian.AppendUint64(h, addr)
			h = binary.LittleEndian.AppendUint32(h, uint32(n))
			if _, err := b.conn.Write(h); err != nil {
				return fmt.Errorf("stream pages: send chunk %#x: %w", addr, err)
			}
			off += n
		}
	}
	return b.end(nil)
}

// setup creates the ring, sends it to the client and frees every slot.
func (b *bulkSession) setup() error {
	size := bulkSlots * bulkSlotSize
	fd, ring, err := newRing(size)
	if err != nil {
		return fmt.Errorf("stream pages: %w", err)
	}
	defer unix.Close(fd)
	b.ring = ring
	f := appendFrameHeader(nil, frameSetup, 8)
	f = binary.LittleEndian.AppendUint32(f, bulkSlots)
	f = binary.LittleEndian.AppendUint32(f, bulkSlotSize)
	if _, _, err := b.conn.WriteMsgUnix(f, unix.UnixRights(fd), nil); err != nil {
		return fmt.Errorf("stream pages: send ring: %w", err)
	}
	for i := range uint32(bulkSlots) {
		b.free <- i
	}
	return nil
}

// ringSeals are the seals of a ring's memfd: its size is fixed (no SIGBUS
// in the client's mapping) and nobody can map it writable again.
const ringSeals = unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_FUTURE_WRITE | unix.F_SEAL_SEAL

// newRing creates a sealed memfd of size bytes, allocated up front so that
// neither side takes a page fault per 4 KiB on first use, and maps it
// writable. The caller owns fd and the mapping.
//
// The seals go on after the writable mapping: F_SEAL_FUTURE_WRITE refuses
// new writable mappings (the client's) but keeps existing ones (ours).
func newRing(size int) (int, []byte, error) {
	fd, err := unix.MemfdCreate("cowmig-pages", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return -1, nil, fmt.Errorf("memfd_create: %w", err)
	}
	if err := unix.Fallocate(fd, 0, 0, int64(size)); err != nil {
		unix.Close(fd)
		return -1, nil, fmt.Errorf("allocate ring of %d bytes: %w", size, err)
	}
	ring, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		unix.Close(fd)
		return -1, nil, fmt.Errorf("map ring: %w", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, ringSeals); err != nil {
		unix.Munmap(ring)
		unix.Close(fd)
		return -1, nil, fmt.Errorf("seal ring: %w", err)
	}
	return fd, ring, nil
}

// sniffBulk reads the first bytes of a unix connection. A bulk connection
// is served here and reported as done; for any other the bytes read are
// returned for ttrpc to see first.
func (s *Server) sniffBulk(uc *net.UnixConn) (prefix []byte, done bool, err error) {
	var p [len(bulkMagic)]byte
	n, err := io.ReadFull(uc, p[:])
	if err != nil || p != bulkMagic {
		return p[:n], false, err
	}
	if !s.beginBulk() {
		return nil, true, nil // stopping: the caller closes uc
	}
	defer s.bulkSessions.Done()
	s.serveBulk(uc)
	return nil, true, nil
}

// beginBulk counts a bulk session in s.bulkSessions unless the server is
// stopping. Shutdown and Close set stopping before they pass through mu,
// so a session either is counted before they wait or does not start.
func (s *Server) beginBulk() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping.Load() {
		return false
	}
	s.bulkSessions.Add(1)
	return true
}
