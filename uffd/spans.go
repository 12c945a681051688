package uffd

import (
	"fmt"
	"math/bits"
	"slices"

	"golang.org/x/sys/unix"
)

// Pure range and bitmap arithmetic behind Lazy; no system calls here.

// Range is the page-aligned address range [Start, Start+Len).
type Range struct {
	Start, Len uint64
}

// End returns Start+Len.
func (r Range) End() uint64 { return r.Start + r.Len }

func (r Range) String() string { return fmt.Sprintf("%#x+%#x", r.Start, r.Len) }

// validate accepts non-empty, page-aligned ranges that do not wrap.
func (r Range) validate() error {
	switch {
	case r.Len == 0:
		return fmt.Errorf("range %v: empty: %w", r, unix.EINVAL)
	case r.Start%PageSize != 0 || r.Len%PageSize != 0:
		return fmt.Errorf("range %v: not page aligned: %w", r, unix.EINVAL)
	case r.Start+r.Len < r.Start:
		return fmt.Errorf("range %v: wraps: %w", r, unix.EINVAL)
	}
	return nil
}

func alignDown(a uint64) uint64 { return a &^ (PageSize - 1) }

func alignUp(a uint64) uint64 {
	if a%PageSize == 0 {
		return a
	}
	return alignDown(a) + PageSize
}

// bitmap holds one bit per page; bits past the last page are always zero.
type bitmap []uint64

func newBitmap(n uint64) bitmap { return make(bitmap, (n+63)/64) }

func (b bitmap) get(i uint64) bool { return b[i/64]&(1<<(i%64)) != 0 }

// setRange sets bits [lo, hi) and returns how many were clear before.
func (b bitmap) setRange(lo, hi uint64) uint64 {
	var n uint64
	for lo < hi {
		w, sh := lo/64, lo%64
		width := min(64-sh, hi-lo)
		mask := ^uint64(0) >> (64 - width) << sh
		n += uint64(bits.OnesCount64(mask &^ b[w]))
		b[w] |= mask
		lo += width
	}
	return n
}

// count returns the number of set bits in [lo, hi).
func (b bitmap) count(lo, hi uint64) uint64 {
	var n uint64
	for lo < hi {
		w, sh := lo/64, lo%64
		width := min(64-sh, hi-lo)
		mask := ^uint64(0) >> (64 - width) << sh
		n += uint64(bits.OnesCount64(b[w] & mask))
		lo += width
	}
	return n
}

// next returns the first bit in [from, limit) whose value is set, or limit.
func (b bitmap) next(from, limit uint64, set bool) uint64 {
	for from < limit {
		w, sh := from/64, from%64
		v := b[w]
		if !set {
			v = ^v
		}
		v >>= sh
		if v != 0 {
			return min(from+uint64(bits.TrailingZeros64(v)), limit)
		}
		from += 64 - sh
	}
	return limit
}

// word returns the 64 bits starting at bit at (bits past the map read 0).
func (b bitmap) word(at uint64) uint64 {
	w, sh := at/64, at%64
	v := b[w] >> sh
	if sh != 0 && int(w)+1 < len(b) {
		v |= b[w+1] << (64 - sh)
	}
	return v
}

// slice returns a copy of bits [lo, hi), renumbered from 0.
func (b bitmap) slice(lo, hi uint64) bitmap {
	n := hi - lo
	out := newBitmap(n)
	for i := range out {
		out[i] = b.word(lo + uint64(i)*64)
	}
	if r := n % 64; r != 0 {
		out[len(out)-1] &= 1<<r - 1
	}
	return out
}

// span is one tracked piece of memory. src is where its content comes
// from (the address at checkpoint time), addr where it is now; they
// differ after the process moved it with mremap.
type span struct {
	addr, src uint64
	npages    uint64
	zero      bool   // must read as zero; never fetched, local is nil
	local     bitmap // fetch spans: bit i set = page i needs no fetch
	nlocal    uint64
}

func (s *span) end() uint64     { return s.addr + s.npages*PageSize }
func (s *span) pending() uint64 { return s.npages - s.nlocal }

