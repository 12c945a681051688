package transport

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	pagesvc "github.com/cowmig/cowmig/transport/pagesvc/v1"
)

// TestStreamHeld holds every chunk until the stream has ended, as far as
// the server's ring allows, and checks that no held chunk was overwritten
// by a later one: the server writes a slot only after its release.
func TestStreamHeld(t *testing.T) {
	networks(t, func(t *testing.T, addr string) {
		const size = 64 << 20 // twice the ring
		src := newMemSource(map[uint32]int{1: size})
		ts := startServer(t, src, addr, nil)
		c := ts.dial(t, "client-a", nil)
		ranges := []Range{{testBase, size}}
		type held struct {
			addr    uint64
			data    []byte
			release func()
		}
		var hold []held
		var got int
		check := func(h held) {
			off := h.addr - testBase
			if !bytes.Equal(h.data, src.procs[1][off:off+uint64(len(h.data))]) {
				t.Errorf("held chunk %#x+%#x changed before its release", h.addr, len(h.data))
			}
		}
		err := c.StreamHeld(context.Background(), 1, ranges, MaxChunkSize, func(a uint64, d []byte, release func()) error {
			got += len(d)
			hold = append(hold, held{a, d, release})
			// Keep the ring's last slot free of the oldest chunk
			// only: release it (second, out of order) once the
			// stream would stall.
			if len(hold) == bulkSlots-1 {
				for _, h := range hold {
					check(h)
				}
				hold[1].release()
				hold[0].release()
				hold[1].release() // a second release is a no-op
				hold = hold[2:]
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if got != size {
			t.Fatalf("streamed %d bytes, want %d", got, size)
		}
		// Chunks stay valid after StreamHeld returned, until released.
		for _, h := range hold {
			check(h)
			h.release()
		}
	})
}

// bulkDial opens a raw bulk connection to ts.
func bulkDial(t *testing.T, ts *testServer) *net.UnixConn {
	t.Helper()
	_, path, err := ParseAddr(ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write(bulkMagic[:]); err != nil {
		t.Fatal(err)
	}
	return c.(*net.UnixConn)
}

func sendFrame(t *testing.T, c net.Conn, typ byte, p []byte) {
	t.Helper()
	f := appendFrameHeader(nil, typ, len(p))
	if _, err := c.Write(append(f, p...)); err != nil {
		t.Fatal(err)
	}
}

func sendRequest(t *testing.T, c net.Conn, req *pagesvc.StreamPagesRequest) {
	t.Helper()
	p, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	sendFrame(t, c, frameRequest, p)
}

// recvFrame reads one frame and the descriptors that came with it (closed
// at the end of the test).
func recvFrame(t *testing.T, c *net.UnixConn) (byte, []byte, int) {
	t.Helper()
	b := &bulkConn{conn: c, rbuf: make([]byte, 0, 64), oob: make([]byte, unix.CmsgSpace(16))}
	// Read the header byte by byte so that nothing of the next frame is
	// consumed by this throwaway reader.
	var hdr []byte
	for len(hdr) < frameHeader {
		var one [1]byte
		n, oobn, _, _, err := c.ReadMsgUnix(one[:], b.oob)
		if oobn > 0 {
			if err := b.takeFds(b.oob[:oobn], true); err != nil {
				t.Fatal(err)
			}
		}
		if err != nil {
			t.Fatalf("read frame: %v", err)
		}
		hdr = append(hdr, one[:n]...)
	}
	p := make([]byte, binary.LittleEndian.Uint32(hdr)-1)
	if _, err := io.ReadFull(c, p); err != nil {
		t.Fatal(err)
	}
	for _, fd := range b.fds {
		t.Cleanup(func() { unix.Close(fd) })
	}
	return hdr[4], p, len(b.fds)
}

// TestBulkProtocol drives the bulk protocol by hand: every request's token
// is checked, the ring is handed out only after a valid request and is
// sealed, and a client releasing a slot it does not own is cut off.
func TestBulkProtocol(t *testing.T) {
	requireRing(t)
	const size = 8 << 20
	src := newMemSource(map[uint32]int{1: size})
	ts := startServer(t, src, unixAddr(t), nil)
	one := []*pagesvc.Range{{Addr: testBase, Length: pageSz}}

	// A bad token gets PermissionDenied and no ring.
	c := bulkDial(t, ts)
	sendRequest(t, c, &pagesvc.StreamPagesRequest{Token: []byte("wrong-token-0123456789"), Process: 1, Ranges: one})
	typ, p, nfds := recvFrame(t, c)
	if typ != frameEnd || nfds != 0 || binary.LittleEndian.Uint32(p) != uint32(codes.PermissionDenied) {
		t.Fatalf("bad token: frame %d with %d fds, payload %q", typ, nfds, p)
	}

	// A good request: setup with a sealed ring, the chunk, the end.
	c = bulkDial(t, ts)
	sendRequest(t, c, &pagesvc.StreamPagesRequest{Token: ts.token, Process: 1, Ranges: one})
	typ, p, nfds = recvFrame(t, c)
	if typ != frameSetup || nfds != 1 || len(p) != 8 {
		t.Fatalf("setup: frame %d with %d fds, %d bytes", typ, nfds, len(p))
	}
	typ, p, _ = recvFrame(t, c)
	if typ != frameChunk || binary.LittleEndian.Uint64(p[4:]) != testBase || binary.LittleEndian.Uint32(p[12:]) != pageSz {
		t.Fatalf("chunk: frame %d, payload %x", typ, p)
	}
	slot := binary.LittleEndian.Uint32(p)
	if typ, p, _ = recvFrame(t, c); typ != frameEnd || binary.LittleEndian.Uint32(p) != 0 {
		t.Fatalf("end: frame %d, payload %q", typ, p)
	}
	// The same connection, a later request with a bad token: refused.
	sendRequest(t, c, &pagesvc.StreamPagesRequest{Token: ts.token[1:], Process: 1, Ranges: one})
	if typ, p, _ = recvFrame(t, c); typ != frameEnd || binary.LittleEndian.Uint32(p) != uint32(codes.PermissionDenied) {
		t.Fatalf("second request with a bad token: frame %d, payload %q", typ, p)
	}

	// Releasing a slot twice: the server hangs up.
	c = bulkDial(t, ts)
	sendRequest(t, c, &pagesvc.StreamPagesRequest{Token: ts.token, Process: 1, Ranges: one})
	recvFrame(t, c) // setup
	recvFrame(t, c) // chunk
	recvFrame(t, c) // end
	var rel [4]byte
	binary.LittleEndian.PutUint32(rel[:], slot)
	sendFrame(t, c, frameRelease, rel[:])
	sendFrame(t, c, frameRelease, rel[:])
	// A server that kept the connection would hang the read: bound it.
	if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(c); err != nil && !errors.Is(err, unix.ECONNRESET) {
		t.Fatalf("after a double release: %v, want the connection closed", err)
	}
}

// TestBulkRing checks the ring's seals: the client's mapping can neither
// change size nor become writable.
func TestBulkRing(t *testing.T) {
	requireRing(t)
	fd, ring, err := newRing(bulkSlots * bulkSlotSize)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	defer unix.Munmap(ring)
	if err := unix.Ftruncate(fd, pageSz); !errors.Is(err, unix.EPERM) {
		t.Errorf("shrinking the ring: %v, want EPERM", err)
	}
	if m, err := unix.Mmap(fd, 0, pageSz, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err == nil {
		unix.Munmap(m)
		t.Error("the ring could be mapped writable")
	}
	r, err := mapRing(fd, bulkSlots, bulkSlotSize)
	if err != nil {
		t.Fatal(err)
	}
	copy(ring, "pages")
	if string(r.mem[:5]) != "pages" {
		t.Error("the client's mapping does not see the server's writes")
	}
	r.unref()
}

// requireRing skips when memfd sealing is unavailable.
func requireRing(t *testing.T) {
	fd, err := unix.MemfdCreate("probe", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Skipf("memfd_create: %v", err)
	}
	unix.Close(fd)
}

// TestBulkWindowRanges: a window of many small ranges is cut to
// bulkWindowRanges ranges, whose request frame (with a full-size token and
// the largest addresses) fits the server's maxRequestFrame.
func TestBulkWindowRanges(t *testing.T) {
	const n = 2*bulkWindowRanges + 5
	var ranges []Range
	for i := range uint64(n) {
		ranges = append(ranges, Range{Addr: 1<<63 + 2*i*pageSz, Len: pageSz})
	}
	windows := capRanges(splitRanges(ranges, bulkWindowBytes, pageSz), bulkWindowRanges)
	var seen int
	for _, w := range windows {
		if len(w.ranges) > bulkWindowRanges {
			t.Fatalf("window of %d ranges", len(w.ranges))
		}
		var total uint64
		for _, r := range w.ranges {
			if r.GetAddr() != ranges[seen].Addr || r.GetLength() != ranges[seen].Len {
				t.Fatalf("range %d: %#x+%#x, want %#x+%#x", seen, r.GetAddr(), r.GetLength(), ranges[seen].Addr, ranges[seen].Len)
			}
			total += r.GetLength()
			seen++
		}
		if total != w.bytes {
			t.Fatalf("window of %d bytes says %d", total, w.bytes)
		}
		p, err := proto.Marshal(&pagesvc.StreamPagesRequest{Token: make([]byte, TokenSize), Process: ^uint32(0), Ranges: w.ranges, ChunkSize: MaxChunkSize})
		if err != nil {
			t.Fatal(err)
		}
		if len(p) > maxRequestFrame {
			t.Fatalf("request of %d bytes, the server takes %d", len(p), maxRequestFrame)
		}
	}
	if seen != n || len(windows) != 3 {
		t.Fatalf("%d ranges in %d windows, want %d in 3", seen, len(windows), n)
	}
}
