package transport

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pagesvc "github.com/cowmig/cowmig/transport/pagesvc/v1"
)

func TestParseAddr(t *testing.T) {
	for _, tc := range []struct {
		in, network, address string
		ok                   bool
	}{
		{"unix:/run/p.sock", "unix", "/run/p.sock", true},
		{"/run/p.sock", "unix", "/run/p.sock", true},
		{"tcp:127.0.0.1:7000", "tcp", "127.0.0.1:7000", true},
		{"tcp:[::1]:0", "tcp", "[::1]:0", true},
		{"tcp:localhost", "", "", false},
		{"unix:", "", "", false},
		{"p.sock", "", "", false},
		{"", "", "", false},
		{"udp:1.2.3.4:5", "", "", false},
	} {
		network, address, err := ParseAddr(tc.in)
		if tc.ok != (err == nil) || network != tc.network || address != tc.address {
			t.Errorf("ParseAddr(%q) = %q, %q, %v", tc.in, network, address, err)
		}
		if err != nil && !errors.Is(err, ErrBadAddress) {
			t.Errorf("ParseAddr(%q) error %v does not wrap ErrBadAddress", tc.in, err)
		}
	}
}

func TestListenUnix(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")

	// A stale socket: bound, closed without unlinking.
	old, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	old.SetUnlinkOnClose(false)
	old.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("stale socket missing: %v", err)
	}

	l, err := Listen(path) // bare path form
	if err != nil {
		t.Fatalf("listen over stale socket: %v", err)
	}
	defer l.Close()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want socket 0600", fi.Mode())
	}

	// A live socket is not stolen.
	if _, err := Listen("unix:" + path); !errors.Is(err, ErrBadAddress) {
		t.Errorf("listen over live socket: %v, want ErrBadAddress", err)
	}
	// A regular file is not removed.
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen("unix:" + file); !errors.Is(err, ErrBadAddress) {
		t.Errorf("listen over regular file: %v, want ErrBadAddress", err)
	}
	if _, err := os.Stat(file); err != nil {
		t.Errorf("regular file removed: %v", err)
	}
}

func TestNewToken(t *testing.T) {
	a, err := NewToken()
	if err != nil {
		t.Fatal(err)
	}
	b, err := NewToken()
	if err != nil {
		t.Fatal(err)
	}
	if len(a) != TokenSize || bytes.Equal(a, b) {
		t.Errorf("tokens %x, %x: want two different %d-byte tokens", a, b, TokenSize)
	}
	if _, err := NewServer(newMemSource(nil), ServerConfig{Token: a[:8]}); !errors.Is(err, ErrBadToken) {
		t.Errorf("NewServer with 8-byte token: %v, want ErrBadToken", err)
	}
}