// splitAt cuts s at page index k (0 < k < npages) into s and the returned
// tail.
func (s *span) splitAt(k uint64) *span {
	t := &span{addr: s.addr + k*PageSize, src: s.src + k*PageSize, npages: s.npages - k, zero: s.zero}
	if !s.zero {
		t.local = s.local.slice(k, s.npages)
		t.nlocal = t.local.count(0, t.npages)
		s.local = s.local.slice(0, k)
		s.nlocal -= t.nlocal
	}
	s.npages = k
	return t
}

// run is a contiguous piece of a fetched buffer and where it goes now:
// n pages at addr come from buffer pages [off, off+n).
type run struct {
	addr, off, n uint64
}

// spanSet tracks all spans of one Lazy. Spans never overlap. It is not
// safe for concurrent use: Lazy guards it with Lazy.mu.
type spanSet struct {
	byAddr  []*span // every span, sorted by addr
	bySrc   []*span // fetch spans, sorted by src
	pending uint64  // pages of fetch spans not yet local
}

func newSpanSet(fetch, zero []Range) (*spanSet, error) {
	ss := &spanSet{}
	for i, rs := range [][]Range{fetch, zero} {
		for _, r := range rs {
			if err := r.validate(); err != nil {
				return nil, err
			}
			s := &span{addr: r.Start, src: r.Start, npages: r.Len / PageSize, zero: i == 1}
			if !s.zero {
				s.local = newBitmap(s.npages)
				ss.pending += s.npages
			}
			ss.byAddr = append(ss.byAddr, s)
		}
	}
	slices.SortFunc(ss.byAddr, func(a, b *span) int { return cmpU64(a.addr, b.addr) })
	for i := 1; i < len(ss.byAddr); i++ {
		if p, s := ss.byAddr[i-1], ss.byAddr[i]; p.end() > s.addr {
			return nil, fmt.Errorf("ranges %#x+%#x and %#x+%#x overlap: %w",
				p.addr, p.npages*PageSize, s.addr, s.npages*PageSize, unix.EINVAL)
		}
	}
	ss.reindex()
	return ss, nil
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// reindex rebuilds the orderings after spans were split, moved or dropped.
func (ss *spanSet) reindex() {
	slices.SortFunc(ss.byAddr, func(a, b *span) int { return cmpU64(a.addr, b.addr) })
	ss.bySrc = ss.bySrc[:0]
	for _, s := range ss.byAddr {
		if !s.zero {
			ss.bySrc = append(ss.bySrc, s)
		}
	}
	slices.SortFunc(ss.bySrc, func(a, b *span) int { return cmpU64(a.src, b.src) })
}

// find returns the span containing addr, or nil.
func (ss *spanSet) find(addr uint64) *span {
	i, _ := slices.BinarySearchFunc(ss.byAddr, addr, func(s *span, a uint64) int {
		if s.end() <= a {
			return -1
		}
		if s.addr > a {
			return 1
		}
		return 0
	})
	if i < len(ss.byAddr) && ss.byAddr[i].addr <= addr && addr < ss.byAddr[i].end() {
		return ss.byAddr[i]
	}
	return nil
}

// cut makes addr a span boundary if it falls strictly inside a span.
// Callers reindex afterwards.
func (ss *spanSet) cut(addr uint64) {
	s := ss.find(addr)
	if s == nil || s.addr == addr {
		return
	}
	ss.byAddr = append(ss.byAddr, s.splitAt((addr-s.addr)/PageSize))
	ss.reindex()
}

// markLocal marks the fetch pages in [lo, hi) (current addresses, page
// aligned) local and returns how many were pending.
func (ss *spanSet) markLocal(lo, hi uint64) uint64 {
	var n uint64
	i, _ := slices.BinarySearchFunc(ss.byAddr, lo, func(s *span, a uint64) int { return cmpU64(s.end(), a+1) })
	for ; i < len(ss.byAddr) && ss.byAddr[i].addr < hi; i++ {
		s := ss.byAddr[i]
		if s.zero || s.end() <= lo {
			continue
		}
		a, b := max(lo, s.addr), min(hi, s.end())
		k := s.local.setRange((a-s.addr)/PageSize, (b-s.addr)/PageSize)
		s.nlocal += k
		n += k
	}
	ss.pending -= n
	return n
}

// drop forgets [lo, hi) and returns how many pending pages it held.
func (ss *spanSet) drop(lo, hi uint64) uint64 {
	if lo >= hi {
		return 0
	}
	ss.cut(lo)
	ss.cut(hi)
	var n uint64
	kept := ss.byAddr[:0]
	for _, s := range ss.byAddr {
		if s.addr >= lo && s.end() <= hi {
			if !s.zero {
				n += s.pending()
			}
			continue
		}
		kept = append(kept, s)
	}
	clear(ss.byAddr[len(kept):])
	ss.byAddr = kept
	ss.pending -= n
	ss.reindex()
	return n
}

// move follows mremap: [from, from+length) now lives at [to, to+length).
// Whatever was tracked at the destination was unmapped by the kernel
// before the move and is dropped first. It returns the pending pages so
// dropped.
func (ss *spanSet) move(from, to, length uint64) uint64 {
	n := ss.drop(to, to+length)
	ss.cut(from)
	ss.cut(from + length)
	for _, s := range ss.byAddr {
		if s.addr >= from && s.end() <= from+length {
			s.addr = s.addr - from + to
		}
	}
	ss.reindex()
	return n
}

// findSrc returns the index in bySrc of the first span ending after src.
func (ss *spanSet) findSrc(src uint64) int {
	i, _ := slices.BinarySearchFunc(ss.bySrc, src, func(s *span, a uint64) int {
		return cmpU64(s.src+s.npages*PageSize, a+1)
	})
	return i
}

// nextPending returns the first run of at most maxPages pending pages at
// or after source address cursor, in source order, as a source address
// and a page count. Runs do not cross spans.
func (ss *spanSet) nextPending(cursor, maxPages uint64) (src, n uint64, ok bool) {
	for i := ss.findSrc(cursor); i < len(ss.bySrc); i++ {
		s := ss.bySrc[i]
		if s.pending() == 0 {
			continue
		}
		var from uint64
		if cursor > s.src {
			from = (cursor - s.src) / PageSize
		}
		k := s.local.next(from, s.npages, false)
		if k == s.npages {
			continue
		}
		e := s.local.next(k, min(s.npages, k+maxPages), true)
		return s.src + k*PageSize, e - k, true
	}
	return 0, 0, false
}

// pendingRuns maps the source range [src, src+npages pages) to the
// current addresses of its pages that are still pending.
func (ss *spanSet) pendingRuns(src, npages uint64, out []run) []run {
	end := src + npages*PageSize
	for i := ss.findSrc(src); i < len(ss.bySrc) && ss.bySrc[i].src < end; i++ {
		s := ss.bySrc[i]
		lo := (max(src, s.src) - s.src) / PageSize
		hi := (min(end, s.src+s.npages*PageSize) - s.src) / PageSize
		for k := s.local.next(lo, hi, false); k < hi; {
			e := s.local.next(k, hi, true)
			r := run{addr: s.addr + k*PageSize, off: (s.src + k*PageSize - src) / PageSize, n: e - k}
			if j := len(out) - 1; j >= 0 && out[j].addr+out[j].n*PageSize == r.addr && out[j].off+out[j].n == r.off {
				out[j].n += r.n
			} else {
				out = append(out, r)
			}
			k = s.local.next(e, hi, false)
		}
	}
	return out
}

// faultKind says how Lazy resolves a fault.
type faultKind int

const (
	faultFetch faultKind = iota // fetch the run and copy it
	faultZero                   // zero span, page already local, or untracked: map the zero page
)

// faultPlan decides how to serve a fault at page addr. For faultFetch it
// returns the run of pending pages around addr inside the batch-aligned
// window of batchPages pages, clipped to the span: source address, current
// address and page count.
func (ss *spanSet) faultPlan(addr, batchPages uint64) (kind faultKind, src, at, n uint64) {
	s := ss.find(addr)
	if s == nil || s.zero {
		return faultZero, 0, 0, 0
	}
	i := (addr - s.addr) / PageSize
	if s.local.get(i) {
		return faultZero, 0, 0, 0
	}
	window := batchPages * PageSize
	wlo := max(s.addr, addr-addr%window)
	whi := min(s.end(), addr-addr%window+window)
	if whi <= wlo { // the window's end wrapped
		whi = s.end()
	}
	lo, hi := (wlo-s.addr)/PageSize, (whi-s.addr)/PageSize
	// Extend left from i while pages are pending.
	start := i
	for start > lo && !s.local.get(start-1) {
		start--
	}
	end := s.local.next(i, hi, true)
	return faultFetch, s.src + start*PageSize, s.addr + start*PageSize, end - start
}
