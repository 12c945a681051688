package checkpoint

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/checkpoint/inject"
	"github.com/cowmig/cowmig/uffd"
)

// ErrReleased is returned for requests to a released snapshot.
var ErrReleased = errors.New("snapshot released")

// ErrNotInSnapshot is returned for pages the snapshot does not hold.
var ErrNotInSnapshot = errors.New("page not in snapshot")

// Snapshot is the source side of a live (or full) dump: the pinned pages
// of the COW window, and their drained copies.
type Snapshot struct {
	proc uint32
	u    *uffd.FD // owned; set once, closed (idempotently) when the COW window closes
	loop *uffd.Loop
	// loopDone is closed when the loop's goroutine has returned.
	loopDone   chan struct{}
	windowOnce sync.Once
	// planned is set once segs, pipes and store are complete (before the
	// first pin); the fault loop, started earlier, reads them only after.
	planned atomic.Bool
	// segs are the pinned runs in address order, each inside one pipe.
	segs  []pinSeg
	pipes []*pinPipe
	// store holds drained pages (live mode), one page per pinned page, in
	// pipe order. Nil in full mode, where drains go to pages.img.
	store []byte
	// pages is pages.img (full mode only).
	pages     *os.File
	pagesBase uint64

	pagesLazy uint64
	wg        sync.WaitGroup // loop and drainer goroutines
	stop      chan struct{}  // closed by Release
	windowEnd chan struct{}  // closed when every pipe is drained and the uffd closed

	mu sync.Mutex // guards released and err, and the store's unmapping (see ReadPages)
	// released is set once by Release.
	released bool
	// err is the first drain error; the snapshot cannot serve after it.
	err error

	// moves maps addresses the target mremapped pages to back to their
	// snapshot addresses. Owned by the fault loop's goroutine: only Fault
	// and Event, which it runs, touch it.
	moves moveMap

	// shadow is the fork snapshot's shadow process (shadow.go); nil in a
	// uffd snapshot, which has u, loop and pipes instead. Set once before
	// the Snapshot is shared. shadowMu is held for reading around every
	// read of its memory, and for writing to kill it, so that a read
	// never uses its closed mem file and a released snapshot reports
	// ErrReleased, not a lost one. Lock order: shadowMu before mu.
	shadow   *inject.Process
	shadowMu sync.RWMutex
	// shadowGone is set (under shadowMu) once the shadow is killed.
	shadowGone bool
	// lost is closed once the shadow is dead and reaped (watchShadow).
	lost chan struct{}
	// shadowPidfd is a pidfd of the shadow and watchStop an eventfd that
	// ends its watcher (-1: none); closeAll closes them.
	shadowPidfd, watchStop int
}

// pinSeg is a run of pinned pages in one pipe, or of a shadow's pages.
type pinSeg struct {
	addr, end uint64
	pipe      int
	off       uint64 // offset of addr in the pipe's data
	// at is the offset of addr in the snapshot's pages laid end to end:
	// where a full dump puts it, after pagesBase, in pages.img.
	at uint64
}

// pinPipe is one pipe of pinned pages.
type pinPipe struct {
	mu sync.Mutex // guards r and the drain itself
	r  *os.File   // read end; nil once drained
	// base is the pipe's offset in the store (live) or in the drained part
	// of pages.img (full); n its bytes.
	base, n  uint64
	segs     []int       // indices in Snapshot.segs
	w        *os.File    // write end until it is installed in the target
	filled   atomic.Bool // vmsplice done
	drained  atomic.Bool
	released bool // guarded by mu
}

// newSnapshot creates the snapshot's uffd inside the target (it acts on
// the mm of its creator, DESIGN §3) and starts its fault loop. It runs
// while the target is frozen.
func (d *dumper) newSnapshot(proc uint32) (_ *Snapshot, err error) {
	s := &Snapshot{proc: proc, stop: make(chan struct{}), windowEnd: make(chan struct{})}
	defer func() {
		if err != nil {
			s.closeAll()
		}
	}()
	f, err := d.tr.NewUffd(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("create uffd in target: %w", err)
	}
	s.u, err = uffd.FromFile(f) // dups f
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("adopt uffd: %w", err)
	}
	if _, err := s.u.API(sourceFeatures); err != nil {
		return nil, fmt.Errorf("uffd api: %w", err)
	}
	// The loop runs from now on: the target's return from any injected
	// syscall may fault on protected memory (see Fault).
	if err := s.startLoop(); err != nil {
		return nil, err
	}
	return s, nil
}

