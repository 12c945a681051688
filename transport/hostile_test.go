package transport

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	pagesvc "github.com/cowmig/cowmig/transport/pagesvc/v1"
)

// This file checks the client against hostile or outdated servers, and the
// server against clients that misbehave before they are authenticated.

// chunkServer is a ttrpc page server whose StreamPages answers every
// request with one chunk of size bytes at the first range's address.
type chunkServer struct {
	pagesvc.PagesService
	size int
}

func (s chunkServer) Open(ctx context.Context, req *pagesvc.OpenRequest) (*pagesvc.OpenResponse, error) {
	return &pagesvc.OpenResponse{ProtocolVersion: ProtocolVersion}, nil
}

func (s chunkServer) StreamPages(ctx context.Context, req *pagesvc.StreamPagesRequest, ss pagesvc.Pages_StreamPagesServer) error {
	return ss.Send(&pagesvc.PageChunk{Addr: req.GetRanges()[0].GetAddr(), Data: make([]byte, s.size)})
}

func (s chunkServer) Close(ctx context.Context, req *pagesvc.CloseRequest) (*pagesvc.CloseResponse, error) {
	return &pagesvc.CloseResponse{Ack: true}, nil
}

// TestStreamRejectsBadChunks: a (TCP) server sending a chunk above the
// requested size, or of a partial page, breaks the protocol; StreamHeld
// used to slice its MaxChunkSize buffers with such a chunk's length and
// panic.
func TestStreamRejectsBadChunks(t *testing.T) {
	for _, size := range []int{3 << 20, DefaultChunkSize + pageSz, pageSz + 100} {
		srv, err := ttrpc.NewServer()
		if err != nil {
			t.Fatal(err)
		}
		pagesvc.RegisterPagesService(srv, chunkServer{size: size})
		l, err := Listen("tcp:127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go srv.Serve(context.Background(), l)
		t.Cleanup(func() { srv.Close() })
		c, err := Dial(context.Background(), "tcp:"+l.Addr().String(), make([]byte, 32), "client", nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		ranges := []Range{{testBase, 8 << 20}}
		called := false
		err = c.StreamHeld(context.Background(), 1, ranges, DefaultChunkSize, func(uint64, []byte, func()) error {
			called = true
			return nil
		})
		if !errors.Is(err, ErrProtocol) || called {
			t.Errorf("StreamHeld, chunk of %d bytes: %v (fn called: %v), want ErrProtocol", size, err, called)
		}
		err = c.Stream(context.Background(), 1, ranges, DefaultChunkSize, func(uint64, []byte) error {
			called = true
			return nil
		})
		if !errors.Is(err, ErrProtocol) || called {
			t.Errorf("Stream, chunk of %d bytes: %v (fn called: %v), want ErrProtocol", size, err, called)
		}
	}
}

// hostile is a bulkConn whose server end the test writes by hand.
type hostile struct {
	b   *bulkConn
	srv *net.UnixConn
}

func newHostile(t *testing.T) *hostile {
	t.Helper()
	requireRing(t)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	h := &hostile{srv: conn(fds[1])}
	h.b = &bulkConn{conn: conn(fds[0]), rbuf: make([]byte, 0, 4096), oob: make([]byte, unix.CmsgSpace(4*4))}
	t.Cleanup(func() {
		h.srv.Close()
		h.b.conn.Close()
		for _, fd := range h.b.fds {
			unix.Close(fd)
		}
		if h.b.ring != nil {
			h.b.ring.unref()
		}
	})
	return h
}

// send writes frame f with descriptors fds.
func (h *hostile) send(t *testing.T, f []byte, fds ...int) {
	t.Helper()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := h.srv.WriteMsgUnix(f, oob, nil); err != nil {
		t.Fatal(err)
	}
}

func setupFrame(slots, size uint32) []byte {
	f := appendFrameHeader(nil, frameSetup, 8)
	f = binary.LittleEndian.AppendUint32(f, slots)
	return binary.LittleEndian.AppendUint32(f, size)
}

func chunkFrame(slot uint32, addr uint64, n uint32) []byte {
	f := appendFrameHeader(nil, frameChunk, 16)
	f = binary.LittleEndian.AppendUint32(f, slot)
	f = binary.LittleEndian.AppendUint64(f, addr)
	return binary.LittleEndian.AppendUint32(f, n)
}

func endFrame() []byte {
	return binary.LittleEndian.AppendUint32(appendFrameHeader(nil, frameEnd, 4), 0)
}

// testRing returns a memfd of size bytes with seals, whose first slot
// holds content (written through a mapping made before sealing).
func testRing(t *testing.T, size int64, seals int, content []byte) int {
	t.Helper()
	fd, err := unix.MemfdCreate("test-ring", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Fatal(err)
	}
	if len(content) > 0 {
		if _, err := unix.Pwrite(fd, content, 0); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, seals); err != nil {
		t.Fatal(err)
	}
	return fd
}

// consume runs the client's consume on one window of n bytes at testBase
// with chunks of chunk bytes; fn keeps every chunk (never releases).
func (h *hostile) consume(t *testing.T, n uint64, chunk int) ([]byte, error) {
	t.Helper()
	w := batch{ranges: []*pagesvc.Range{{Addr: testBase, Length: n}}, bytes: n}
	var got []byte
	var releases []func()
	t.Cleanup(func() {
		for _, r := range releases {
			r()
		}
	})
	err := h.b.consume(context.Background(), w, chunk, func(addr uint64, data []byte, release func()) error {
		got = append(got, data...)
		releases = append(releases, release)
		return nil
	})
	return got, err
}

// openFds counts this process's open descriptors.
func openFds(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestBulkHostileServer feeds the client's consume frames a hostile server
// could send: each must end the stream with ErrProtocol, and descriptors
// outside the setup frame must be closed at once.
func TestBulkHostileServer(t *testing.T) {
	const slots, size = 4, DefaultChunkSize
	ringSize := int64(slots * size)
	content := pattern(1, pageSz)

	t.Run("valid", func(t *testing.T) {
		// The harness itself: a well-behaved server is accepted.
		h := newHostile(t)
		h.send(t, setupFrame(slots, size), testRing(t, ringSize, ringSeals, content))
		h.send(t, chunkFrame(0, testBase, pageSz))
		h.send(t, endFrame())
		got, err := h.consume(t, pageSz, size)
		if err != nil || !bytes.Equal(got, content) {
			t.Fatalf("valid stream: %v, content equal: %v", err, bytes.Equal(got, content))
		}
	})

	cases := []struct {
		name  string
		send  func(t *testing.T, h *hostile)
		n     uint64 // window bytes
		chunk int
	}{
		{name: "no future-write seal", send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(slots, size), testRing(t, ringSize, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW, nil))
		}},
		{name: "no shrink seal", send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(slots, size), testRing(t, ringSize, unix.F_SEAL_FUTURE_WRITE|unix.F_SEAL_GROW, nil))
		}},
		{name: "short file", send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(slots, size), testRing(t, ringSize-pageSz, ringSeals, nil))
		}},
		{name: "not a memfd", send: func(t *testing.T, h *hostile) {
			f, err := os.Open("/proc/self/exe")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			h.send(t, setupFrame(slots, size), int(f.Fd()))
		}},
		{name: "slots overflow", send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(^uint32(0), ^uint32(0)&^(pageSz-1)), testRing(t, ringSize, ringSeals, nil))
		}},
		{name: "too many slots", chunk: pageSz, send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(maxRingSlots+1, pageSz), testRing(t, (maxRingSlots+1)*pageSz, ringSeals, nil))
		}},
		{name: "slot above chunk size limit", chunk: pageSz, send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(1, 2*MaxChunkSize), testRing(t, 2*MaxChunkSize, ringSeals, nil))
		}},
		{name: "slot out of range", send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(slots, size), testRing(t, ringSize, ringSeals, nil))
			h.send(t, chunkFrame(slots, testBase, pageSz))
		}},
		{name: "slot handed out twice", n: 2 * pageSz, send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(slots, size), testRing(t, ringSize, ringSeals, nil))
			h.send(t, chunkFrame(1, testBase, pageSz))
			h.send(t, chunkFrame(1, testBase+pageSz, pageSz))
		}},
		{name: "chunk before setup", send: func(t *testing.T, h *hostile) {
			h.send(t, chunkFrame(0, testBase, pageSz))
		}},
		{name: "partial page", send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(slots, size), testRing(t, ringSize, ringSeals, nil))
			h.send(t, chunkFrame(0, testBase, 100))
		}},
		{name: "chunk above chunk size", n: 4 * pageSz, chunk: 2 * pageSz, send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(slots, size), testRing(t, ringSize, ringSeals, nil))
			h.send(t, chunkFrame(0, testBase, 4*pageSz))
		}},
		{name: "oversized frame", send: func(t *testing.T, h *hostile) {
			h.send(t, appendFrameHeader(nil, frameChunk, 4<<20))
		}},
		{name: "two descriptors on setup", send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(slots, size), testRing(t, ringSize, ringSeals, nil), testRing(t, ringSize, ringSeals, nil))
		}},
		{name: "descriptor on an end frame", send: func(t *testing.T, h *hostile) {
			h.send(t, endFrame(), testRing(t, ringSize, ringSeals, nil))
		}},
		{name: "descriptor after setup", send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(slots, size), testRing(t, ringSize, ringSeals, nil))
			h.send(t, chunkFrame(0, testBase, pageSz), testRing(t, ringSize, ringSeals, nil))
		}},
		{name: "descriptors on every byte", send: func(t *testing.T, h *hostile) {
			// An incomplete frame whose bytes each carry a descriptor:
			// the client must not collect them while it waits.
			f := setupFrame(slots, size)
			for i := range 3 {
				h.send(t, f[i:i+1], testRing(t, pageSz, ringSeals, nil))
			}
		}},
		{name: "second setup", send: func(t *testing.T, h *hostile) {
			h.send(t, setupFrame(slots, size), testRing(t, ringSize, ringSeals, nil))
			h.send(t, setupFrame(slots, size))
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newHostile(t)
			tc.send(t, h)
			// A client that accepted the frames sees EOF next, not a hang.
			if err := h.srv.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			// Descriptors the client received must be closed by the
			// time consume refused the stream.
			before := openFds(t)
			n, chunk := tc.n, tc.chunk
			if n == 0 {
				n = pageSz
			}
			if chunk == 0 {
				chunk = size
			}
			_, err := h.consume(t, n, chunk)
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("consume: %v, want ErrProtocol", err)
			}
			if len(h.b.fds) != 0 {
				t.Errorf("%d descriptors still held after the stream was refused", len(h.b.fds))
			}
			if after := openFds(t); after > before {
				t.Errorf("%d descriptors before consume, %d after: received ones leaked", before, after)
			}
		})
	}
}

