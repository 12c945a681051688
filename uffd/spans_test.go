package uffd

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// Pure logic: bitmaps and span bookkeeping, checked against a []bool model
// at boundary sizes.

var boundarySizes = []uint64{1, 63, 64, 65, 130}

func TestBitmapAgainstModel(t *testing.T) {
	for _, n := range boundarySizes {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			b := newBitmap(n)
			model := make([]bool, n)
			// A deterministic mix of ranges: empty, single bits, word
			// boundaries, the whole map.
			ranges := [][2]uint64{{0, 0}, {0, 1}, {n - 1, n}, {n / 2, n/2 + 1}, {min(62, n-1), min(66, n)}, {0, n}}
			for step, r := range ranges {
				lo, hi := r[0], r[1]
				var want uint64
				for i := lo; i < hi; i++ {
					if !model[i] {
						want++
					}
					model[i] = true
				}
				if got := b.setRange(lo, hi); got != want {
					t.Fatalf("step %d setRange(%d,%d) = %d newly set, want %d", step, lo, hi, got, want)
				}
				checkBitmap(t, b, model)
				if step == 2 {
					// Reset partially via a fresh map to test sparse states.
					b = newBitmap(n)
					model = make([]bool, n)
					for i := uint64(0); i < n; i += 3 {
						b.setRange(i, i+1)
						model[i] = true
					}
					checkBitmap(t, b, model)
				}
			}
		})
	}
}

func checkBitmap(t *testing.T, b bitmap, model []bool) {
	t.Helper()
	n := uint64(len(model))
	var set uint64
	for i := uint64(0); i < n; i++ {
		if b.get(i) != model[i] {
			t.Fatalf("bit %d = %v, want %v", i, b.get(i), model[i])
		}
		if model[i] {
			set++
		}
	}
	if got := b.count(0, n); got != set {
		t.Fatalf("count = %d, want %d", got, set)
	}
	for from := uint64(0); from <= n; from++ {
		for _, v := range []bool{false, true} {
			want := n
			for i := from; i < n; i++ {
				if model[i] == v {
					want = i
					break
				}
			}
			if got := b.next(from, n, v); got != want {
				t.Fatalf("next(%d, %d, %v) = %d, want %d", from, n, v, got, want)
			}
		}
	}
	for lo := uint64(0); lo <= n; lo += max(1, n/7) {
		for hi := lo; hi <= n; hi += max(1, n/5) {
			s := b.slice(lo, hi)
			for i := lo; i < hi; i++ {
				if s.get(i-lo) != model[i] {
					t.Fatalf("slice(%d,%d) bit %d = %v, want %v", lo, hi, i-lo, s.get(i-lo), model[i])
				}
			}
			if c := s.count(0, hi-lo); c != b.count(lo, hi) {
				t.Fatalf("slice(%d,%d) has %d bits set, source range %d (bits past the end leaked)", lo, hi, c, b.count(lo, hi))
			}
		}
	}
}

func TestNewSpanSetValidation(t *testing.T) {
	const a = 0x100000
	for _, tc := range []struct {
		name        string
		fetch, zero []Range
		ok          bool
	}{
		{"one page", []Range{{a, PageSize}}, nil, true},
		{"63 pages", []Range{{a, 63 * PageSize}}, nil, true},
		{"64 pages", []Range{{a, 64 * PageSize}}, nil, true},
		{"65 pages", []Range{{a, 65 * PageSize}}, nil, true},
		{"adjacent fetch and zero", []Range{{a, PageSize}}, []Range{{a + PageSize, PageSize}}, true},
		{"nothing", nil, nil, true},
		{"unaligned start", []Range{{a + 1, PageSize}}, nil, false},
		{"unaligned length", []Range{{a, PageSize + 1}}, nil, false},
		{"unaligned zero range", nil, []Range{{a, 100}}, false},
		{"empty", []Range{{a, 0}}, nil, false},
		{"wraps", []Range{{^uint64(0) - PageSize + 1, 2 * PageSize}}, nil, false},
		{"overlapping fetch ranges", []Range{{a, 2 * PageSize}, {a + PageSize, PageSize}}, nil, false},
		{"fetch overlaps zero", []Range{{a, 2 * PageSize}}, []Range{{a + PageSize, 4 * PageSize}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := newSpanSet(tc.fetch, tc.zero)
			if tc.ok && err != nil {
				t.Errorf("newSpanSet: %v", err)
			}
			if !tc.ok && !errors.Is(err, unix.EINVAL) {
				t.Errorf("newSpanSet: err = %v, want EINVAL", err)
			}
		})
	}
}

