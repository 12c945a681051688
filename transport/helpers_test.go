package transport

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/ttrpc"

	pagesvc "github.com/cowmig/cowmig/transport/pagesvc/v1"
)

const (
	testBase = 0x7f0000000000 // address of the first byte of every test process
	pageSz   = 4096
)

// memSource is an in-memory PageSource: each process is one contiguous
// mapping at testBase filled with a pattern unique to the process.
type memSource struct {
	procs map[uint32][]byte

	// hook, when set, runs before each read (tests use it to block or
	// observe reads).
	hook func(ctx context.Context, proc uint32, addr uint64) error

	mu       sync.Mutex
	done     []string // "client/proc" per ClientDone call; guarded by mu
	released bool     // guarded by mu
	// readAfterRelease counts reads that reached the source after Release;
	// the server promises there are none. Guarded by mu.
	readAfterRelease int
	releaseCh        chan struct{}
}

func newMemSource(sizes map[uint32]int) *memSource {
	m := &memSource{procs: make(map[uint32][]byte), releaseCh: make(chan struct{})}
	for id, n := range sizes {
		m.procs[id] = pattern(id, n)
	}
	return m
}

// pattern returns n bytes whose every 8-byte word encodes (proc, offset), so a
// misplaced page never compares equal.
func pattern(proc uint32, n int) []byte {
	b := make([]byte, n)
	for off := 0; off+8 <= n; off += 8 {
		v := uint64(proc)<<48 ^ uint64(off)*0x9e3779b97f4a7c15
		for i := range 8 {
			b[off+i] = byte(v >> (8 * i))
		}
	}
	return b
}

func (m *memSource) Processes() []ProcessInfo {
	var out []ProcessInfo
	for id, mem := range m.procs {
		out = append(out, ProcessInfo{ID: id, PagesTotal: uint64(len(mem)) / pageSz})
	}
	return out
}

func (m *memSource) ReadPages(ctx context.Context, proc uint32, addr uint64, buf []byte) error {
	m.mu.Lock()
	if m.released {
		m.readAfterRelease++
	}
	m.mu.Unlock()
	if m.hook != nil {
		if err := m.hook(ctx, proc, addr); err != nil {
			return err
		}
	}
	mem, ok := m.procs[proc]
	if !ok {
		return fmt.Errorf("process %d: %w", proc, ErrBadRequest)
	}
	if addr%pageSz != 0 || len(buf)%pageSz != 0 {
		return fmt.Errorf("%#x+%#x unaligned: %w", addr, len(buf), ErrBadRequest)
	}
	if addr < testBase || addr-testBase+uint64(len(buf)) > uint64(len(mem)) {
		return fmt.Errorf("%#x+%#x outside the snapshot: %w", addr, len(buf), ErrBadRequest)
	}
	copy(buf, mem[addr-testBase:])
	return nil
}

func (m *memSource) ClientDone(clientID string, proc uint32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.done = append(m.done, fmt.Sprintf("%s/%d", clientID, proc))
}

func (m *memSource) Release() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.released {
		m.released = true
		close(m.releaseCh)
	}
}

func (m *memSource) doneCalls() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.done...)
}

// want returns the expected concatenation of ranges of proc.
func (m *memSource) want(proc uint32, ranges []Range) []byte {
	var out []byte
	for _, r := range ranges {
		off := r.Addr - testBase
		out = append(out, m.procs[proc][off:off+r.Len]...)
	}
	return out
}

// testServer is a running server plus what a test needs to reach it.
type testServer struct {
	srv    *Server
	addr   string
	token  []byte
	served chan error // Serve's result
}

// unixAddr returns a fresh unix socket address in t's temp dir.
func unixAddr(t testing.TB) string {
	return "unix:" + filepath.Join(t.TempDir(), "pages.sock")
}

// rpcSocketName names the unix sockets of unixRPCAddr.
const rpcSocketName = "pages-rpc.sock"

// unixRPCAddr is unixAddr for a test whose clients stream over ttrpc, not
// shared memory (ts.dial sees the name).
func unixRPCAddr(t testing.TB) string {
	return "unix:" + filepath.Join(t.TempDir(), rpcSocketName)
}

// startServer serves src at addr ("unix:…" or "tcp:127.0.0.1:0") and stops
// the server when the test ends.
func startServer(t testing.TB, src PageSource, addr string, tlsCfg *tls.Config) *testServer {
	t.Helper()
	tok, err := NewToken()
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(src, ServerConfig{Token: tok, SnapshotID: "snap-1", TLS: tlsCfg})
	if err != nil {
		t.Fatal(err)
	}
	l, err := Listen(addr)
	if err != nil {
		t.Fatal(err)
	}
	if l.Addr().Network() == "tcp" {
		addr = "tcp:" + l.Addr().String()
	}
	ts := &testServer{srv: srv, addr: addr, token: tok, served: make(chan error, 1)}
	go func() { ts.served <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-ts.served; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return ts
}

// dial opens a Client to ts and closes it when the test ends.
func (ts *testServer) dial(t testing.TB, id string, tlsCfg *tls.Config) *Client {
	t.Helper()
	c, err := Dial(context.Background(), ts.addr, ts.token, id, tlsCfg)
	if err != nil {
		t.Fatalf("dial %s: %v", ts.addr, err)
	}
	c.noBulk = strings.HasSuffix(ts.addr, "/"+rpcSocketName)
	t.Cleanup(func() { c.Close() })
	return c
}

// raw returns a bare generated client on a new connection to ts, for requests
// the Client type would never send.
func (ts *testServer) raw(t testing.TB) pagesvc.PagesClient {
	t.Helper()
	network, address, err := ParseAddr(ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial(network, address)
	if err != nil {
		t.Fatal(err)
	}
	c := ttrpc.NewClient(conn)
	t.Cleanup(func() { c.Close() })
	return pagesvc.NewPagesClient(c)
}

// testPKI is a self-signed CA and a server certificate for 127.0.0.1.
type testPKI struct {
	pool       *x509.CertPool
	serverCert tls.Certificate
}

func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "cowmig test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "cowmig page server"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &testPKI{pool: pool, serverCert: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}}
}

func (p *testPKI) serverConfig() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.serverCert}, MinVersion: tls.VersionTLS13}
}

func (p *testPKI) clientConfig() *tls.Config {
	return &tls.Config{RootCAs: p.pool, MinVersion: tls.VersionTLS13}
}

// collect returns a Stream callback that writes every chunk into dst (which
// mirrors ranges' concatenation) and checks that chunks come in order.
func collect(t testing.TB, ranges []Range, dst []byte, chunk int) func(uint64, []byte) error {
	ri, roff, doff := 0, uint64(0), 0
	return func(addr uint64, data []byte) error {
		if ri >= len(ranges) {
			return errors.New("chunk after the last range")
		}
		r := ranges[ri]
		if addr != r.Addr+roff {
			return fmt.Errorf("chunk at %#x, want %#x", addr, r.Addr+roff)
		}
		if len(data) > chunk || uint64(len(data)) > r.Len-roff {
			return fmt.Errorf("chunk %#x+%#x too long (chunk %d, range left %d)", addr, len(data), chunk, r.Len-roff)
		}
		doff += copy(dst[doff:], data)
		roff += uint64(len(data))
		if roff == r.Len {
			ri, roff = ri+1, 0
		}
		return nil
	}
}
