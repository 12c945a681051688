package checkpoint

import "sort"

// moveMap records where the target moved snapshot pages with mremap:
// ranges of current addresses and the snapshot address of their first
// page. Addresses not in a range are their own origin.
type moveMap struct {
	r []moved // sorted by at, not overlapping
}

type moved struct {
	at, n, orig uint64
}

// origin is the snapshot address of the page now at addr.
func (mm *moveMap) origin(addr uint64) uint64 {
	i := sort.Search(len(mm.r), func(i int) bool { return mm.r[i].at+mm.r[i].n > addr })
	if i < len(mm.r) && mm.r[i].at <= addr {
		return mm.r[i].orig + (addr - mm.r[i].at)
	}
	return addr
}

// move records that [from, from+n) now lives at [to, to+n).
func (mm *moveMap) move(from, to, n uint64) {
	// The pieces of the source range, with their origins.
	var pieces []moved
	for a := from; a < from+n; {
		i := sort.Search(len(mm.r), func(i int) bool { return mm.r[i].at+mm.r[i].n > a })
		switch {
		case i < len(mm.r) && mm.r[i].at <= a:
			e := mm.r[i]
			k := min(e.at+e.n, from+n) - a
			pieces = append(pieces, moved{to + (a - from), k, e.orig + (a - e.at)})
			a += k
		default:
			end := from + n
			if i < len(mm.r) && mm.r[i].at < end {
				end = mm.r[i].at
			}
			pieces = append(pieces, moved{to + (a - from), end - a, a})
			a = end
		}
	}
	// Both the source (moved away) and the destination (replaced) lose
	// their old entries.
	mm.cut(from, from+n)
	mm.cut(to, to+n)
	for _, p := range pieces {
		if p.orig != p.at {
			mm.r = append(mm.r, p)
		}
	}
	sort.Slice(mm.r, func(i, j int) bool { return mm.r[i].at < mm.r[j].at })
}

// cut removes [lo, hi) from every range.
func (mm *moveMap) cut(lo, hi uint64) {
	var out []moved
	for _, e := range mm.r {
		end := e.at + e.n
		if end <= lo || e.at >= hi {
			out = append(out, e)
			continue
		}
		if e.at < lo {
			out = append(out, moved{e.at, lo - e.at, e.orig})
		}
		if end > hi {
			out = append(out, moved{hi, end - hi, e.orig + (hi - e.at)})
		}
	}
	mm.r = out
}