func TestSplitRanges(t *testing.T) {
	const M = 1 << 20
	for _, tc := range []struct {
		name         string
		in           []Range
		limit, chunk uint64
		want         [][]Range
	}{
		{"one page", []Range{{0x1000, pageSz}}, 2 * M, 0, [][]Range{{{0x1000, pageSz}}}},
		{"exact limit", []Range{{0, 2 * M}}, 2 * M, 0, [][]Range{{{0, 2 * M}}}},
		{"limit plus a page", []Range{{0, 2*M + pageSz}}, 2 * M, 0,
			[][]Range{{{0, 2 * M}}, {{2 * M, pageSz}}}},
		{"ranges merged then split", []Range{{0, M}, {4 * M, 3 * M / 2}}, 2 * M, 0,
			[][]Range{{{0, M}, {4 * M, M}}, {{5 * M, M / 2}}}},
		{"chunk bound on small ranges", []Range{{0, pageSz}, {2 * pageSz, pageSz}, {4 * pageSz, pageSz}}, 2 * M, M,
			[][]Range{{{0, pageSz}, {2 * pageSz, pageSz}}, {{4 * pageSz, pageSz}}}},
		{"chunk bound splits a range", []Range{{0, pageSz}, {M, 2 * M}}, 2 * M, M,
			[][]Range{{{0, pageSz}, {M, M}}, {{2 * M, M}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got [][]Range
			for _, b := range splitRanges(tc.in, tc.limit, tc.chunk) {
				var rs []Range
				var n uint64
				for _, r := range b.ranges {
					rs = append(rs, Range{r.GetAddr(), r.GetLength()})
					n += r.GetLength()
				}
				if n != b.bytes {
					t.Errorf("batch bytes %d, ranges sum %d", b.bytes, n)
				}
				got = append(got, rs)
			}
			if !slices.EqualFunc(got, tc.want, func(a, b []Range) bool { return slices.Equal(a, b) }) {
				t.Errorf("got %x, want %x", got, tc.want)
			}
		})
	}
}

// networks runs f against a unix and a tcp server.
func networks(t *testing.T, f func(t *testing.T, addr string)) {
	t.Run("unix", func(t *testing.T) { f(t, unixAddr(t)) })
	// Streams on a unix socket go through shared memory; this variant
	// keeps the StreamPages path tested there too.
	t.Run("unix-rpc", func(t *testing.T) { f(t, unixRPCAddr(t)) })
	t.Run("tcp", func(t *testing.T) { f(t, "tcp:127.0.0.1:0") })
}

func TestGetPages(t *testing.T) {
	networks(t, func(t *testing.T, addr string) {
		const size = 12 << 20
		src := newMemSource(map[uint32]int{1: size, 2: 64 * pageSz})
		ts := startServer(t, src, addr, nil)
		c := ts.dial(t, "client-a", nil)

		procs := c.Processes()
		slices.SortFunc(procs, func(a, b ProcessInfo) int { return int(a.ID) - int(b.ID) })
		if !slices.Equal(procs, []ProcessInfo{{1, size / pageSz}, {2, 64}}) || c.SnapshotID() != "snap-1" {
			t.Fatalf("open: processes %v, snapshot %q", procs, c.SnapshotID())
		}

		for _, tc := range []struct {
			name   string
			proc   uint32
			ranges []Range
		}{
			{"first page", 1, []Range{{testBase, pageSz}}},
			{"last page", 1, []Range{{testBase + size - pageSz, pageSz}}},
			{"other process", 2, []Range{{testBase + pageSz, 2 * pageSz}}},
			{"scattered", 1, []Range{{testBase + 5*pageSz, pageSz}, {testBase, 3 * pageSz}, {testBase + size/2, 7 * pageSz}}},
			{"whole process, split in flight", 1, []Range{{testBase, size}}},
			{"many ranges over the split limit", 1, []Range{{testBase, 3 << 20}, {testBase + (5 << 20), 1 << 20}, {testBase + (8 << 20), 4 << 20}}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				want := src.want(tc.proc, tc.ranges)
				buf := make([]byte, len(want))
				if err := c.GetPages(context.Background(), tc.proc, tc.ranges, buf); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(buf, want) {
					t.Fatal("content differs from the source")
				}
			})
		}

		for _, tc := range []struct {
			name   string
			proc   uint32
			ranges []Range
		}{
			{"unaligned addr", 1, []Range{{testBase + 1, pageSz}}},
			{"unaligned length", 1, []Range{{testBase, 100}}},
			{"empty", 1, []Range{{testBase, 0}}},
			{"beyond the source", 1, []Range{{testBase + size - pageSz, 2 * pageSz}}},
			{"below the source", 1, []Range{{testBase - pageSz, pageSz}}},
			{"beyond, in a later request", 1, []Range{{testBase, 4 << 20}, {testBase + size, 1 << 20}}},
			{"unknown process", 9, []Range{{testBase, pageSz}}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				var n uint64
				for _, r := range tc.ranges {
					n += r.Len
				}
				err := c.GetPages(context.Background(), tc.proc, tc.ranges, make([]byte, n))
				if !errors.Is(err, ErrBadRequest) {
					t.Fatalf("got %v, want ErrBadRequest", err)
				}
			})
		}
		if err := c.GetPages(context.Background(), 1, []Range{{testBase, pageSz}}, make([]byte, 2*pageSz)); !errors.Is(err, ErrBadRequest) {
			t.Errorf("buffer of the wrong size: %v, want ErrBadRequest", err)
		}
	})
}

