package uffd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// pageContent is the deterministic content of the page at (original)
// address addr.
func pageContent(addr uint64) []byte {
	b := make([]byte, PageSize)
	fillPage(addr, b)
	return b
}

func fillPage(addr uint64, b []byte) {
	seed := byte(addr>>12)*31 + 1
	for i := range b {
		b[i] = seed + byte(i*7)
	}
}

// patFetcher serves pageContent and records which pages were fetched.
type patFetcher struct {
	mu      sync.Mutex
	fetched map[uint64]int // guarded by mu
	failAt  uint64         // fetches covering this page fail, if non-zero
}

var errFetch = errors.New("test fetch failure")

func (f *patFetcher) Fetch(addr uint64, buf []byte) error {
	if addr%PageSize != 0 || len(buf)%PageSize != 0 || len(buf) == 0 {
		return fmt.Errorf("unaligned fetch %#x+%#x", addr, len(buf))
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fetched == nil {
		f.fetched = map[uint64]int{}
	}
	for off := 0; off < len(buf); off += PageSize {
		a := addr + uint64(off)
		if f.failAt != 0 && a == f.failAt {
			return errFetch
		}
		f.fetched[a]++
		fillPage(a, buf[off:off+PageSize])
	}
	return nil
}

func (f *patFetcher) count(addr uint64) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fetched[addr]
}

type lazyRig struct {
	m    *ownedMapping
	mem  []byte
	base uint64
	u    *FD
	lz   *Lazy
	f    *patFetcher
	runc chan error // the Loop's Run result, read through runErr
	loop *Loop

	runOnce    sync.Once
	runRes     error
	wantRunErr error // the error Run is expected to end with, if any
}

// runErr waits for the Loop's Run to return and returns its result.
func (r *lazyRig) runErr() error {
	r.runOnce.Do(func() { r.runRes = <-r.runc })
	return r.runRes
}

// eventsBarrier returns once the events the Loop has read so far are
// dispatched: the Loop holds evMu from before its read(2) until after the
// batch's events (EventLocker). A process call such as madvise returns
// once its event was read, so after it eventsBarrier sees its effect.
func (r *lazyRig) eventsBarrier() {
	r.lz.evMu.RLock()
	r.lz.evMu.RUnlock()
}

// newLazyRig registers npages of fresh memory with a uffd created with
// LazyFeatures and serves it with a Lazy in a running Loop. The cleanup
// stops the Loop and expects Run to have returned nil unless the test took
// the result from runc.
func newLazyRig(t *testing.T, npages, batch int) *lazyRig {
	t.Helper()
	return newLazyRigFeatures(t, npages, batch, LazyFeatures)
}

func newLazyRigFeatures(t *testing.T, npages, batch int, features Feature) *lazyRig {
	t.Helper()
	inProcessFaults(t)
	r := &lazyRig{m: mmapOwned(t, npages), f: &patFetcher{}, runc: make(chan error, 1)}
	r.mem = r.m.mem
	r.base = addrOf(r.mem)
	r.u = openAPI(t, unix.O_NONBLOCK, features)
	if _, err := r.u.Register(r.base, uint64(npages)*PageSize, ModeMissing); err != nil {
		t.Fatalf("Register: %v", err)
	}
	lz, err := NewLazy(r.u, []Range{{Start: r.base, Len: uint64(npages) * PageSize}}, nil, r.f, batch)
	if err != nil {
		t.Fatalf("NewLazy: %v", err)
	}
	r.lz = lz
	loop, err := NewLoop(lz)
	if err != nil {
		t.Fatalf("NewLoop: %v", err)
	}
	r.loop = loop
	if err := loop.Add(r.u); err != nil {
		t.Fatalf("Add: %v", err)
	}
	go func() { r.runc <- loop.Run() }()
	t.Cleanup(func() {
		loop.Stop()
		if err := r.runErr(); err != nil && (r.wantRunErr == nil || !errors.Is(err, r.wantRunErr)) {
			t.Errorf("Loop.Run: %v", err)
		}
		// A reader still blocked in a fault (on a failing test) is
		// released with a zero page.
		r.u.Close()
		if err := loop.Close(); err != nil {
			t.Errorf("Loop.Close: %v", err)
		}
	})
	return r
}

func (r *lazyRig) page(i int) []byte { return r.mem[i*PageSize : (i+1)*PageSize] }

// readPages reads pages in the given order from another goroutine (they
// fault into the Loop) and returns the first mismatch against want(i).
func (r *lazyRig) readPages(order []int, want func(i int) []byte) <-chan error {
	errc := make(chan error, 1)
	go func() {
		for _, i := range order {
			if d := firstDiff(r.page(i), want(i)); d >= 0 {
				errc <- fmt.Errorf("page %d differs at +%d", i, d)
				return
			}
		}
		errc <- nil
	}()
	return errc
}

