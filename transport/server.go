package transport

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/ttrpc"

	pagesvc "github.com/cowmig/cowmig/transport/pagesvc/v1"
)

// ProtocolVersion is the page-service protocol this package speaks.
const ProtocolVersion = uint32(pagesvc.ProtocolVersion_PROTOCOL_VERSION_1)

// Size limits of the page service.
const (
	// MaxGetPagesBytes is the most data one GetPages answer may carry: a
	// ttrpc message is at most 4 MiB, and the answer's framing (two protobuf
	// envelopes and a status) needs a few bytes; a page of headroom keeps
	// the limit page aligned.
	MaxGetPagesBytes = 4<<20 - 4096
	// DefaultChunkSize is the StreamPages chunk size when the request says 0.
	DefaultChunkSize = 1 << 20
	// MaxChunkSize is the largest StreamPages chunk size.
	MaxChunkSize = 2 << 20
)

// ProcessInfo describes one process of the snapshot.
type ProcessInfo struct {
	ID         uint32
	PagesTotal uint64
}

// Range is a page-aligned span [Addr, Addr+Len) of a process's memory.
type Range struct {
	Addr, Len uint64
}

// PageSource is the snapshot the server serves; the checkpoint engine
// implements it. Its methods may be called concurrently.
type PageSource interface {
	// Processes lists the snapshot's processes.
	Processes() []ProcessInfo
	// ReadPages fills buf with the snapshot's content of process proc at
	// addr. addr and len(buf) are page aligned. An unknown process or a
	// range outside the snapshot returns an error wrapping ErrBadRequest.
	ReadPages(ctx context.Context, proc uint32, addr uint64, buf []byte) error
	// ClientDone records that clientID has every page of proc it needs. The
	// server calls it at most once per client and process.
	ClientDone(clientID string, proc uint32)
	// Release frees the snapshot. The server calls it once, after every page
	// read in flight has returned, and reads no page afterwards.
	Release()
}

// ServerConfig configures a Server.
type ServerConfig struct {
	// Token is the snapshot's secret (see NewToken); every request must
	// carry it. At least 16 bytes.
	Token []byte
	// SnapshotID names the snapshot; Open returns it.
	SnapshotID string
	// TLS, when set, wraps every connection accepted on a TCP listener. Unix
	// listeners rely on the socket's 0600 mode and ignore it.
	TLS *tls.Config
}

// Server serves one snapshot's pages over ttrpc.
type Server struct {
	src        PageSource
	token      []byte
	snapshotID string
	tlsCfg     *tls.Config
	pageSize   uint64
	rpc        *ttrpc.Server

	// ctx is the parent of every request's context; Shutdown and Close
	// cancel it so that streams stop between chunks.
	ctx      context.Context
	cancel   context.CancelFunc
	stopping atomic.Bool

	// bufs holds *[]byte of headroom+MaxChunkSize for StreamPages.
	bufs sync.Pool

	// gate orders page reads against Release: each read holds it shared,
	// release takes it exclusively, so the source never frees memory under
	// a read and no read starts after.
	gate     sync.RWMutex
	released bool // guarded by gate
	// releasedCh is closed when the snapshot is released.
	releasedCh  chan struct{}
	releaseOnce sync.Once

	mu sync.Mutex
	// sessions maps an open client id to its session; guarded by mu.
	sessions map[string]*session
	// conns holds every accepted connection not yet closed, so that Close
	// can cut connections ttrpc still considers busy; guarded by mu.
	conns map[*trackedConn]struct{}
	// bulkSessions counts running bulk sessions (bulk.go); Shutdown and
	// Close wait for them once their connections are cut. Added to only
	// under mu while not stopping (beginBulk).
	bulkSessions sync.WaitGroup

	// noBulk makes the server behave as one that predates the bulk
	// stream: Open does not offer it and unix connections all go to ttrpc
	// (tests of version skew).
	noBulk bool
}

// session is one client's state between Open and Close.
type session struct {
	// done holds the processes the client reported Done; guarded by
	// Server.mu.
	done map[uint32]struct{}
}