// TestServerValidates sends requests the Client refuses to build, to check
// that the server enforces the limits itself.
func TestServerValidates(t *testing.T) {
	src := newMemSource(map[uint32]int{1: 8 << 20})
	ts := startServer(t, src, unixAddr(t), nil)
	raw := ts.raw(t)
	ctx := context.Background()
	tok := ts.token

	check := func(name string, err error, want codes.Code) {
		t.Helper()
		if status.Code(err) != want {
			t.Errorf("%s: %v, want %v", name, err, want)
		}
	}
	_, err := raw.GetPages(ctx, &pagesvc.GetPagesRequest{Token: tok, Process: 1,
		Ranges: []*pagesvc.Range{{Addr: testBase, Length: 4 << 20}}})
	check("GetPages of 4 MiB", err, codes.InvalidArgument)
	resp, err := raw.GetPages(ctx, &pagesvc.GetPagesRequest{Token: tok, Process: 1,
		Ranges: []*pagesvc.Range{{Addr: testBase, Length: MaxGetPagesBytes}}})
	check("GetPages of MaxGetPagesBytes", err, codes.OK)
	if err == nil && !bytes.Equal(resp.GetData(), src.procs[1][:MaxGetPagesBytes]) {
		t.Error("GetPages of MaxGetPagesBytes: content differs")
	}
	_, err = raw.GetPages(ctx, &pagesvc.GetPagesRequest{Token: tok, Process: 1,
		Ranges: []*pagesvc.Range{{Addr: testBase, Length: 2 << 20}, {Addr: testBase, Length: 2 << 20}}})
	check("GetPages of 2+2 MiB", err, codes.InvalidArgument)
	_, err = raw.GetPages(ctx, &pagesvc.GetPagesRequest{Token: tok, Process: 1,
		Ranges: []*pagesvc.Range{{Addr: ^uint64(0) - pageSz + 1, Length: 2 * pageSz}}})
	check("GetPages wrapping around", err, codes.InvalidArgument)
	_, err = raw.GetPages(ctx, &pagesvc.GetPagesRequest{Token: tok, Process: 1})
	check("GetPages without ranges", err, codes.InvalidArgument)

	for _, chunk := range []uint32{3 << 20, 1000} {
		st, err := raw.StreamPages(ctx, &pagesvc.StreamPagesRequest{Token: tok, Process: 1, ChunkSize: chunk,
			Ranges: []*pagesvc.Range{{Addr: testBase, Length: pageSz}}})
		if err == nil {
			_, err = st.Recv()
		}
		check("StreamPages with bad chunk size", err, codes.InvalidArgument)
	}

	// The generated decoder reads the in-place encoded stream.
	st, err := raw.StreamPages(ctx, &pagesvc.StreamPagesRequest{Token: tok, Process: 1, ChunkSize: 64 << 10,
		Ranges: []*pagesvc.Range{{Addr: testBase + pageSz, Length: 1 << 20}}})
	if err != nil {
		t.Fatal(err)
	}
	var streamed []byte
	for {
		c, err := st.Recv()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("raw stream: %v", err)
			}
			break
		}
		if c.GetAddr() != testBase+pageSz+uint64(len(streamed)) || len(c.GetData()) != 64<<10 {
			t.Fatalf("raw stream: chunk %#x+%#x after %d bytes", c.GetAddr(), len(c.GetData()), len(streamed))
		}
		streamed = append(streamed, c.GetData()...)
	}
	if !bytes.Equal(streamed, src.procs[1][pageSz:pageSz+1<<20]) {
		t.Error("raw stream: content differs from the source")
	}

	_, err = raw.Open(ctx, &pagesvc.OpenRequest{Token: tok, ProtocolVersion: 2, ClientId: "x"})
	check("Open version 2", err, codes.Unimplemented)
	_, err = raw.Open(ctx, &pagesvc.OpenRequest{Token: tok, ProtocolVersion: ProtocolVersion})
	check("Open without client id", err, codes.InvalidArgument)
	_, err = raw.Done(ctx, &pagesvc.DoneRequest{Token: tok, ClientId: "never-opened", Process: 1})
	check("Done without session", err, codes.InvalidArgument)
	_, err = raw.Close(ctx, &pagesvc.CloseRequest{Token: tok, ClientId: "never-opened"})
	check("Close without session", err, codes.InvalidArgument)
}

