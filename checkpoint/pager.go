package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/cowmig/cowmig/uffd"
)

// pager owns the policy of the clone's lazy phase: one uffd.Lazy for the
// clone and one per child the clone forks while pages are still missing.
type pager struct {
	r      *Restored
	ranges []uffd.Range
	zero   []uffd.Range
	fetch  uffd.PageFetcher
	batch  int

	mu sync.Mutex // guards children
	// children are the forked children's uffds (owned) and servers.
	children []child
}

type child struct {
	u    *uffd.FD
	lazy *uffd.Lazy
}

// PageViewer is an optional interface of a PageFetcher that holds fetched
// pages in memory of its own (a readahead): the background fill then
// copies them into the clone straight from there (uffd.ViewFetcher),
// saving a copy per byte.
type PageViewer interface {
	// FetchView calls fn with process proc's snapshot content of
	// [addr, addr+m) for some 0 < m <= n, page aligned, if it holds that
	// page, and reports whether it did. data is valid only during fn; fn's
	// error is returned as is.
	FetchView(ctx context.Context, proc uint32, addr uint64, n int, fn func(data []byte) error) (bool, error)
}

// viewFetcherFor is fetcherFor for a PageFetcher that is a PageViewer.
type viewFetcherFor struct {
	fetcherFor
	v PageViewer
}

func (f viewFetcherFor) FetchView(addr uint64, n int, fn func([]byte) error) (bool, error) {
	return f.v.FetchView(f.ctx, f.proc, addr, n, fn)
}

// withViews adds FetchView to f when the fetcher under it offers it.
func withViews(f uffd.PageFetcher) uffd.PageFetcher {
	if ff, ok := f.(fetcherFor); ok {
		if v, ok := ff.f.(PageViewer); ok {
			return viewFetcherFor{fetcherFor: ff, v: v}
		}
	}
	return f
}

// newLazy builds the server for u, which follows forks.
func (p *pager) newLazy(u *uffd.FD) (*uffd.Lazy, error) {
	l, err := uffd.NewLazy(u, p.ranges, p.zero, withViews(p.fetch), p.batch)
	if err != nil {
		return nil, err
	}
	l.OnFork(p.onFork)
	return l, nil
}

// onFork serves a child forked during the lazy phase: its missing pages
// are the snapshot's too. The child starts with every range pending;
// pages it already has make the copies fail with "exists", which Lazy
// counts as done. Pages the parent discarded before the fork would be
// refilled in the child — a known gap (see the package notes).
func (p *pager) onFork(cu *uffd.FD) error {
	l, err := p.newLazy(cu)
	if err != nil {
		cu.Close()
		return err
	}
	if err := p.r.loop.AddWith(cu, l); err != nil {
		cu.Close()
		return fmt.Errorf("serve forked child: %w", err)
	}
	p.mu.Lock()
	p.children = append(p.children, child{u: cu, lazy: l})
	p.mu.Unlock()
	return nil
}

// fillChildren fills every child that is still alive (after the parent's
// fill, most short-lived children are gone).
func (p *pager) fillChildren(ctx context.Context) error {
	p.mu.Lock()
	cs := append([]child(nil), p.children...)
	p.mu.Unlock()
	for _, c := range cs {
		if err := c.lazy.Fill(ctx, 1<<20, nil); err != nil && !errors.Is(err, uffd.ErrGone) {
			return fmt.Errorf("fill forked child: %w", err)
		}
	}
	return nil
}

func (p *pager) closeChildren() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.children {
		c.u.Close()
	}
	p.children = nil
}
