// Package live composes the checkpoint engine with the page transport: it
// serves a live snapshot over ttrpc on the source, and restores a live
// image on the destination with a pager that pulls pages from the source.
// cmd/cowmig and the shim both use it; the engine and the transport stay
// unaware of each other (DESIGN §2).
package live

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/transport"
)

// CheckpointOptions configure Checkpoint.
type CheckpointOptions struct {
	checkpoint.Options
	// Listen is the page-server address (unix:PATH or tcp:HOST:PORT),
	// required for live mode.
	Listen string
	// Advertise is the address written into the image for clients; it
	// defaults to Listen (use it when listening on 0.0.0.0). On TCP it may
	// leave out the port ("tcp:HOST"): the listener's is appended.
	Advertise string
	// TLS, if set, is the page server's TLS on TCP (see TLSFiles).
	TLS *tls.Config
}

// Source is a checkpoint whose snapshot is being served.
type Source struct {
	Result *checkpoint.Result
	srv    *transport.Server
	snap   *checkpoint.Snapshot
	served chan error // Serve's result

	mu       sync.Mutex    // guards the fields below
	done     int           // clients that fetched everything
	released chan struct{} // closed by release
	relOnce  sync.Once
}

// Checkpoint dumps pid. In live mode it also starts the page server on
// o.Listen; the caller waits with Wait and must call Close.
func Checkpoint(ctx context.Context, pid int, o CheckpointOptions) (*Source, error) {
	if o.Mode == "" {
		o.Mode = image.ModeLive
	}
	if o.Mode != image.ModeLive {
		res, err := checkpoint.Dump(ctx, pid, o.Options)
		if err != nil {
			return nil, err
		}
		return &Source{Result: res, released: closedChan()}, nil
	}
	if o.Listen == "" {
		return nil, errors.New("live checkpoint: no page-server listen address")
	}
	l, err := transport.Listen(o.Listen)
	if err != nil {
		return nil, fmt.Errorf("page server: %w", err)
	}
	token, err := transport.NewToken()
	if err != nil {
		l.Close()
		return nil, err
	}
	o.Endpoint, o.Token = o.Listen, token
	a, isTCP := l.Addr().(*net.TCPAddr)
	if isTCP {
		// tcp:HOST:0 picks a port: clients need the one picked.
		o.Endpoint = "tcp:" + a.String()
	}
	o.EndpointTLS = isTCP && o.TLS != nil
	if o.Advertise != "" {
		o.Endpoint = o.Advertise
		if host, ok := strings.CutPrefix(o.Advertise, "tcp:"); ok && isTCP && !strings.Contains(host, ":") {
			// tcp:HOST: the port is the one picked.
			o.Endpoint = "tcp:" + net.JoinHostPort(host, strconv.Itoa(a.Port))
		}
		if _, _, err := transport.ParseAddr(o.Endpoint); err != nil {
			l.Close()
			return nil, fmt.Errorf("page server: advertise %q: %w", o.Advertise, err)
		}
	}
	res, err := checkpoint.Dump(ctx, pid, o.Options)
	if err != nil {
		l.Close()
		return nil, err
	}
	s := &Source{Result: res, snap: res.Snapshot, served: make(chan error, 1), released: make(chan struct{})}
	if s.snap == nil {
		// Nothing lazy (no anonymous memory): serve an empty snapshot.
		l.Close()
		close(s.released)
		return s, nil
	}
	s.srv, err = transport.NewServer(&pageSource{s: s}, transport.ServerConfig{Token: token, SnapshotID: res.Image.SnapshotID, TLS: o.TLS})
	if err != nil {
		l.Close()
		s.snap.Release()
		return nil, err
	}
	go func() { s.served <- s.srv.Serve(l) }()
	return s, nil
}

func closedChan() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}

// Wait returns when the snapshot is released (by a client or Close), or
// when at least one client fetched everything and ttl has passed since the
// checkpoint, or maxAge has passed in any case (0: no limit).
func (s *Source) Wait(ctx context.Context, ttl, maxAge time.Duration) error {
	created := time.Now()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-s.released:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case err := <-s.served:
			return err
		case <-s.lost():
			return s.snap.Err()
		case now := <-tick.C:
			s.mu.Lock()
			done := s.done
			s.mu.Unlock()
			if done > 0 && now.Sub(created) >= ttl {
				return nil
			}
			if maxAge > 0 && now.Sub(created) >= maxAge {
				return nil
			}
		}
	}
}