func TestStream(t *testing.T) {
	networks(t, func(t *testing.T, addr string) {
		const size = 24 << 20
		src := newMemSource(map[uint32]int{1: size})
		ts := startServer(t, src, addr, nil)
		c := ts.dial(t, "client-a", nil)

		var many []Range // 200 one-page ranges, more chunks than one window holds
		for i := range 200 {
			many = append(many, Range{testBase + uint64(i)*3*pageSz, pageSz})
		}
		for _, tc := range []struct {
			name   string
			ranges []Range
			chunk  int
		}{
			{"one page", []Range{{testBase + pageSz, pageSz}}, 0},
			{"last page, page chunks", []Range{{testBase + size - pageSz, pageSz}}, pageSz},
			{"whole, default chunk", []Range{{testBase, size}}, 0},
			{"whole, max chunk", []Range{{testBase, size}}, MaxChunkSize},
			{"whole, 64 KiB chunks", []Range{{testBase, size}}, 64 << 10},
			{"odd chunk vs range", []Range{{testBase, 5 * pageSz}, {testBase + 7*pageSz, 9 * pageSz}}, 2 * pageSz},
			{"many small ranges", many, 0},
		} {
			t.Run(tc.name, func(t *testing.T) {
				want := src.want(1, tc.ranges)
				got := make([]byte, len(want))
				chunk := tc.chunk
				if chunk == 0 {
					chunk = DefaultChunkSize
				}
				if err := c.Stream(context.Background(), 1, tc.ranges, tc.chunk, collect(t, tc.ranges, got, chunk)); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Fatal("content differs from the source")
				}
			})
		}

		// A cancellable context takes the other receive path.
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		ranges := []Range{{testBase, size}}
		got := make([]byte, size)
		if err := c.Stream(ctx, 1, ranges, 0, collect(t, ranges, got, DefaultChunkSize)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, src.procs[1]) {
			t.Fatal("content differs from the source (cancellable context)")
		}

		for _, tc := range []struct {
			name   string
			proc   uint32
			ranges []Range
			chunk  int
		}{
			{"unaligned", 1, []Range{{testBase + 512, pageSz}}, 0},
			{"beyond the source", 1, []Range{{testBase + size - pageSz, 2 * pageSz}}, 0},
			{"beyond, in a later window", 1, []Range{{testBase, size}, {testBase + size, pageSz}}, 0},
			{"unknown process", 7, []Range{{testBase, pageSz}}, 0},
			{"chunk too big", 1, []Range{{testBase, pageSz}}, 4 << 20},
			{"chunk unaligned", 1, []Range{{testBase, pageSz}}, 1000},
		} {
			t.Run(tc.name, func(t *testing.T) {
				err := c.Stream(context.Background(), tc.proc, tc.ranges, tc.chunk, func(uint64, []byte) error { return nil })
				if !errors.Is(err, ErrBadRequest) {
					t.Fatalf("got %v, want ErrBadRequest", err)
				}
			})
		}

		// The connection stays usable after the failures (abandoned windows
		// were drained).
		buf := make([]byte, pageSz)
		if err := c.GetPages(context.Background(), 1, []Range{{testBase, pageSz}}, buf); err != nil || !bytes.Equal(buf, src.procs[1][:pageSz]) {
			t.Fatalf("GetPages after failed streams: %v", err)
		}
	})
}