// pin pins runs in pipes, by vmsplice run inside the target, once the
// mappings are write-protected. It runs while the target is frozen.
//
// The pins run after the protection, not beside it: measured at 1 GiB,
// the two side by side took as long as one after the other (both walk the
// same page tables, and the target runs while it splices). The plan (segs, pipes, store) is published with planned before
// the first pin; the fault loop reads it only after.
func (d *dumper) pin(s *Snapshot, p *image.Process, runs []pinRun) error {
	psz := uint64(d.pipeSize)
	// Split the runs into pipes of at most psz bytes and 1024 iovecs.
	var cur *pinPipe
	for _, r := range runs {
		addr, left := r.addr, r.npages*image.PageSize
		for left > 0 {
			if cur == nil || cur.n == psz || len(cur.segs) == 1024 {
				cur = &pinPipe{}
				if n := len(s.pipes); n > 0 {
					cur.base = s.pipes[n-1].base + s.pipes[n-1].n
				}
				s.pipes = append(s.pipes, cur)
			}
			n := min(left, psz-cur.n)
			cur.segs = append(cur.segs, len(s.segs))
			s.segs = append(s.segs, pinSeg{addr: addr, end: addr + n, pipe: len(s.pipes) - 1, off: cur.n, at: cur.base + cur.n})
			cur.n += n
			addr += n
			left -= n
		}
	}
	d.recordRuns(s, p)

	// The store must exist before the first pin: a fault during the
	// freeze (the kernel's rseq update) may drain a filled pipe.
	if d.o.Mode == image.ModeLive {
		total := uint64(0)
		if n := len(s.pipes); n > 0 {
			total = s.pipes[n-1].base + s.pipes[n-1].n
		}
		var err error
		s.store, err = unix.Mmap(-1, 0, int(total), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		if err != nil {
			return fmt.Errorf("map snapshot store of %d bytes: %w", total, err)
		}
		// Huge pages where the system allows them: the drains fill the
		// store in pipe-sized pieces, and a fault per 4 KiB of fresh
		// memory was most of a drain's cost. Only a hint.
		unix.Madvise(s.store, unix.MADV_HUGEPAGE)
	}
	s.planned.Store(true)
	if err := d.vmspliceAll(s, int(psz)); err != nil {
		return err
	}
	d.mark("pin")
	return nil
}

// recordRuns records s.segs in p's vmas: on the page server (live), or in
// pages.img, where the drain will put them (full).
func (d *dumper) recordRuns(s *Snapshot, p *image.Process) {
	for _, sg := range s.segs {
		vi := sort.Search(len(p.Vmas), func(i int) bool { return p.Vmas[i].End > sg.addr })
		run := image.Run{Addr: sg.addr, NPages: (sg.end - sg.addr) / image.PageSize, Where: image.OnServer}
		if d.o.Mode == image.ModeFull {
			run.Where, run.Off = image.InPages, d.pagesOff+sg.at
		}
		p.Vmas[vi].Runs = append(p.Vmas[vi].Runs, run)
		s.pagesLazy += run.NPages
	}
	if d.o.Mode == image.ModeFull {
		s.pages, s.pagesBase = d.pages, d.pagesOff
		d.img.Stats.PagesEager += s.pagesLazy // drained into pages.img
	} else {
		d.img.Stats.PagesLazy = s.pagesLazy
	}
	d.img.Stats.PagesTotal += s.pagesLazy
}

// protect registers vmas for write-protect faults and protects them. Every
// registration (which takes the mmap lock for writing) comes first: the
// protection of a large mapping holds it for reading for a while, and the
// frozen-time copies that run beside it (copyNow) read memory under the
// same lock, which a queued writer would hold up.
func (s *Snapshot) protect(vmas []image.Vma) error {
	for _, v := range vmas {
		if _, err := s.u.Register(v.Start, v.Len(), uffd.ModeWP); err != nil {
			return fmt.Errorf("register uffd-wp %#x+%#x: %w", v.Start, v.Len(), err)
		}
	}
	for _, v := range vmas {
		if err := s.u.WriteProtect(v.Start, v.Len(), true, false); err != nil {
			return fmt.Errorf("write-protect %#x+%#x: %w", v.Start, v.Len(), err)
		}
	}
	return nil
}

// vmspliceAll fills every pipe with its pages, by vmsplice(2) run inside
// the target: the pipe then holds references to the very pages, which
// survive munmap and MADV_DONTNEED (DESIGN §3). Write ends travel into the
// target in batches and are closed there after use.
func (d *dumper) vmspliceAll(s *Snapshot, psz int) error {
	scratch, err := d.tr.Scratch()
	if err != nil {
		return err
	}
	const batch = 250
	for first := 0; first < len(s.pipes); first += batch {
		last := min(first+batch, len(s.pipes))
		var ws []*os.File
		closeWs := func() {
			for _, w := range ws {
				w.Close()
			}
		}
		for _, pp := range s.pipes[first:last] {
			if err := d.pipeFor(pp, psz); err != nil {
				closeWs()
				return err
			}
			ws = append(ws, pp.w)
			pp.w = nil
		}
		tfds, err := d.tr.InstallFds(ws)
		closeWs()
		if err != nil {
			return fmt.Errorf("install pin pipes in target: %w", err)
		}
		// One hand-off to the tracer thread for the whole batch, and the
		// vmsplices of as many pipes as the scratch area holds in one
		// resume of the target: a ptrace round trip costs more than a
		// vmsplice of 4 MiB.
		spliceErr := d.tr.Batch(func(b *inject.Batch) error {
			pipes := s.pipes[first:last]
			for len(pipes) > 0 {
				var iov []byte
				var calls []inject.Call
				k := 0
				for ; k < len(pipes); k++ {
					need := uint64(len(iov)+16*len(pipes[k].segs)+63) + inject.CallTableSize(len(calls)+1)
					if k > 0 && need > inject.ScratchUserSize {
						break
					}
					at := scratch + uint64(len(iov))
					for _, si := range pipes[k].segs {
						sg := s.segs[si]
						iov = binary.LittleEndian.AppendUint64(iov, sg.addr)
						iov = binary.LittleEndian.AppendUint64(iov, sg.end-sg.addr)
					}
					calls = append(calls, inject.Call{Nr: unix.SYS_VMSPLICE, Args: [6]uintptr{
						uintptr(tfds[len(tfds)-len(pipes)+k]), uintptr(at), uintptr(len(pipes[k].segs)), unix.SPLICE_F_NONBLOCK}})
				}
				if err := b.WriteMem(scratch, iov); err != nil {
					return fmt.Errorf("write iovecs: %w", err)
				}
				table := (scratch + uint64(len(iov)) + 63) &^ 63
				rets, err := b.Syscalls(0, table, calls)
				if err != nil {
					return fmt.Errorf("vmsplice: %w", err)
				}
				for i, ret := range rets {
					pp := pipes[i]
					if e := int64(ret); e < 0 && e >= -4095 {
						return fmt.Errorf("vmsplice %d bytes: %w", pp.n, unix.Errno(-e))
					}
					if ret != pp.n {
						return fmt.Errorf("vmsplice pinned %d of %d bytes", ret, pp.n)
					}
					pp.filled.Store(true)
				}
				pipes = pipes[k:]
			}
			return nil
		})
		if err := d.closeInTarget(tfds); err != nil {
			return errors.Join(spliceErr, err)
		}
		if spliceErr != nil {
			return spliceErr
		}
	}
	return nil
}

// closeInTarget closes fds in the target, with close_range over runs of
// consecutive numbers.
func (d *dumper) closeInTarget(fds []int) error {
	sorted := append([]int(nil), fds...)
	sort.Ints(sorted)
	var errs []error
	for i := 0; i < len(sorted); {
		j := i
		for j+1 < len(sorted) && sorted[j+1] == sorted[j]+1 {
			j++
		}
		if _, err := d.tr.Syscall(0, unix.SYS_CLOSE_RANGE, uintptr(sorted[i]), uintptr(sorted[j]), 0); err != nil {
			errs = append(errs, fmt.Errorf("close fds %d-%d in target: %w", sorted[i], sorted[j], err))
		}
		i = j + 1
	}
	return errors.Join(errs...)
}

// startLoop starts the fault loop. It runs from before write protection
// is applied until Release.
func (s *Snapshot) startLoop() error {
	loop, err := uffd.NewLoop(s)
	if err != nil {
		return fmt.Errorf("start fault loop: %w", err)
	}
	if err := loop.Add(s.u); err != nil {
		loop.Close()
		return fmt.Errorf("start fault loop: %w", err)
	}
	s.loop = loop
	s.loopDone = make(chan struct{})
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer close(s.loopDone)
		if err := loop.Run(); err != nil {
			s.setErr(fmt.Errorf("fault loop: %w", err))
		}
	}()
	return nil
}

