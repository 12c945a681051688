package uffd

import (
	"bytes"
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// viewFetcher is a patFetcher that also offers views (ViewFetcher): of at
// most viewMax bytes, for even pages (counted from base) only, so that Fill takes both paths
// and meets views that end inside its chunk.
type viewFetcher struct {
	*patFetcher
	base  uint64 // of the region: pages are even or odd from there
	views atomic.Int64
}

const viewMax = 3 * PageSize

func (f *viewFetcher) FetchView(addr uint64, n int, fn func([]byte) error) (bool, error) {
	if ((addr-f.base)/PageSize)%2 == 1 {
		return false, nil
	}
	buf := make([]byte, min(n, viewMax))
	if err := f.Fetch(addr, buf); err != nil {
		return true, err
	}
	f.views.Add(1)
	err := fn(buf)
	// The view's memory is the fetcher's: Fill must be done with it now.
	clear(buf)
	return true, err
}

// TestLazyFillViews fills through a ViewFetcher while the process reads
// the top pages from the top down, and compares every page.
func TestLazyFillViews(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	inProcessFaults(t)
	const n = 64
	m := mmapOwned(t, n)
	base := addrOf(m.mem)
	u := openAPI(t, unix.O_NONBLOCK, LazyFeatures)
	if _, err := u.Register(base, n*PageSize, ModeMissing); err != nil {
		t.Fatalf("Register: %v", err)
	}
	f := &viewFetcher{patFetcher: &patFetcher{}, base: base}
	lz, err := NewLazy(u, []Range{{Start: base, Len: n * PageSize}}, nil, f, 2*PageSize)
	if err != nil {
		t.Fatalf("NewLazy: %v", err)
	}
	loop, err := NewLoop(lz)
	if err != nil {
		t.Fatalf("NewLoop: %v", err)
	}
	if err := loop.Add(u); err != nil {
		t.Fatalf("Add: %v", err)
	}
	runc := make(chan error, 1)
	go func() { runc <- loop.Run() }()
	defer func() {
		loop.Stop()
		if err := <-runc; err != nil {
			t.Errorf("Loop.Run: %v", err)
		}
		u.Close()
		loop.Close()
	}()

	readc := make(chan error, 1)
	go func() {
		for i := n - 1; i >= n-16; i-- {
			a := base + uint64(i)*PageSize
			if !bytes.Equal(m.mem[i*PageSize:(i+1)*PageSize], pageContent(a)) {
				readc <- fmt.Errorf("page %d differs", i)
				return
			}
		}
		readc <- nil
	}()
	if err := lz.Fill(context.Background(), 8*PageSize, nil); err != nil {
		t.Fatalf("Fill: %v", err)
	}
	if err := <-readc; err != nil {
		t.Fatalf("concurrent reader: %v", err)
	}
	if rem := lz.Remaining(); rem != 0 {
		t.Errorf("Remaining = %d after Fill", rem)
	}
	for i := 0; i < n; i++ {
		if !bytes.Equal(m.mem[i*PageSize:(i+1)*PageSize], pageContent(base+uint64(i)*PageSize)) {
			t.Errorf("page %d differs after Fill", i)
		}
	}
	if f.views.Load() == 0 {
		t.Error("Fill never used a view")
	}
}