// TestConcurrent runs streams of small chunks and GetPages calls at once on
// one connection, so that the server's buffer reuse and the client's windows
// interleave, and checks every byte.
func TestConcurrent(t *testing.T) {
	const size = 16 << 20
	src := newMemSource(map[uint32]int{1: size, 2: size})
	ts := startServer(t, src, unixAddr(t), nil)
	c := ts.dial(t, "client-a", nil)

	errs := make(chan error, 6)
	for i, chunk := range []int{pageSz, 16 << 10, 64 << 10, MaxChunkSize} {
		proc := uint32(1 + i%2)
		go func() {
			ranges := []Range{{testBase, size}}
			got := make([]byte, size)
			if err := c.Stream(context.Background(), proc, ranges, chunk, collect(t, ranges, got, chunk)); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(got, src.procs[proc]) {
				errs <- fmt.Errorf("stream of process %d in %d-byte chunks: content differs", proc, chunk)
				return
			}
			errs <- nil
		}()
	}
	for i := range 2 {
		proc := uint32(1 + i)
		go func() {
			buf := make([]byte, 3*pageSz)
			for off := uint64(0); off+3*pageSz <= size; off += 61 * pageSz {
				r := []Range{{testBase + off, 3 * pageSz}}
				if err := c.GetPages(context.Background(), proc, r, buf); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(buf, src.procs[proc][off:off+3*pageSz]) {
					errs <- fmt.Errorf("GetPages of process %d at %#x: content differs", proc, off)
					return
				}
			}
			errs <- nil
		}()
	}
	for range 6 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

func TestStreamStops(t *testing.T) {
	const size = 32 << 20
	src := newMemSource(map[uint32]int{1: size})
	ts := startServer(t, src, unixAddr(t), nil)
	c := ts.dial(t, "client-a", nil)
	ranges := []Range{{testBase, size}}

	// fn's error is returned as is, after the chunks before it.
	stop := errors.New("enough")
	calls := 0
	err := c.Stream(context.Background(), 1, ranges, 0, func(uint64, []byte) error {
		calls++
		if calls == 3 {
			return stop
		}
		return nil
	})
	if err != stop || calls != 3 {
		t.Fatalf("Stream = %v after %d calls, want %v after 3", err, calls, stop)
	}

	// Cancelling the context stops it with the context's error.
	ctx, cancel := context.WithCancel(context.Background())
	calls = 0
	err = c.Stream(ctx, 1, ranges, 0, func(uint64, []byte) error {
		calls++
		if calls == 2 {
			cancel()
		}
		return nil
	})
	if !errors.Is(err, context.Canceled) || calls != 2 {
		t.Fatalf("Stream = %v after %d calls, want context.Canceled after 2", err, calls)
	}

	// The client still works, and Close (which waits for the drains) returns.
	got := make([]byte, size)
	if err := c.Stream(context.Background(), 1, ranges, 0, collect(t, ranges, got, DefaultChunkSize)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, src.procs[1]) {
		t.Fatal("content differs after stopped streams")
	}
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
}

func TestShutdownMidStream(t *testing.T) {
	const size = 16 << 20
	src := newMemSource(map[uint32]int{1: size})
	blocked := make(chan struct{})
	// The read of the chunk at 8 MiB waits for the server to shut down, so
	// the stream is certainly unfinished when Shutdown starts.
	src.hook = func(ctx context.Context, proc uint32, addr uint64) error {
		if addr == testBase+8<<20 {
			close(blocked)
			<-ctx.Done()
			return ctx.Err()
		}
		return nil
	}
	ts := startServer(t, src, unixAddr(t), nil)
	c := ts.dial(t, "client-a", nil)

	streamErr := make(chan error, 1)
	var got int
	go func() {
		streamErr <- c.Stream(context.Background(), 1, []Range{{testBase, size}}, 0, func(_ uint64, d []byte) error {
			got += len(d)
			return nil
		})
	}()
	<-blocked
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.srv.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	err := <-streamErr
	if err == nil {
		t.Fatalf("Stream succeeded after shutdown (%d of %d bytes)", got, size)
	}
	if !errors.Is(err, ErrClosed) {
		t.Errorf("Stream = %v, want ErrClosed", err)
	}
	if got >= size {
		t.Errorf("Stream delivered %d bytes of %d", got, size)
	}
	if err := <-ts.served; err != nil {
		t.Errorf("serve: %v", err)
	}
	ts.served <- nil // for the cleanup's Shutdown
	if _, err := Dial(context.Background(), ts.addr, ts.token, "late", nil); err == nil {
		t.Error("dial after shutdown succeeded")
	}
}

func TestRelease(t *testing.T) {
	src := newMemSource(map[uint32]int{1: 1 << 20})
	ts := startServer(t, src, unixAddr(t), nil)
	a := ts.dial(t, "client-a", nil)
	b := ts.dial(t, "client-b", nil)

	buf := make([]byte, pageSz)
	if err := b.GetPages(context.Background(), 1, []Range{{testBase, pageSz}}, buf); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(context.Background()); err != nil {
		t.Fatalf("release: %v", err)
	}
	select {
	case <-src.releaseCh:
	default:
		t.Fatal("Release returned before the source's Release ran")
	}
	<-ts.srv.Released()

	if err := b.GetPages(context.Background(), 1, []Range{{testBase, pageSz}}, buf); !errors.Is(err, ErrClosed) {
		t.Errorf("GetPages after release: %v, want ErrClosed", err)
	}
	err := b.Stream(context.Background(), 1, []Range{{testBase, pageSz}}, 0, func(uint64, []byte) error { return nil })
	if !errors.Is(err, ErrClosed) {
		t.Errorf("Stream after release: %v, want ErrClosed", err)
	}
	if _, err := Dial(context.Background(), ts.addr, ts.token, "client-c", nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Dial after release: %v, want ErrClosed", err)
	}
	if err := b.Release(context.Background()); err != nil {
		t.Errorf("second release: %v", err)
	}
	src.mu.Lock()
	n := src.readAfterRelease
	src.mu.Unlock()
	if n != 0 {
		t.Errorf("%d reads reached the source after Release", n)
	}
}

func TestDoneAndClose(t *testing.T) {
	src := newMemSource(map[uint32]int{1: 1 << 20, 2: 1 << 20})
	ts := startServer(t, src, unixAddr(t), nil)
	c := ts.dial(t, "client-a", nil)
	ctx := context.Background()

	for _, p := range []uint32{1, 1, 2} { // Done twice for 1: counted once
		if err := c.Done(ctx, p); err != nil {
			t.Fatalf("done %d: %v", p, err)
		}
	}
	if err := c.Done(ctx, 3); !errors.Is(err, ErrBadRequest) {
		t.Errorf("done for unknown process: %v, want ErrBadRequest", err)
	}
	if got := src.doneCalls(); !slices.Equal(got, []string{"client-a/1", "client-a/2"}) {
		t.Errorf("ClientDone calls %q", got)
	}

	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
	// The session is gone on the server …
	_, err := ts.raw(t).Done(ctx, &pagesvc.DoneRequest{Token: ts.token, ClientId: "client-a", Process: 1})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("Done after Close: %v, want InvalidArgument", err)
	}
	// … and the client refuses further use.
	if err := c.GetPages(ctx, 1, []Range{{testBase, pageSz}}, make([]byte, pageSz)); !errors.Is(err, ErrClosed) {
		t.Errorf("GetPages after close: %v, want ErrClosed", err)
	}
	if err := c.Stream(ctx, 1, []Range{{testBase, pageSz}}, 0, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Stream after close: %v, want ErrClosed", err)
	}
}