func (r *lazyRig) content(i int) []byte { return pageContent(r.base + uint64(i)*PageSize) }

func seq(lo, hi int) []int {
	var s []int
	for i := lo; i < hi; i++ {
		s = append(s, i)
	}
	return s
}

func TestLazyFillConcurrentWithFaults(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	const n = 64
	r := newLazyRig(t, n, 2*PageSize)
	if got := r.lz.Remaining(); got != n*PageSize {
		t.Fatalf("Remaining = %d, want %d", got, n*PageSize)
	}
	// Read from the top down while Fill goes bottom up, so they meet.
	order := seq(0, n)
	for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
		order[i], order[j] = order[j], order[i]
	}
	readc := r.readPages(order, r.content)
	var last, calls uint64
	fillErr := r.lz.Fill(context.Background(), 4*PageSize, func(done, total uint64) {
		if done < last || total != n*PageSize {
			t.Errorf("progress(%d, %d) after done=%d", done, total, last)
		}
		last = done
		calls++
	})
	if fillErr != nil {
		t.Fatalf("Fill: %v", fillErr)
	}
	if err := <-readc; err != nil {
		t.Fatalf("concurrent reader: %v", err)
	}
	select {
	case <-r.lz.Done():
	default:
		t.Errorf("Done not closed after Fill")
	}
	if rem := r.lz.Remaining(); rem != 0 || last != n*PageSize || calls == 0 {
		t.Errorf("Remaining = %d, last progress %d after %d calls", rem, last, calls)
	}
	// Every page is present now: compare the whole region at once.
	for i := 0; i < n; i++ {
		if !bytes.Equal(r.page(i), r.content(i)) {
			t.Errorf("page %d differs after Fill", i)
		}
		if c := r.f.count(r.base + uint64(i)*PageSize); c < 1 || c > 2 {
			t.Errorf("page %d fetched %d times, want 1 or 2", i, c)
		}
	}
}

func TestLazyRemove(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	const n = 64
	r := newLazyRig(t, n, PageSize)
	if err := <-r.readPages(seq(0, 8), r.content); err != nil {
		t.Fatalf("read pages 0-7: %v", err)
	}
	// The process discards pages 4-19: 4-7 were fetched, 8-19 never.
	// madvise blocks until the Loop has read UFFD_EVENT_REMOVE.
	if err := unix.Madvise(r.mem[4*PageSize:20*PageSize], unix.MADV_DONTNEED); err != nil {
		t.Fatalf("madvise: %v", err)
	}
	r.eventsBarrier()
	if got, want := r.lz.Remaining(), uint64(n-20)*PageSize; got != want {
		t.Errorf("Remaining after DONTNEED = %d, want %d", got, want)
	}
	if err := r.lz.Fill(context.Background(), 8*PageSize, nil); err != nil {
		t.Fatalf("Fill: %v", err)
	}
	zero := make([]byte, PageSize)
	want := func(i int) []byte {
		if i >= 4 && i < 20 {
			return zero
		}
		return r.content(i)
	}
	if err := <-r.readPages(seq(0, n), want); err != nil {
		t.Fatalf("after Fill: %v", err)
	}
	for i := 8; i < 20; i++ {
		if c := r.f.count(r.base + uint64(i)*PageSize); c != 0 {
			t.Errorf("discarded page %d fetched %d times", i, c)
		}
	}
	if r.lz.Remaining() != 0 {
		t.Errorf("Remaining = %d after Fill", r.lz.Remaining())
	}
}

// TestLazyRemoveDuringFill discards memory while Fill is copying into it:
// once madvise returns, the discarded pages must read as zero, whatever
// Fill was doing (the EventLocker contract).
func TestLazyRemoveDuringFill(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	const n = 256
	for iter := 0; iter < 5; iter++ {
		t.Run(fmt.Sprint(iter), func(t *testing.T) {
			r := newLazyRig(t, n, PageSize)
			fillc := make(chan error, 1)
			started := make(chan struct{})
			var once sync.Once
			go func() {
				fillc <- r.lz.Fill(context.Background(), PageSize, func(done, total uint64) {
					if done >= 32*PageSize {
						once.Do(func() { close(started) })
					}
				})
			}()
			<-started
			if err := unix.Madvise(r.mem[64*PageSize:192*PageSize], unix.MADV_DONTNEED); err != nil {
				t.Fatalf("madvise: %v", err)
			}
			if err := <-fillc; err != nil {
				t.Fatalf("Fill: %v", err)
			}
			zero := make([]byte, PageSize)
			want := func(i int) []byte {
				if i >= 64 && i < 192 {
					return zero
				}
				return r.content(i)
			}
			if err := <-r.readPages(seq(0, n), want); err != nil {
				t.Fatalf("after Fill: %v", err)
			}
		})
	}
}