// pendingPages lists the pending pages of ss by walking nextPending with
// the given chunk, checking the walk's invariants on the way.
func pendingPages(t *testing.T, ss *spanSet, chunk uint64) []uint64 {
	t.Helper()
	var out []uint64
	var cursor uint64
	for {
		src, n, ok := ss.nextPending(cursor, chunk)
		if !ok {
			return out
		}
		if n == 0 || n > chunk || src < cursor || src%PageSize != 0 {
			t.Fatalf("nextPending(%#x, %d) = %#x, %d", cursor, chunk, src, n)
		}
		for i := uint64(0); i < n; i++ {
			out = append(out, src+i*PageSize)
		}
		cursor = src + n*PageSize
	}
}

func TestSpanFillWalk(t *testing.T) {
	const a = 0x200000
	for _, n := range boundarySizes {
		for _, chunk := range []uint64{1, 4, 64, 100} {
			t.Run(fmt.Sprintf("%d pages chunk %d", n, chunk), func(t *testing.T) {
				ss, err := newSpanSet([]Range{{a, n * PageSize}}, []Range{{a + (n+1)*PageSize, PageSize}})
				if err != nil {
					t.Fatal(err)
				}
				var want []uint64
				for i := uint64(0); i < n; i++ {
					want = append(want, a+i*PageSize)
				}
				if got := pendingPages(t, ss, chunk); !slices.Equal(got, want) {
					t.Fatalf("walk = %#x, want %#x", got, want)
				}
				// Mark the first, the last and a middle third local.
				ss.markLocal(a, a+PageSize)
				ss.markLocal(a+(n-1)*PageSize, a+n*PageSize)
				ss.markLocal(a+n/3*PageSize, a+2*n/3*PageSize)
				var rest []uint64
				for _, p := range want {
					i := (p - a) / PageSize
					if i != 0 && i != n-1 && !(i >= n/3 && i < 2*n/3) {
						rest = append(rest, p)
					}
				}
				if got := pendingPages(t, ss, chunk); !slices.Equal(got, rest) {
					t.Fatalf("walk after markLocal = %#x, want %#x", got, rest)
				}
				if ss.pending != uint64(len(rest)) {
					t.Fatalf("pending = %d, want %d", ss.pending, len(rest))
				}
				// Marking again, or marking the zero range, changes nothing.
				if k := ss.markLocal(a, a+PageSize) + ss.markLocal(a+(n+1)*PageSize, a+(n+2)*PageSize); k != 0 {
					t.Fatalf("re-marking counted %d pages", k)
				}
			})
		}
	}
}

func TestSpanSplitKeepsBits(t *testing.T) {
	const a = 0x300000
	for _, n := range boundarySizes {
		for k := uint64(1); k < n; k++ {
			ss, _ := newSpanSet([]Range{{a, n * PageSize}}, nil)
			for i := uint64(0); i < n; i += 5 {
				ss.markLocal(a+i*PageSize, a+(i+1)*PageSize)
			}
			before := ss.pending
			ss.cut(a + k*PageSize)
			if len(ss.byAddr) != 2 || len(ss.bySrc) != 2 {
				t.Fatalf("n=%d k=%d: %d spans after cut", n, k, len(ss.byAddr))
			}
			var sum uint64
			for i := uint64(0); i < n; i++ {
				s := ss.find(a + i*PageSize)
				if got, want := s.local.get((a+i*PageSize-s.addr)/PageSize), i%5 == 0; got != want {
					t.Fatalf("n=%d k=%d: page %d local=%v, want %v", n, k, i, got, want)
				}
			}
			for _, s := range ss.byAddr {
				if s.nlocal != s.local.count(0, s.npages) {
					t.Fatalf("n=%d k=%d: span nlocal %d, bitmap %d", n, k, s.nlocal, s.local.count(0, s.npages))
				}
				sum += s.pending()
			}
			if sum != before || ss.pending != before {
				t.Fatalf("n=%d k=%d: pending %d/%d after cut, want %d", n, k, sum, ss.pending, before)
			}
		}
	}
}