// lost is closed when the snapshot can no longer be served (a fork
// snapshot's shadow died); nil otherwise.
func (s *Source) lost() <-chan struct{} {
	if s.snap == nil {
		return nil
	}
	return s.snap.Lost()
}

// Close releases the snapshot and stops the page server.
func (s *Source) Close() error {
	s.release()
	if s.srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return s.srv.Shutdown(ctx)
	}
	return nil
}

func (s *Source) release() {
	s.relOnce.Do(func() {
		if s.snap != nil {
			s.snap.Release()
		}
		select {
		case <-s.released:
		default:
			close(s.released)
		}
	})
}

// pageSource adapts the engine's Snapshot to transport.PageSource.
type pageSource struct{ s *Source }

var _ transport.PageSource = (*pageSource)(nil)

func (p *pageSource) Processes() []transport.ProcessInfo {
	return []transport.ProcessInfo{{ID: p.s.snap.Proc(), PagesTotal: p.s.snap.PagesLazy()}}
}

func (p *pageSource) ReadPages(ctx context.Context, proc uint32, addr uint64, buf []byte) error {
	err := p.s.snap.ReadPages(ctx, proc, addr, buf)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, checkpoint.ErrNotInSnapshot):
		return fmt.Errorf("%w: %v", transport.ErrBadRequest, err)
	case errors.Is(err, checkpoint.ErrReleased):
		return fmt.Errorf("%w: %v", transport.ErrClosed, err)
	}
	return err
}

func (p *pageSource) ClientDone(clientID string, proc uint32) {
	p.s.mu.Lock()
	p.s.done++
	p.s.mu.Unlock()
}

func (p *pageSource) Release() { p.s.release() }

// Release asks the page server of a live image to release its snapshot;
// tlsCfg is needed when the server speaks TLS.
func Release(ctx context.Context, dir string, tlsCfg *tls.Config) error {
	img, err := image.Read(dir)
	if err != nil {
		return err
	}
	if img.Mode != image.ModeLive {
		return fmt.Errorf("image %s is a %s image: nothing to release", dir, img.Mode)
	}
	if tlsCfg, err = clientTLS(img.EndpointTLS, img.Endpoint, tlsCfg); err != nil {
		return err
	}
	c, err := transport.Dial(ctx, img.Endpoint, img.Token, clientID("release"), tlsCfg)
	if err != nil {
		return fmt.Errorf("connect to page server %s: %w", img.Endpoint, err)
	}
	defer c.Close()
	err = c.Release(ctx)
	if errors.Is(err, transport.ErrClosed) {
		// The server released and shut down before its answer went out.
		return nil
	}
	return err
}

func clientID(role string) string {
	h, _ := os.Hostname()
	return fmt.Sprintf("%s/%s/%d/%d", role, h, os.Getpid(), time.Now().UnixNano())
}

// Restoring is a clone being restored from a live or self-contained image.
type Restoring struct {
	*checkpoint.Restored
	c      *transport.Client
	proc   uint32
	ra     *readahead
	stopRA context.CancelFunc
}

func (r *Restoring) stopReadahead() {
	if r.ra != nil {
		r.ra.stop(r.stopRA)
	}
}