func TestLazyRemap(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	const n = 32
	r := newLazyRig(t, n, 4*PageSize)
	if err := <-r.readPages([]int{9}, r.content); err != nil {
		t.Fatalf("read page 9: %v", err)
	}
	// Move pages 8-15 (page 9 present, the rest not) to a fresh place.
	dst := mmapAnon(t, 8)
	if err := mremapFixed(r.mem[8*PageSize:16*PageSize], dst); err != nil {
		t.Fatalf("mremap: %v", err)
	}
	r.m.disown(8, 16)
	// And pages 0-3 onto pages 24-27 of the same registered region: the
	// kernel reports the destination's UNMAP after the REMAP.
	if err := mremapFixed(r.mem[:4*PageSize], r.mem[24*PageSize:28*PageSize]); err != nil {
		t.Fatalf("mremap onto registered memory: %v", err)
	}
	r.m.disown(0, 4)
	if err := r.lz.Fill(context.Background(), 16*PageSize, nil); err != nil {
		t.Fatalf("Fill: %v", err)
	}
	// Moved pages keep their original content (fetched by original address).
	moved := &lazyRig{mem: dst}
	if err := <-moved.readPages(seq(0, 8), func(i int) []byte { return r.content(8 + i) }); err != nil {
		t.Errorf("moved pages 8-15: %v", err)
	}
	if err := <-r.readPages(seq(24, 28), func(i int) []byte { return r.content(i - 24) }); err != nil {
		t.Errorf("pages 0-3 moved onto 24-27: %v", err)
	}
	rest := append(seq(4, 8), append(seq(16, 24), seq(28, n)...)...)
	if err := <-r.readPages(rest, r.content); err != nil {
		t.Errorf("unmoved pages: %v", err)
	}
	if c := r.f.count(r.base + 24*PageSize); c != 0 {
		t.Errorf("overwritten page 24 fetched %d times", c)
	}
	if r.lz.Remaining() != 0 {
		t.Errorf("Remaining = %d after Fill", r.lz.Remaining())
	}
}

func TestLazyUnmap(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	const n = 32
	r := newLazyRig(t, n, PageSize)
	if err := munmapPart(r.mem[16*PageSize:]); err != nil {
		t.Fatalf("munmap: %v", err)
	}
	r.m.disown(16, n)
	// munmap returns after the Loop read UFFD_EVENT_UNMAP.
	r.eventsBarrier()
	if got, want := r.lz.Remaining(), uint64(16*PageSize); got != want {
		t.Errorf("Remaining after munmap = %d, want %d", got, want)
	}
	if err := r.lz.Fill(context.Background(), 64*PageSize, nil); err != nil {
		t.Fatalf("Fill: %v", err)
	}
	if err := <-r.readPages(seq(0, 16), r.content); err != nil {
		t.Errorf("remaining pages: %v", err)
	}
	for i := 16; i < n; i++ {
		if c := r.f.count(r.base + uint64(i)*PageSize); c != 0 {
			t.Errorf("unmapped page %d fetched %d times", i, c)
		}
	}
}

func TestLazyZeroRanges(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	mem := mmapAnon(t, 8)
	base := addrOf(mem)
	u := openAPI(t, unix.O_NONBLOCK, LazyFeatures)
	if _, err := u.Register(base, 8*PageSize, ModeMissing); err != nil {
		t.Fatalf("Register: %v", err)
	}
	f := &patFetcher{}
	lz, err := NewLazy(u, []Range{{base, 4 * PageSize}}, []Range{{base + 4*PageSize, 4 * PageSize}}, f, 8*PageSize)
	if err != nil {
		t.Fatalf("NewLazy: %v", err)
	}
	runLoop(t, lz, u)
	r := &lazyRig{mem: mem, base: base}
	zero := make([]byte, PageSize)
	want := func(i int) []byte {
		if i >= 4 {
			return zero
		}
		return r.content(i)
	}
	// One fault on page 1 fetches the whole 4-page range (batch 8 pages,
	// clipped to the range); zero pages are never fetched.
	if err := <-r.readPages([]int{1, 6, 0, 2, 3, 4, 5, 7}, want); err != nil {
		t.Fatalf("read: %v", err)
	}
	for i := 0; i < 8; i++ {
		if c, w := f.count(base+uint64(i)*PageSize), map[bool]int{true: 1, false: 0}[i < 4]; c != w {
			t.Errorf("page %d fetched %d times, want %d", i, c, w)
		}
	}
	select {
	case <-lz.Done():
	default:
		t.Errorf("Done not closed after every fetch page was faulted in")
	}
}