func TestFaultPlan(t *testing.T) {
	const a = 0x400000 // 4 MiB: aligned to every batch below
	ss, _ := newSpanSet([]Range{{a, 65 * PageSize}}, []Range{{a + 70*PageSize, PageSize}})
	ss.markLocal(a+10*PageSize, a+11*PageSize)
	for _, tc := range []struct {
		name   string
		page   uint64
		batch  uint64
		kind   faultKind
		at, np uint64 // first page index and page count of the run
	}{
		{"first page, batch 1", 0, 1, faultFetch, 0, 1},
		{"first page, batch 4", 0, 4, faultFetch, 0, 4},
		{"page 2, batch 4", 2, 4, faultFetch, 0, 4},
		{"last page, batch 4", 64, 4, faultFetch, 64, 1},
		{"page 63, batch 64", 63, 64, faultFetch, 11, 53},
		{"page 9, batch 16: stops before local page 10", 9, 16, faultFetch, 0, 10},
		{"page 12, batch 16: starts after local page 10", 12, 16, faultFetch, 11, 5},
		{"local page", 10, 16, faultZero, 0, 0},
		{"zero range", 70, 16, faultZero, 0, 0},
		{"untracked", 66, 16, faultZero, 0, 0},
		{"page 64, batch 128: clipped to the range", 64, 128, faultFetch, 11, 54},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kind, src, at, n := ss.faultPlan(a+tc.page*PageSize, tc.batch)
			if kind != tc.kind {
				t.Fatalf("kind = %d, want %d", kind, tc.kind)
			}
			if kind == faultFetch && (at != a+tc.at*PageSize || src != at || n != tc.np) {
				t.Errorf("run = src %#x at %#x n %d, want at page %d n %d", src, at, n, tc.at, tc.np)
			}
		})
	}
}

func TestSpanMoveAndDrop(t *testing.T) {
	const a = 0x800000
	ss, _ := newSpanSet([]Range{{a, 64 * PageSize}}, []Range{{a + 64*PageSize, 4 * PageSize}})
	ss.markLocal(a+8*PageSize, a+12*PageSize) // pages 8-11 local
	// Move pages 4-15 far away, onto a place that had nothing tracked.
	const to = 0x4000000
	if n := ss.move(a+4*PageSize, to, 12*PageSize); n != 0 {
		t.Fatalf("move dropped %d pending pages at an empty destination", n)
	}
	if ss.pending != 60 {
		t.Fatalf("pending after move = %d, want 60", ss.pending)
	}
	if ss.find(a+4*PageSize) != nil {
		t.Errorf("old place still tracked")
	}
	// Runs for source pages 2-13 now come in two places.
	runs := ss.pendingRuns(a+2*PageSize, 12, nil)
	want := []run{
		{addr: a + 2*PageSize, off: 0, n: 2},   // pages 2-3 stayed
		{addr: to, off: 2, n: 4},               // pages 4-7 moved
		{addr: to + 8*PageSize, off: 10, n: 2}, // pages 12-13 moved; 8-11 local
	}
	if !slices.Equal(runs, want) {
		t.Errorf("pendingRuns = %+v, want %+v", runs, want)
	}
	// Moving the zero range along keeps it a zero range.
	ss.move(a+64*PageSize, to+0x100000, 4*PageSize)
	if s := ss.find(to + 0x100000); s == nil || !s.zero {
		t.Errorf("zero range lost in move: %+v", s)
	}
	// Move pages 0-1 onto pages 20-21: the destination's two pending
	// pages are dropped.
	if n := ss.move(a, a+20*PageSize, 2*PageSize); n != 2 {
		t.Errorf("move onto tracked pages dropped %d, want 2", n)
	}
	if s := ss.find(a + 20*PageSize); s == nil || s.src != a {
		t.Errorf("page 20 now comes from %+v, want src %#x", s, a)
	}
	// Drop the middle of the moved block and a range partly outside.
	if n := ss.drop(to+PageSize, to+3*PageSize); n != 2 {
		t.Errorf("drop of 2 pending pages = %d", n)
	}
	if n := ss.drop(a+60*PageSize, a+80*PageSize); n != 4 {
		t.Errorf("drop of pages 60-79 = %d, want 4", n)
	}
	var sum uint64
	for _, s := range ss.byAddr {
		if !s.zero {
			sum += s.pending()
		}
	}
	if sum != ss.pending || ss.pending != 52 {
		t.Errorf("pending = %d, span sum %d, want 52", ss.pending, sum)
	}
	for i := 1; i < len(ss.byAddr); i++ {
		if ss.byAddr[i-1].end() > ss.byAddr[i].addr {
			t.Errorf("spans overlap after moves: %+v %+v", ss.byAddr[i-1], ss.byAddr[i])
		}
	}
}
