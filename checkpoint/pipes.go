package checkpoint

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// pipePair is a pin pipe: the engine reads r, the target writes w.
type pipePair struct{ r, w *os.File }

// newPipe makes a pin pipe of psz bytes. Sizing costs ~80 µs per pipe
// here (the ring is reallocated), which is why preparePipes makes them
// before the freeze.
func newPipe(psz int) (pipePair, error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC); err != nil {
		return pipePair{}, fmt.Errorf("create pin pipe: %w", err)
	}
	p := pipePair{os.NewFile(uintptr(fds[0]), "pin"), os.NewFile(uintptr(fds[1]), "pin-w")}
	if _, err := unix.FcntlInt(uintptr(fds[1]), unix.F_SETPIPE_SZ, psz); err != nil {
		p.r.Close()
		p.w.Close()
		return pipePair{}, fmt.Errorf("size pin pipe to %d bytes: %w", psz, err)
	}
	return p, nil
}

// preparePipes makes the pipes the dump will probably need, from the
// resident anonymous memory seen before the freeze (plus a margin). A
// shortfall is made up during the freeze.
func (d *dumper) preparePipes() {
	psz := uint64(d.pipeSize)
	var rss uint64
	for _, m := range d.preMaps {
		if m.IsAnon() && m.Read && !m.Shared {
			rss += m.Rss
		}
	}
	n := int(rss/psz) + 8
	for i := 0; i < n; i++ {
		p, err := newPipe(int(psz))
		if err != nil {
			return
		}
		d.pool = append(d.pool, p)
	}
}

// pipeFor gives pp a pipe, from the pool if one is left.
func (d *dumper) pipeFor(pp *pinPipe, psz int) error {
	var p pipePair
	if n := len(d.pool); n > 0 {
		p, d.pool = d.pool[n-1], d.pool[:n-1]
	} else {
		var err error
		if p, err = newPipe(psz); err != nil {
			return err
		}
	}
	pp.r, pp.w = p.r, p.w
	return nil
}

func (d *dumper) closePool() {
	for _, p := range d.pool {
		p.r.Close()
		p.w.Close()
	}
	d.pool = nil
}
