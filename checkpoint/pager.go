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

// newLazy builds the server for u, which follows forks.
func (p *pager) newLazy(u *uffd.FD) (*uffd.Lazy, error) {
	l, err := uffd.NewLazy(u, p.ranges, p.zero, p.fetch, p.batch)
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