// TestBadToken sends every RPC with a wrong token, through the Client and
// raw, and checks each is refused with PermissionDenied / ErrBadToken.
func TestBadToken(t *testing.T) {
	src := newMemSource(map[uint32]int{1: 1 << 20})
	ts := startServer(t, src, unixAddr(t), nil)
	ctx := context.Background()
	bad := bytes.Clone(ts.token)
	bad[0] ^= 1

	if _, err := Dial(ctx, ts.addr, bad, "intruder", nil); !errors.Is(err, ErrBadToken) || status.Code(err) != codes.PermissionDenied {
		t.Errorf("Dial with a bad token: %v, want ErrBadToken", err)
	}
	if _, err := Dial(ctx, ts.addr, nil, "intruder", nil); !errors.Is(err, ErrBadToken) {
		t.Errorf("Dial without token: %v, want ErrBadToken", err)
	}

	c := ts.dial(t, "client-a", nil)
	c.token = bad // the session was opened with the right one
	rs := []Range{{testBase, pageSz}}
	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"GetPages", func() error { return c.GetPages(ctx, 1, rs, make([]byte, pageSz)) }},
		{"Stream", func() error {
			return c.Stream(ctx, 1, rs, 0, func(uint64, []byte) error { return errors.New("data with a bad token") })
		}},
		{"Done", func() error { return c.Done(ctx, 1) }},
		{"Release", func() error { return c.Release(ctx) }},
		{"Close", c.Close}, // last: it closes the client
	} {
		if err := tc.call(); !errors.Is(err, ErrBadToken) || status.Code(err) != codes.PermissionDenied {
			t.Errorf("%s with a bad token: %v, want ErrBadToken and PermissionDenied", tc.name, err)
		}
	}

	raw := ts.raw(t)
	_, err := raw.Open(ctx, &pagesvc.OpenRequest{Token: bad, ProtocolVersion: ProtocolVersion, ClientId: "x"})
	check := func(name string, err error) {
		t.Helper()
		if status.Code(err) != codes.PermissionDenied {
			t.Errorf("raw %s with a bad token: %v, want PermissionDenied", name, err)
		}
	}
	check("Open", err)
	_, err = raw.GetPages(ctx, &pagesvc.GetPagesRequest{Token: bad, Process: 1, Ranges: []*pagesvc.Range{{Addr: testBase, Length: pageSz}}})
	check("GetPages", err)
	st, err := raw.StreamPages(ctx, &pagesvc.StreamPagesRequest{Token: bad, Process: 1, Ranges: []*pagesvc.Range{{Addr: testBase, Length: pageSz}}})
	if err == nil {
		_, err = st.Recv()
	}
	check("StreamPages", err)
	_, err = raw.Done(ctx, &pagesvc.DoneRequest{Token: bad, ClientId: "client-a", Process: 1})
	check("Done", err)
	_, err = raw.Release(ctx, &pagesvc.ReleaseRequest{Token: bad})
	check("Release", err)
	_, err = raw.Close(ctx, &pagesvc.CloseRequest{Token: bad, ClientId: "client-a"})
	check("Close", err)

	select {
	case <-src.releaseCh:
		t.Error("a Release with a bad token released the snapshot")
	default:
	}
	if got := src.doneCalls(); len(got) != 0 {
		t.Errorf("Done with a bad token reached the source: %q", got)
	}
}