// handler implements the RPCs; it is a separate type so that they (Close,
// Release, …) do not collide with Server's own methods.
type handler struct{ s *Server }

// NewServer returns a server for src. It serves nothing until Serve.
func NewServer(src PageSource, cfg ServerConfig) (*Server, error) {
	if src == nil {
		return nil, fmt.Errorf("new server: nil page source: %w", ErrBadRequest)
	}
	if len(cfg.Token) < minTokenSize {
		return nil, fmt.Errorf("new server: token of %d bytes, need at least %d: %w", len(cfg.Token), minTokenSize, ErrBadToken)
	}
	rpc, err := ttrpc.NewServer()
	if err != nil {
		return nil, fmt.Errorf("new ttrpc server: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		src:        src,
		token:      append([]byte(nil), cfg.Token...),
		snapshotID: cfg.SnapshotID,
		tlsCfg:     cfg.TLS,
		pageSize:   uint64(os.Getpagesize()),
		rpc:        rpc,
		ctx:        ctx,
		cancel:     cancel,
		releasedCh: make(chan struct{}),
		sessions:   make(map[string]*session),
		conns:      make(map[*trackedConn]struct{}),
	}
	s.bufs.New = func() any {
		b := make([]byte, headroom+MaxChunkSize)
		return &b
	}
	rpc.RegisterService(serviceName, serviceDesc(handler{s}))
	return s, nil
}

// Serve accepts connections on l and serves them until Shutdown or Close,
// then returns nil; it returns an error if accepting fails otherwise. l is
// closed on return. With ServerConfig.TLS set, TCP connections use TLS.
func (s *Server) Serve(l net.Listener) error {
	if s.stopping.Load() {
		l.Close()
		return fmt.Errorf("serve: %w", ErrClosed)
	}
	var cfg *tls.Config
	if s.tlsCfg != nil && l.Addr().Network() == "tcp" {
		cfg = s.tlsCfg
	}
	err := s.rpc.Serve(s.ctx, &trackingListener{Listener: l, s: s, tls: cfg})
	if errors.Is(err, ttrpc.ErrServerClosed) || s.stopping.Load() {
		return nil
	}
	return fmt.Errorf("serve: %w", err)
}

// Shutdown stops accepting, ends running streams with an Unavailable error
// (clients see ErrClosed) and waits for connections to go idle; when ctx
// ends first it closes them and returns ctx's error. It does not release the
// snapshot.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopping.Store(true)
	s.cancel()
	if err := s.rpc.Shutdown(ctx); err != nil {
		s.closeConns()
		s.rpc.Close()
		s.waitBulk()
		return fmt.Errorf("shutdown: %w", err)
	}
	s.waitBulk()
	return nil
}

// Close stops the server at once, cutting every connection.
func (s *Server) Close() error {
	s.stopping.Store(true)
	s.cancel()
	s.closeConns()
	err := s.rpc.Close()
	s.waitBulk()
	if err != nil {
		return fmt.Errorf("close: %w", err)
	}
	return nil
}

// waitBulk cuts the connections of bulk sessions (ttrpc sees them as idle
// and may have closed them already) and waits for the sessions to end:
// with s.ctx cancelled and their connection closed, both of a session's
// goroutines return promptly.
//
// Preconditions: stopping is set and s.ctx cancelled.
func (s *Server) waitBulk() {
	// closeConns passes through mu, so a beginBulk that did not see
	// stopping has counted its session before the Wait below.
	s.closeConns()
	s.bulkSessions.Wait()
}

// Release releases the snapshot as if a client had asked: it waits for page
// reads in flight, makes further page requests fail with ErrClosed and calls
// the source's Release once. The server keeps answering until Shutdown.
func (s *Server) Release() {
	s.releaseOnce.Do(func() {
		s.gate.Lock()
		s.released = true
		s.gate.Unlock()
		s.src.Release()
		close(s.releasedCh)
	})
}

