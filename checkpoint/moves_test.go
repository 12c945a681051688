package checkpoint

import "testing"

func TestMoveMap(t *testing.T) {
	const P = 4096
	var mm moveMap
	check := func(addr, want uint64) {
		t.Helper()
		if got := mm.origin(addr); got != want {
			t.Fatalf("origin(%#x) = %#x, want %#x (map %+v)", addr, got, want, mm.r)
		}
	}
	check(10*P, 10*P)
	mm.move(10*P, 100*P, 4*P) // [10,14) → [100,104)
	check(100*P, 10*P)
	check(103*P, 13*P)
	check(104*P, 104*P)
	check(10*P, 10*P)          // moved away: untracked now
	mm.move(101*P, 200*P, 2*P) // part of the moved range moves again
	check(200*P, 11*P)
	check(201*P, 12*P)
	check(100*P, 10*P)
	check(103*P, 13*P)
	check(101*P, 101*P)
	mm.move(50*P, 99*P, 3*P) // overwrites [99,102): 100 is gone
	check(99*P, 50*P)
	check(100*P, 51*P)
	check(101*P, 52*P)
	check(103*P, 13*P)
	mm.move(99*P, 99*P+1<<30, 6*P) // straddles a tracked and an untracked part
	check(99*P+1<<30, 50*P)
	check(99*P+1<<30+4*P, 13*P)
	check(99*P+1<<30+5*P, 104*P)
}