func TestTLS(t *testing.T) {
	pki := newTestPKI(t)
	src := newMemSource(map[uint32]int{1: 4 << 20})
	ts := startServer(t, src, "tcp:127.0.0.1:0", pki.serverConfig())
	ctx := context.Background()

	c := ts.dial(t, "client-tls", pki.clientConfig())
	ranges := []Range{{testBase, 4 << 20}}
	buf := make([]byte, 4<<20)
	if err := c.GetPages(ctx, 1, ranges, buf); err != nil || !bytes.Equal(buf, src.procs[1]) {
		t.Fatalf("GetPages over TLS: %v (content equal: %v)", err, bytes.Equal(buf, src.procs[1]))
	}
	got := make([]byte, 4<<20)
	if err := c.Stream(ctx, 1, ranges, 0, collect(t, ranges, got, DefaultChunkSize)); err != nil || !bytes.Equal(got, src.procs[1]) {
		t.Fatalf("Stream over TLS: %v", err)
	}

	// Without the CA the certificate does not verify.
	noCA := &tls.Config{MinVersion: tls.VersionTLS13}
	_, err := Dial(ctx, ts.addr, ts.token, "no-ca", noCA)
	var unknown x509.UnknownAuthorityError
	if !errors.As(err, &unknown) {
		t.Errorf("Dial without the CA: %v, want x509.UnknownAuthorityError", err)
	}
	// A plaintext client cannot talk to a TLS server.
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := Dial(dctx, ts.addr, ts.token, "plain", nil); err == nil {
		t.Error("plaintext Dial to a TLS server succeeded")
	}
}