// Released is closed once the snapshot has been released (by Release or a
// client's Release call), so the owner can shut the server down.
func (s *Server) Released() <-chan struct{} { return s.releasedCh }

// checkToken compares in constant time so that the answer's timing says
// nothing about how much of a guess was right.
func (s *Server) checkToken(tok []byte) error {
	if subtle.ConstantTimeCompare(tok, s.token) != 1 {
		return ErrBadToken
	}
	if s.stopping.Load() {
		return fmt.Errorf("server shutting down: %w", ErrClosed)
	}
	return nil
}

// read fills buf from the source unless the snapshot is released.
func (s *Server) read(ctx context.Context, proc uint32, addr uint64, buf []byte) error {
	s.gate.RLock()
	defer s.gate.RUnlock()
	if s.released {
		return fmt.Errorf("read pages %#x: snapshot released: %w", addr, ErrClosed)
	}
	if err := s.src.ReadPages(ctx, proc, addr, buf); err != nil {
		return fmt.Errorf("read pages of process %d at %#x+%#x: %w", proc, addr, len(buf), err)
	}
	return nil
}

// checkRanges validates page alignment and overflow and returns the total
// length; a total above limit is an error.
func (s *Server) checkRanges(rs []*pagesvc.Range, limit uint64) (uint64, error) {
	if len(rs) == 0 {
		return 0, fmt.Errorf("no ranges: %w", ErrBadRequest)
	}
	var total uint64
	for _, r := range rs {
		a, n := r.GetAddr(), r.GetLength()
		switch {
		case n == 0:
			return 0, fmt.Errorf("range %#x: empty: %w", a, ErrBadRequest)
		case a%s.pageSize != 0 || n%s.pageSize != 0:
			return 0, fmt.Errorf("range %#x+%#x: not page aligned: %w", a, n, ErrBadRequest)
		case a+n < a:
			return 0, fmt.Errorf("range %#x+%#x: wraps around: %w", a, n, ErrBadRequest)
		case n > limit || total+n > limit:
			return 0, fmt.Errorf("ranges: more than %d bytes: %w", limit, ErrBadRequest)
		}
		total += n
	}
	return total, nil
}

// fail converts a handler error to a status. A request cut short because the
// server is shutting down reports that (Unavailable, ErrClosed on the client)
// rather than a bare cancellation.
func (s *Server) fail(ctx context.Context, err error) error {
	if ctx.Err() != nil && s.stopping.Load() {
		err = fmt.Errorf("%w (server shutting down: %w)", err, ErrClosed)
	}
	return toStatus(err)
}