// startDrain starts the background drain of a live snapshot (the COW
// window); called once the target runs again.
func (s *Snapshot) startDrain() {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.drainAll(context.Background())
	}()
}

// drainAll drains every pipe, then closes the COW window.
func (s *Snapshot) drainAll(ctx context.Context) error {
	if s.shadow != nil {
		err := s.drainShadow(ctx)
		s.closeWindow()
		return err
	}
	var first error
	for i := range s.pipes {
		select {
		case <-s.stop:
			return ErrReleased
		default:
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := s.drain(i); err != nil && first == nil {
			first = err
		}
	}
	s.closeWindow()
	return first
}

// closeWindow ends the COW window: every page is saved, so the uffd goes.
func (s *Snapshot) closeWindow() {
	s.windowOnce.Do(func() {
		if s.loop != nil {
			s.loop.Stop()
			<-s.loopDone
			s.loop.Close() // its epoll fd and eventfd
		}
		// Nothing is protected any more. Close the uffd now: while it
		// is open the target's mremap waits for someone to read its
		// REMAP event.
		if s.u != nil { // nil for a shadow snapshot
			s.u.Close()
		}
		close(s.windowEnd)
	})
}

// WindowClosed is closed when the COW window has ended.
func (s *Snapshot) WindowClosed() <-chan struct{} { return s.windowEnd }

// drain copies pipe i out (into the store or pages.img) and unprotects its
// pages. A page's original is in its pipe until then, whatever the target
// did to the mapping, so this is the only place pages are saved.
func (s *Snapshot) drain(i int) error {
	pp := s.pipes[i]
	if pp.drained.Load() {
		return nil
	}
	pp.mu.Lock()
	defer pp.mu.Unlock()
	if pp.drained.Load() {
		return nil
	}
	if pp.released {
		return ErrReleased
	}
	var err error
	if s.store == nil && s.pages == nil {
		return fmt.Errorf("drain pin pipe %d: no store to drain into", i)
	}
	if s.store != nil {
		_, err = io.ReadFull(pp.r, s.store[pp.base:pp.base+pp.n])
	} else {
		buf := make([]byte, pp.n)
		if _, err = io.ReadFull(pp.r, buf); err == nil {
			_, err = s.pages.WriteAt(buf, int64(s.pagesBase+pp.base))
		}
	}
	pp.r.Close()
	pp.r = nil
	if err != nil {
		err = fmt.Errorf("drain pin pipe %d: %w", i, err)
		s.setErr(err)
	}
	pp.drained.Store(true)
	s.unprotect(pp)
	return err
}

// unprotect lifts write protection from a drained pipe's pages and wakes
// writers blocked on them. Ranges the target unmapped or moved meanwhile
// are no longer registered: fall back to page by page and ignore those.
func (s *Snapshot) unprotect(pp *pinPipe) {
	for _, si := range pp.segs {
		sg := s.segs[si]
		if err := s.u.WriteProtect(sg.addr, sg.end-sg.addr, false, false); err == nil {
			continue
		} else if errors.Is(err, uffd.ErrGone) || errors.Is(err, uffd.ErrClosed) {
			return
		}
		for a := sg.addr; a < sg.end; a += image.PageSize {
			s.u.WriteProtect(a, image.PageSize, false, false)
		}
	}
}

// Fault handles a write-protect fault: drain the page's pipe (which
// unprotects it). Implements uffd.Handler.
func (s *Snapshot) Fault(u *uffd.FD, m uffd.Msg) error {
	addr := m.Address &^ (image.PageSize - 1)
	orig := s.moves.origin(addr)
	if !s.planned.Load() {
		// Before any pin: only the kernel's rseq update (see below).
		u.WriteProtect(addr, image.PageSize, false, false)
		return nil
	}
	if i := s.findSeg(orig); i >= 0 {
		if !s.pipes[s.segs[i].pipe].filled.Load() {
			// Still frozen (every pipe is filled before the thaw): only
			// the kernel writes now, updating a thread's rseq area on
			// the way back from an injected syscall. Those fields are
			// the kernel's own and are rewritten after the restore, so
			// the write may land in the page the pipe pins.
			u.WriteProtect(addr, image.PageSize, false, false)
			return nil
		}
		s.drain(s.segs[i].pipe)
	}
	// Not pinned (zero at the snapshot instant), or drained meanwhile:
	// just lift the protection. Errors here mean the range is gone.
	u.WriteProtect(addr, image.PageSize, false, false)
	return nil
}

// Event implements uffd.Handler. The source asks only for REMAP: mremap
// moves write-protected pages, still pinned, to a new address where a
// write must be caught and traced back to the page's snapshot address.
func (s *Snapshot) Event(u *uffd.FD, m uffd.Msg) error {
	if m.Kind == uffd.MsgRemap {
		s.moves.move(m.From, m.To, m.Len)
	}
	return nil
}

func (s *Snapshot) findSeg(addr uint64) int {
	i := sort.Search(len(s.segs), func(i int) bool { return s.segs[i].end > addr })
	if i < len(s.segs) && s.segs[i].addr <= addr {
		return i
	}
	return -1
}

// ReadPages copies the snapshot's content of [addr, addr+len(buf)) of
// process proc into buf.
func (s *Snapshot) ReadPages(ctx context.Context, proc uint32, addr uint64, buf []byte) error {
	if proc != s.proc {
		return fmt.Errorf("process %d: %w", proc, ErrNotInSnapshot)
	}
	if addr%image.PageSize != 0 || len(buf)%image.PageSize != 0 {
		return fmt.Errorf("read %#x+%#x: unaligned: %w", addr, len(buf), ErrNotInSnapshot)
	}
	if s.shadow != nil {
		return s.readShadow(addr, buf)
	}
	for len(buf) > 0 {
		i := s.findSeg(addr)
		if i < 0 {
			return fmt.Errorf("read %#x: %w", addr, ErrNotInSnapshot)
		}
		sg := s.segs[i]
		if err := s.drain(sg.pipe); err != nil {
			return err
		}
		pp := s.pipes[sg.pipe]
		n := min(uint64(len(buf)), sg.end-addr)
		off := pp.base + sg.off + (addr - sg.addr)
		// The store is unmapped by Release under mu: copy under it.
		s.mu.Lock()
		if s.released || s.err != nil || s.store == nil {
			err := s.err
			s.mu.Unlock()
			if err != nil {
				return err
			}
			return ErrReleased
		}
		copy(buf[:n], s.store[off:off+n])
		s.mu.Unlock()
		buf = buf[n:]
		addr += n
	}
	return nil
}

// Proc is the page-server id of the snapshot's process.
func (s *Snapshot) Proc() uint32 { return s.proc }

// PagesLazy is the number of pages served by the page server.
func (s *Snapshot) PagesLazy() uint64 { return s.pagesLazy }

func (s *Snapshot) setErr(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
}

// Err is the first error that broke the snapshot, if any.
func (s *Snapshot) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Release ends the snapshot: the COW window closes (writers are released),
// pins are dropped and the store is freed. Safe to call more than once.
func (s *Snapshot) Release() {
	s.mu.Lock()
	if s.released {
		s.mu.Unlock()
		return
	}
	s.released = true
	s.mu.Unlock()
	close(s.stop)
	s.closeWindow()
	s.killShadow() // before the wait: it ends the shadow's watcher
	if s.shadow != nil && s.watchStop >= 0 {
		unix.Write(s.watchStop, []byte{1, 0, 0, 0, 0, 0, 0, 0}) // and so does this
	}
	s.wg.Wait()
	s.closeAll()
}

// closeAll frees every resource; the goroutines must be stopped.
func (s *Snapshot) closeAll() {
	if s.u != nil { // nil when newSnapshot failed early, and for a shadow
		s.u.Close() // also unregisters: blocked writers proceed
	}
	s.killShadow()
	if s.shadow != nil {
		for _, fd := range []*int{&s.shadowPidfd, &s.watchStop} {
			if *fd >= 0 {
				unix.Close(*fd)
				*fd = -1
			}
		}
	}
	for _, pp := range s.pipes {
		pp.mu.Lock()
		if pp.r != nil {
			pp.r.Close()
			pp.r = nil
		}
		pp.released = true
		pp.mu.Unlock()
	}
	if s.store != nil {
		s.mu.Lock()
		unix.Munmap(s.store)
		s.store = nil
		s.mu.Unlock()
	}
}