// Restore starts the clone of the image in ro.Dir; for a live image it
// connects to the source's page server first (tlsCfg is needed when the
// server speaks TLS). Call Serve next.
func Restore(ctx context.Context, ro checkpoint.RestoreOptions, tlsCfg *tls.Config) (*Restoring, error) {
	img, err := image.Read(ro.Dir)
	if err != nil {
		return nil, fmt.Errorf("read image %s: %w", ro.Dir, err)
	}
	r := &Restoring{}
	// A live snapshot with no lazy page has no page server to talk to.
	if img.Mode == image.ModeLive && img.Stats.PagesLazy > 0 {
		if tlsCfg, err = clientTLS(img.EndpointTLS, img.Endpoint, tlsCfg); err != nil {
			return nil, err
		}
		r.c, err = transport.Dial(ctx, img.Endpoint, img.Token, clientID("restore"), tlsCfg)
		if err != nil {
			return nil, fmt.Errorf("connect to page server %s: %w", img.Endpoint, err)
		}
		r.proc = img.Processes[0].ID
		var ranges []transport.Range
		for _, v := range img.Processes[0].Vmas {
			for _, run := range v.Runs {
				if run.Where == image.OnServer {
					ranges = append(ranges, transport.Range{Addr: run.Addr, Len: run.NPages * image.PageSize})
				}
			}
		}
		raCtx, cancel := context.WithCancel(context.Background())
		r.stopRA = cancel
		r.ra = newReadahead(raCtx, r.c, r.proc, ranges)
		ro.Fetcher = fetcher{c: r.c, ra: r.ra}
		if ro.FillChunk == 0 {
			ro.FillChunk = transport.MaxChunkSize // one stream chunk per fill step
		}
		ro.OnRunning = sync.OnceFunc(r.ra.start)
	}
	if r.Restored, err = checkpoint.Restore(ctx, ro); err != nil {
		if r.c != nil {
			r.stopReadahead()
			r.c.Close()
		}
		return nil, err
	}
	return r, nil
}

// Serve runs the pager until every page is local, tells the source, and
// closes the connection. On failure the clone has been killed.
func (r *Restoring) Serve(ctx context.Context) error {
	err := r.Restored.Serve(ctx)
	if r.c == nil {
		return err
	}
	r.stopReadahead()
	if err == nil {
		// Only a clone that has every page counts as a fetch.
		err = r.c.Done(ctx, r.proc)
	}
	return errors.Join(err, r.c.Close())
}

// progressEvery is how often ServeLogged logs the lazy phase's progress.
const progressEvery = 5 * time.Second

// ServeLogged is Serve for a pager daemon: it says in log how the lazy
// phase ended (the shim and tests read the last line) and counts a clone
// that exited before all its pages were local as no error.
func (r *Restoring) ServeLogged(ctx context.Context, log io.Writer) error {
	start := time.Now()
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		total := r.Image.Stats.PagesLazy * image.PageSize
		tick := time.NewTicker(progressEvery)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				local := total - min(total, r.Remaining())
				fmt.Fprintf(log, "cowmig pager: pid %d: %d of %d MiB local after %v\n",
					r.Pid, local>>20, total>>20, time.Since(start).Round(time.Millisecond))
			}
		}
	}()
	err := r.Serve(ctx)
	close(stop)
	<-done
	switch {
	case errors.Is(err, checkpoint.ErrCloneExited):
		fmt.Fprintf(log, "cowmig pager: pid %d exited after %v, before all its pages were local\n", r.Pid, time.Since(start))
		return nil
	case err != nil:
		fmt.Fprintf(log, "cowmig pager: pid %d: %v (the clone was killed)\n", r.Pid, err)
		return err
	}
	if r.Image.Mode == image.ModeLive {
		fmt.Fprintf(log, "cowmig pager: pid %d: all %d lazy pages local after %v\n", r.Pid, r.Image.Stats.PagesLazy, time.Since(start))
	}
	return nil
}

// fetcher pulls pages from the page server.
type fetcher struct {
	c  *transport.Client
	ra *readahead
}

var _ checkpoint.PageViewer = fetcher{}

func (f fetcher) Fetch(ctx context.Context, proc uint32, addr uint64, buf []byte) error {
	if f.ra != nil && f.ra.take(addr, buf) {
		return nil
	}
	return f.c.GetPages(ctx, proc, []transport.Range{{Addr: addr, Len: uint64(len(buf))}}, buf)
}

// FetchView lets the background fill copy streamed pages into the clone
// straight from the stream's memory.
func (f fetcher) FetchView(ctx context.Context, proc uint32, addr uint64, n int, fn func(data []byte) error) (bool, error) {
	if f.ra == nil || proc != f.ra.proc {
		return false, nil
	}
	return f.ra.view(addr, n, fn)
}