// TestBulkRingNotTmpfs: a sealed memfd on hugetlbfs is not a ring.
func TestBulkRingNotTmpfs(t *testing.T) {
	fd, err := unix.MemfdCreate("huge", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING|unix.MFD_HUGETLB)
	if err != nil {
		t.Skipf("hugetlb memfd: %v", err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, MaxChunkSize); err != nil {
		t.Skipf("hugetlb memfd size: %v", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, ringSeals); err != nil {
		t.Skipf("hugetlb memfd seals: %v", err)
	}
	if r, err := mapRing(fd, 1, MaxChunkSize); !errors.Is(err, ErrProtocol) {
		if r != nil {
			r.unref()
		}
		t.Fatalf("mapRing of a hugetlbfs memfd: %v, want ErrProtocol", err)
	}
}

// TestBulkBadTokenPipelined: requests pipelined after a refused one must
// not keep the session's reader (and the session) alive.
func TestBulkBadTokenPipelined(t *testing.T) {
	requireRing(t)
	src := newMemSource(map[uint32]int{1: 1 << 20})
	ts := startServer(t, src, unixAddr(t), nil)
	base := runtime.NumGoroutine()
	one := []*pagesvc.Range{{Addr: testBase, Length: pageSz}}
	bad := &pagesvc.StreamPagesRequest{Token: []byte("wrong-token-0123456789"), Process: 1, Ranges: one}
	const conns, pipelined = 50, 8
	p, err := proto.Marshal(bad)
	if err != nil {
		t.Fatal(err)
	}
	var reqs []byte
	for range pipelined {
		reqs = append(appendFrameHeader(reqs, frameRequest, len(p)), p...)
	}
	for range conns {
		c := bulkDial(t, ts)
		// One write: the server hangs up after the first refusal.
		if _, err := c.Write(reqs); err != nil {
			t.Fatal(err)
		}
		// The refusal: the session is running (counted) and its
		// writer has returned.
		if typ, _, _ := recvFrame(t, c); typ != frameEnd {
			t.Fatalf("frame %d, want the refusal", typ)
		}
	}
	ended := make(chan struct{})
	go func() {
		ts.srv.bulkSessions.Wait()
		close(ended)
	}()
	select {
	case <-ended:
	case <-time.After(10 * time.Second):
		t.Fatal("bulk sessions of refused clients still running 10s after the refusal (server not stopped)")
	}
	// ttrpc's goroutines for the connections end once it sees their EOF.
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > base+2 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > base+2 {
		t.Fatalf("%d goroutines, %d before the %d connections", n, base, conns)
	}
}

// startOldServer serves src as a server from before the bulk stream.
func startOldServer(t *testing.T, src PageSource) *testServer {
	t.Helper()
	tok, err := NewToken()
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(src, ServerConfig{Token: tok, SnapshotID: "snap-old"})
	if err != nil {
		t.Fatal(err)
	}
	srv.noBulk = true
	addr := unixAddr(t)
	l, err := Listen(addr)
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{srv: srv, addr: addr, token: tok, served: make(chan error, 1)}
	go func() { ts.served <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-ts.served; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return ts
}

// TestBulkVersionSkew: against a server that does not offer the bulk
// stream, the client streams over ttrpc; forced to send the bulk magic
// anyway, it fails after bulkSetupTimeout instead of hanging.
func TestBulkVersionSkew(t *testing.T) {
	const size = 4 << 20
	src := newMemSource(map[uint32]int{1: size})
	ts := startOldServer(t, src)
	c := ts.dial(t, "client-old", nil)
	if c.bulkOffered {
		t.Fatal("a server without the bulk stream offered it")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ranges := []Range{{testBase, size}}
	got := make([]byte, size)
	if err := c.Stream(ctx, 1, ranges, 0, collect(t, ranges, got, DefaultChunkSize)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, src.want(1, ranges)) {
		t.Fatal("streamed content differs")
	}

	c.bulkOffered, c.bulkSetupTimeout = true, 200*time.Millisecond
	err := c.Stream(ctx, 1, ranges, 0, func(uint64, []byte) error { return nil })
	if !errors.Is(err, ErrProtocol) || ctx.Err() != nil {
		t.Fatalf("bulk stream to an old server: %v (ctx: %v), want ErrProtocol after the setup timeout", err, ctx.Err())
	}

	// A current server offers it.
	ts2 := startServer(t, src, unixAddr(t), nil)
	if c2 := ts2.dial(t, "client-new", nil); !c2.bulkOffered {
		t.Fatal("the server did not offer the bulk stream")
	}
}

// stallSource blocks every page read until its context ends, and records
// when the last read returned.
type stallSource struct {
	*memSource
	entered chan struct{}
	once    sync.Once
	active  atomic.Int32
}

func (s *stallSource) ReadPages(ctx context.Context, proc uint32, addr uint64, buf []byte) error {
	s.active.Add(1)
	defer s.active.Add(-1)
	s.once.Do(func() { close(s.entered) })
	<-ctx.Done()
	return ctx.Err()
}

// TestShutdownWaitsForBulk: Shutdown returns only after the bulk sessions
// ended: no page read runs and no ring is mapped after it.
func TestShutdownWaitsForBulk(t *testing.T) {
	requireRing(t)
	for _, stop := range []string{"shutdown", "close"} {
		t.Run(stop, func(t *testing.T) {
			src := &stallSource{memSource: newMemSource(map[uint32]int{1: 1 << 20}), entered: make(chan struct{})}
			tok, err := NewToken()
			if err != nil {
				t.Fatal(err)
			}
			srv, err := NewServer(src, ServerConfig{Token: tok})
			if err != nil {
				t.Fatal(err)
			}
			addr := unixAddr(t)
			l, err := Listen(addr)
			if err != nil {
				t.Fatal(err)
			}
			served := make(chan error, 1)
			go func() { served <- srv.Serve(l) }()
			ts := &testServer{srv: srv, addr: addr, token: tok}
			c := bulkDial(t, ts)
			sendRequest(t, c, &pagesvc.StreamPagesRequest{Token: tok, Process: 1, Ranges: []*pagesvc.Range{{Addr: testBase, Length: pageSz}}})
			<-src.entered
			if stop == "shutdown" {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				if err := srv.Shutdown(ctx); err != nil {
					t.Fatal(err)
				}
			} else if err := srv.Close(); err != nil {
				t.Fatal(err)
			}
			if n := src.active.Load(); n != 0 {
				t.Errorf("%d page reads still running after %s", n, stop)
			}
			// The session's last act is to unmap its ring: still mapped,
			// the session outlived Shutdown (the read above ends earlier,
			// at the release gate, so it alone cannot tell).
			if maps, err := os.ReadFile("/proc/self/maps"); err != nil || strings.Contains(string(maps), "memfd:cowmig-pages") {
				t.Errorf("a bulk session's ring is still mapped after %s (%v)", stop, err)
			}
			if err := <-served; err != nil {
				t.Errorf("serve: %v", err)
			}
		})
	}
}