func (s *Server) closeConns() {
	s.mu.Lock()
	conns := make([]*trackedConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

func (h handler) Open(ctx context.Context, req *pagesvc.OpenRequest) (*pagesvc.OpenResponse, error) {
	s := h.s
	if err := s.checkToken(req.GetToken()); err != nil {
		return nil, toStatus(err)
	}
	if v := req.GetProtocolVersion(); v != ProtocolVersion {
		return nil, toStatus(fmt.Errorf("open: client speaks version %d, server %d: %w", v, ProtocolVersion, ErrVersion))
	}
	id := req.GetClientId()
	if id == "" {
		return nil, toStatus(fmt.Errorf("open: empty client id: %w", ErrBadRequest))
	}
	s.gate.RLock()
	released := s.released
	s.gate.RUnlock()
	if released {
		return nil, toStatus(fmt.Errorf("open: snapshot released: %w", ErrClosed))
	}
	procs := s.src.Processes()
	resp := &pagesvc.OpenResponse{
		ProtocolVersion: ProtocolVersion,
		SnapshotId:      s.snapshotID,
		Processes:       make([]*pagesvc.ProcessInfo, len(procs)),
		BulkStream:      !s.noBulk,
	}
	for i, p := range procs {
		resp.Processes[i] = &pagesvc.ProcessInfo{Id: p.ID, PagesTotal: p.PagesTotal}
	}
	s.mu.Lock()
	// A second Open with the same id (a client that reconnected) keeps the
	// session and its Done record, so ClientDone is still called only once.
	if _, ok := s.sessions[id]; !ok {
		s.sessions[id] = &session{done: make(map[uint32]struct{})}
	}
	s.mu.Unlock()
	return resp, nil
}

// GetPages answers with a dataOut (a GetPagesResponse encoded in place, see
// codec.go) rather than the generated type, saving a copy of the data.
func (h handler) GetPages(ctx context.Context, req *pagesvc.GetPagesRequest) (*dataOut, error) {
	s := h.s
	if err := s.checkToken(req.GetToken()); err != nil {
		return nil, toStatus(err)
	}
	total, err := s.checkRanges(req.GetRanges(), MaxGetPagesBytes)
	if err != nil {
		return nil, toStatus(fmt.Errorf("get pages: %w", err))
	}
	// ttrpc marshals the answer after this method returns and keeps no
	// record of when it is done with it, so the buffer is not pooled.
	buf := make([]byte, headroom+total)
	off := uint64(headroom)
	for _, r := range req.GetRanges() {
		if err := s.read(ctx, req.GetProcess(), r.GetAddr(), buf[off:off+r.GetLength()]); err != nil {
			return nil, s.fail(ctx, fmt.Errorf("get pages: %w", err))
		}
		off += r.GetLength()
	}
	return newPagesOut(buf), nil
}

func (h handler) StreamPages(ctx context.Context, req *pagesvc.StreamPagesRequest, ss ttrpc.StreamServer) error {
	s := h.s
	if err := s.checkToken(req.GetToken()); err != nil {
		return toStatus(err)
	}
	chunk := uint64(req.GetChunkSize())
	if chunk == 0 {
		chunk = DefaultChunkSize
	}
	if chunk > MaxChunkSize || chunk%s.pageSize != 0 {
		return toStatus(fmt.Errorf("stream pages: chunk size %d: want a page multiple up to %d: %w", chunk, MaxChunkSize, ErrBadRequest))
	}
	if _, err := s.checkRanges(req.GetRanges(), ^uint64(0)); err != nil {
		return toStatus(fmt.Errorf("stream pages: %w", err))
	}
	// Chunks are read straight into the message's buffer, behind headroom
	// for its header (see codec.go), from a ring of two pooled buffers. ttrpc
	// hands each message to the connection's writer over an unbuffered
	// channel and writes it before taking the next (ttrpc v1.2.10 server.go,
	// serverConn.run), so once Send of chunk k+1 returns, chunk k is on the
	// wire and its buffer free. The last buffer sent may still be queued when
	// this returns: it is left to the garbage collector, not pooled.
	// TestTTRPCVersion pins the ttrpc version this reasoning was checked on.
	ring := [2]*[]byte{s.bufs.Get().(*[]byte), s.bufs.Get().(*[]byte)}
	cur, sent := 0, false
	defer func() {
		s.bufs.Put(ring[cur])
		if !sent {
			s.bufs.Put(ring[cur^1])
		}
	}()
	msg := newChunkOut()
	for _, r := range req.GetRanges() {
		for off := uint64(0); off < r.GetLength(); {
			if err := ctx.Err(); err != nil {
				return s.fail(ctx, fmt.Errorf("stream pages: %w", err))
			}
			n := min(chunk, r.GetLength()-off)
			addr := r.GetAddr() + off
			buf := (*ring[cur])[:headroom+n]
			if err := s.read(ctx, req.GetProcess(), addr, buf[headroom:]); err != nil {
				return s.fail(ctx, fmt.Errorf("stream pages: %w", err))
			}
			msg.setChunk(addr, buf)
			sent = true
			if err := ss.SendMsg(msg); err != nil {
				return s.fail(ctx, fmt.Errorf("stream pages: send chunk %#x: %w", addr, err))
			}
			cur ^= 1
			off += n
		}
	}
	return nil
}

func (h handler) Done(ctx context.Context, req *pagesvc.DoneRequest) (*pagesvc.DoneResponse, error) {
	s := h.s
	if err := s.checkToken(req.GetToken()); err != nil {
		return nil, toStatus(err)
	}
	proc, id := req.GetProcess(), req.GetClientId()
	known := false
	for _, p := range s.src.Processes() {
		known = known || p.ID == proc
	}
	if !known {
		return nil, toStatus(fmt.Errorf("done: unknown process %d: %w", proc, ErrBadRequest))
	}
	s.mu.Lock()
	sess, ok := s.sessions[id]
	first := false
	if ok {
		_, seen := sess.done[proc]
		first = !seen
		sess.done[proc] = struct{}{}
	}
	s.mu.Unlock()
	if !ok {
		return nil, toStatus(fmt.Errorf("done: client %q has no session: %w", id, ErrBadRequest))
	}
	if first {
		s.src.ClientDone(id, proc)
	}
	return &pagesvc.DoneResponse{}, nil
}

func (h handler) Release(ctx context.Context, req *pagesvc.ReleaseRequest) (*pagesvc.ReleaseResponse, error) {
	if err := h.s.checkToken(req.GetToken()); err != nil {
		return nil, toStatus(err)
	}
	h.s.Release()
	return &pagesvc.ReleaseResponse{}, nil
}

func (h handler) Close(ctx context.Context, req *pagesvc.CloseRequest) (*pagesvc.CloseResponse, error) {
	s := h.s
	if err := s.checkToken(req.GetToken()); err != nil {
		return nil, toStatus(err)
	}
	id := req.GetClientId()
	s.mu.Lock()
	_, ok := s.sessions[id]
	delete(s.sessions, id)
	s.mu.Unlock()
	if !ok {
		return nil, toStatus(fmt.Errorf("close: client %q has no session: %w", id, ErrBadRequest))
	}
	return &pagesvc.CloseResponse{Ack: true}, nil
}

// serviceName is the ttrpc name of the Pages service.
const serviceName = "cowmig.transport.v1.Pages"

// serviceDesc routes the Pages RPCs to h. It replaces the generated
// RegisterPagesService only so that GetPages can answer with a dataOut;
// TestServiceDesc checks it covers every RPC of pages.proto.
func serviceDesc(h handler) *ttrpc.ServiceDesc {
	return &ttrpc.ServiceDesc{
		Methods: map[string]ttrpc.Method{
			"Open": func(ctx context.Context, unmarshal func(any) error) (any, error) {
				var req pagesvc.OpenRequest
				if err := unmarshal(&req); err != nil {
					return nil, err
				}
				return h.Open(ctx, &req)
			},
			"GetPages": func(ctx context.Context, unmarshal func(any) error) (any, error) {
				var req pagesvc.GetPagesRequest
				if err := unmarshal(&req); err != nil {
					return nil, err
				}
				return h.GetPages(ctx, &req)
			},
			"Done": func(ctx context.Context, unmarshal func(any) error) (any, error) {
				var req pagesvc.DoneRequest
				if err := unmarshal(&req); err != nil {
					return nil, err
				}
				return h.Done(ctx, &req)
			},
			"Release": func(ctx context.Context, unmarshal func(any) error) (any, error) {
				var req pagesvc.ReleaseRequest
				if err := unmarshal(&req); err != nil {
					return nil, err
				}
				return h.Release(ctx, &req)
			},
			"Close": func(ctx context.Context, unmarshal func(any) error) (any, error) {
				var req pagesvc.CloseRequest
				if err := unmarshal(&req); err != nil {
					return nil, err
				}
				return h.Close(ctx, &req)
			},
		},
		Streams: map[string]ttrpc.Stream{
			"StreamPages": {
				Handler: func(ctx context.Context, ss ttrpc.StreamServer) (any, error) {
					var req pagesvc.StreamPagesRequest
					if err := ss.RecvMsg(&req); err != nil {
						return nil, err
					}
					return nil, h.StreamPages(ctx, &req, ss)
				},
				StreamingServer: true,
			},
		},
	}
}

// trackingListener records accepted connections in Server.conns and wraps
// them in TLS when configured. The TLS handshake runs on the connection's
// first read, in ttrpc's per-connection goroutine, so a slow client cannot
// hold up the accept loop.
type trackingListener struct {
	net.Listener
	s   *Server
	tls *tls.Config
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	if uc, ok := c.(*net.UnixConn); ok {
		// A unix stream socket's data is charged to the sender's buffer,
		// 208 KiB by default: a 1 MiB chunk then takes several
		// write/wake/read rounds. 1 MiB measured best (BenchmarkStream);
		// larger buffers let data go cold in cache before it is read. TCP
		// keeps the kernel's autotuning, which a fixed size would disable.
		// The kernel caps the size at net.core.wmem_max; failing is harmless.
		_ = uc.SetWriteBuffer(unixWriteBuffer)
	}
	tc := &trackedConn{Conn: c, s: l.s}
	if uc, ok := c.(*net.UnixConn); ok && !l.s.noBulk {
		tc.unix = uc
	}
	if l.tls != nil {
		tc.tls = tls.Server(c, l.tls)
		tc.Conn = tc.tls
	}
	l.s.mu.Lock()
	l.s.conns[tc] = struct{}{}
	l.s.mu.Unlock()
	return tc, nil
}

// unixWriteBuffer is the send buffer of accepted unix connections.
const unixWriteBuffer = 1 << 20

// handshakeTimeout bounds a TLS handshake, so a peer that connects and sends
// nothing does not hold a connection forever.
const handshakeTimeout = 10 * time.Second

// trackedConn removes itself from Server.conns when closed.
type trackedConn struct {
	net.Conn
	s *Server
	// tls is the TLS side of Conn, nil without TLS; its handshake runs on
	// the first Read, in ttrpc's per-connection reader goroutine.
	tls       *tls.Conn
	handshook bool // only touched by the reader goroutine
	// unix is Conn on a unix socket, where a connection may be a bulk
	// stream (bulk.go); sniffed and prefix (the first bytes, read to tell)
	// are only touched by the reader goroutine.
	unix    *net.UnixConn
	sniffed bool
	prefix  []byte
	once    sync.Once
}

// Read runs the TLS handshake first, under a deadline, and turns every read
// error into one wrapping io.ErrUnexpectedEOF: ttrpc v1.2.10 drops a
// connection only on EOF, unexpected EOF or ECONNRESET and otherwise keeps it
// open and idle (server.go, serverConn.run), which would leave a client whose
// TLS handshake failed waiting forever.
func (c *trackedConn) Read(p []byte) (int, error) {
	if c.tls != nil && !c.handshook {
		c.handshook = true
		c.tls.SetDeadline(time.Now().Add(handshakeTimeout))
		err := c.tls.Handshake()
		c.tls.SetDeadline(time.Time{})
		if err != nil {
			c.Close()
			return 0, fmt.Errorf("tls handshake: %w (%w)", io.ErrUnexpectedEOF, err)
		}
	}
	if c.unix != nil && !c.sniffed {
		// A bulk stream is served right here, in ttrpc's reader
		// goroutine for the connection, which then sees EOF and forgets
		// the connection. ttrpc counts it as idle, so Shutdown cuts it.
		c.sniffed = true
		prefix, done, err := c.s.sniffBulk(c.unix)
		if done {
			c.Close()
			return 0, io.EOF
		}
		c.prefix = prefix
		if err != nil && len(prefix) == 0 {
			return 0, c.readErr(err)
		}
	}
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	n, err := c.Conn.Read(p)
	return n, c.readErr(err)
}

// readErr turns a read error into one ttrpc drops the connection on.
func (c *trackedConn) readErr(err error) error {
	if err != nil && !errors.Is(err, io.EOF) {
		c.Close()
		err = fmt.Errorf("read: %w (%w)", io.ErrUnexpectedEOF, err)
	}
	return err
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.s.mu.Lock()
		delete(c.s.conns, c)
		c.s.mu.Unlock()
	})
	return c.Conn.Close()
}