func TestLazyFetchErrorIsFatal(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	const n = 16
	r := newLazyRig(t, n, PageSize)
	r.wantRunErr = errFetch
	r.f.failAt = r.base + 5*PageSize
	if err := r.lz.Fill(context.Background(), 2*PageSize, nil); !errors.Is(err, errFetch) {
		t.Errorf("Fill: err = %v, want the fetch error", err)
	}
	// A fault on the failing page stops the Loop with the fetch error.
	readc := r.readPages([]int{5}, r.content)
	if err := r.runErr(); !errors.Is(err, errFetch) {
		t.Errorf("Loop.Run: err = %v, want the fetch error", err)
	}
	// Fail closed is the caller's job; here, closing the uffd releases
	// the reader with a zero page.
	r.u.Close()
	if err := <-readc; err == nil {
		t.Errorf("reader saw the right content although the fetch failed")
	}
}

func TestLazyFillCancel(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	r := newLazyRig(t, 8, PageSize)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := r.lz.Fill(ctx, PageSize, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Fill with cancelled ctx: err = %v", err)
	}
	if err := r.lz.Fill(context.Background(), 3*PageSize+1, nil); !errors.Is(err, unix.EINVAL) {
		t.Errorf("Fill with unaligned chunk: err = %v, want EINVAL", err)
	}
}

// TestLazyRemapEvents feeds Event the sequences mremap produces: on 6.18
// UNMAP(destination), REMAP, UNMAP(source); kernels that complete the
// REMAP before the destination's early unmap send UNMAP(destination)
// after the REMAP, which must not drop the moved tracking.
func TestLazyRemapEvents(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	u := openAPI(t, unix.O_NONBLOCK, LazyFeatures)
	const base = 0x10000000
	for _, tc := range []struct {
		name   string
		events []Msg
	}{
		{"kernel 6.18 order", []Msg{
			{Kind: MsgUnmap, Start: base + 24*PageSize, End: base + 28*PageSize},
			{Kind: MsgRemap, From: base, To: base + 24*PageSize, Len: 4 * PageSize},
			{Kind: MsgUnmap, Start: base, End: base + 4*PageSize},
		}},
		{"early unmap after remap", []Msg{
			{Kind: MsgRemap, From: base, To: base + 24*PageSize, Len: 4 * PageSize},
			{Kind: MsgUnmap, Start: base + 24*PageSize, End: base + 28*PageSize},
			{Kind: MsgUnmap, Start: base, End: base + 4*PageSize},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lz, err := NewLazy(u, []Range{{base, 32 * PageSize}}, nil, &patFetcher{}, PageSize)
			if err != nil {
				t.Fatalf("NewLazy: %v", err)
			}
			for _, m := range tc.events {
				if err := lz.Event(u, m); err != nil {
					t.Fatalf("Event(%v): %v", m, err)
				}
			}
			for i := uint64(0); i < 4; i++ {
				s := lz.spans.find(base + (24+i)*PageSize)
				if s == nil || s.src+(base+(24+i)*PageSize-s.addr) != base+i*PageSize {
					t.Errorf("page %d of the destination: span %+v, want content from %#x", 24+i, s, base+i*PageSize)
				}
			}
			if s := lz.spans.find(base); s != nil {
				t.Errorf("source still tracked: %+v", s)
			}
			if got, want := lz.Remaining(), uint64(28*PageSize); got != want {
				t.Errorf("Remaining = %#x, want %#x", got, want)
			}
		})
	}
}

func TestLazyFork(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	fork := func(t *testing.T) {
		t.Helper()
		// fork blocks until the Loop has read UFFD_EVENT_FORK.
		pid, errno := rawForkExit()
		if errno != 0 {
			t.Fatalf("fork: %v", errno)
		}
		var ws unix.WaitStatus
		if _, err := unix.Wait4(pid, &ws, 0, nil); err != nil || ws.ExitStatus() != 0 {
			t.Fatalf("wait child: %v, status %v", err, ws)
		}
	}
	t.Run("handler", func(t *testing.T) {
		r := newLazyRigFeatures(t, 4, PageSize, LazyFeatures|FeatureEventFork)
		children := make(chan error, 1)
		r.lz.OnFork(func(child *FD) error {
			// The child is exiting already; its uffd is still a uffd
			// (FromRaw checked) that the handler owns and closes.
			children <- child.Close()
			return nil
		})
		fork(t)
		r.eventsBarrier()
		select {
		case err := <-children:
			if err != nil {
				t.Errorf("close child uffd: %v", err)
			}
		default:
			t.Fatalf("fork handler not called")
		}
	})
	t.Run("no handler fails closed", func(t *testing.T) {
		r := newLazyRigFeatures(t, 4, PageSize, LazyFeatures|FeatureEventFork)
		r.wantRunErr = ErrNotSupported
		fork(t)
		if err := r.runErr(); !errors.Is(err, ErrNotSupported) {
			t.Errorf("Loop.Run after unhandled fork: %v, want ErrNotSupported", err)
		}
	})
}
