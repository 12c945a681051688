package checkpoint

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/checkpoint/inject"
	"github.com/cowmig/cowmig/checkpoint/procfs"
	"github.com/cowmig/cowmig/uffd"
)

// morph turns a stopped stub child into the checkpointed process. Every
// step runs injected syscalls in the child; nothing of the stub's own code
// runs again.
type morph struct {
	tr *inject.Process
	// x runs injected syscalls and memory accesses: tr, or the open
	// Batch inside batch().
	x       injector
	p       *image.Process
	img     *image.Image
	pages   *os.File
	o       RestoreOptions
	r       *Restored
	scratch uint64
	hole    uint64 // free in both layouts; scratch at its start
	// strOff is the next free byte of the scratch string area.
	strOff uint64
	// hostTids maps image thread index to host tid.
	hostTids []int
	// buf is writeRuns' buffer.
	buf []byte
}

// injector is what inject.Process and inject.Batch both offer.
type injector interface {
	Syscall(tid int, nr uintptr, args ...uintptr) (uintptr, error)
	ReadMem(addr uint64, buf []byte) error
	WriteMem(addr uint64, buf []byte) error
}

// batch runs f with every injection in one hand-off to the tracer thread
// (an injected syscall costs less than the hand-off). f must not call
// m.tr's other methods.
func (m *morph) batch(f func(context.Context) error) func(context.Context) error {
	return func(ctx context.Context) error {
		return m.tr.Batch(func(b *inject.Batch) error {
			m.x = b
			defer func() { m.x = m.tr }()
			return f(ctx)
		})
	}
}

// Scratch layout: [0, 64 KiB) structs and iovecs, [64 KiB, 1 MiB) strings.
const (
	scratchStrings = 64 << 10
	scratchSize    = 1 << 20
	holeSize       = 8 << 20 // scratch + room to park the vDSO
)

func (m *morph) run(ctx context.Context) error {
	steps := []struct {
		name string
		f    func(context.Context) error
	}{
		{"prepare address space", m.prepareSpace},
		{"map memory", m.batch(m.mapMemory)},
		{"register lazy memory", m.lazyMemory},
		{"restore mm fields", m.batch(m.mmFields)},
		{"restore fds", m.batch(m.fds)},
		{"restore threads", m.threads},
		{"restore signal handlers", m.batch(m.sigactions)},
		{"restore process attributes", m.batch(m.attrs)},
		{"restore credentials", m.batch(m.creds)},
		{"restore pending signals", m.batch(m.signals)},
	}
	for _, s := range steps {
		t := time.Now()
		if err := s.f(ctx); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
		m.r.Phases = append(m.r.Phases, Phase{s.name, time.Since(t)})
	}
	return nil
}

func (m *morph) sys(tid int, nr uintptr, args ...uintptr) (uintptr, error) {
	if tid == 0 {
		tid = m.tr.Pid()
	}
	return m.x.Syscall(tid, nr, args...)
}

// str writes s NUL-terminated into the scratch string area.
func (m *morph) str(s string) (uintptr, error) {
	if m.strOff == 0 || m.strOff+uint64(len(s))+1 > scratchSize {
		m.strOff = scratchStrings
	}
	a := m.scratch + m.strOff
	if err := m.x.WriteMem(a, append([]byte(s), 0)); err != nil {
		return 0, err
	}
	m.strOff += uint64(len(s)+1+7) &^ 7
	return uintptr(a), nil
}

// prepareSpace empties the child's address space except the vDSO, which
// it moves to the checkpointed address, and a scratch mapping placed in a
// hole of both layouts.
func (m *morph) prepareSpace(ctx context.Context) error {
	cur, err := procfs.Maps(m.tr.Pid())
	if err != nil {
		return err
	}
	hole := m.hole
	if m.scratch, err = m.tr.Scratch(); err != nil {
		return fmt.Errorf("scratch: %w", err)
	}
	sStart, sEnd, _ := m.tr.ScratchRange()
	if sStart < hole || sEnd > hole+holeSize/2 {
		return fmt.Errorf("scratch %#x-%#x outside the chosen hole %#x", sStart, sEnd, hole)
	}
	if _, err := m.tr.FindSyscallInsn(); err != nil {
		return fmt.Errorf("find syscall instruction in the vDSO: %w", err)
	}
	cur = withoutRange(cur, sStart, sEnd)
	var block []procfs.Mapping
	for _, c := range cur {
		switch c.Path {
		case "[vvar]", "[vvar_vclock]", "[vdso]":
			block = append(block, c)
			continue
		case "[vsyscall]":
			continue
		}
		if _, err := m.sys(0, unix.SYS_MUNMAP, uintptr(c.Start), uintptr(c.End-c.Start)); err != nil {
			return fmt.Errorf("unmap stub mapping %#x-%#x: %w", c.Start, c.End, err)
		}
	}
	want := m.img.VDSO
	if len(block) == 0 || len(block) != len(want) {
		return fmt.Errorf("vDSO: %d special mappings here, %d in the image: %w", len(block), len(want), ErrUnsupported)
	}
	from, to := block[0].Start, want[0].Start
	size := block[len(block)-1].End - from
	if from == to {
		return nil
	}
	if from < to+size && to < from+size {
		// Overlapping move: park the block in the hole first.
		park := hole + holeSize/2
		if err := m.moveBlock(block, from, park); err != nil {
			return err
		}
		for i := range block {
			block[i].Start += park - from
			block[i].End += park - from
		}
		from = park
	}
	if err := m.moveBlock(block, from, to); err != nil {
		return err
	}
	if _, err := m.tr.FindSyscallInsn(); err != nil {
		return fmt.Errorf("find syscall instruction in the moved vDSO: %w", err)
	}
	return nil
}

// moveBlock mremaps the vDSO mappings from base from to base to, keeping
// their relative layout.
func (m *morph) moveBlock(block []procfs.Mapping, from, to uint64) error {
	for _, b := range block {
		n := b.End - b.Start
		dst := to + (b.Start - from)
		got, err := m.sys(0, unix.SYS_MREMAP, uintptr(b.Start), uintptr(n), uintptr(n), unix.MREMAP_MAYMOVE|unix.MREMAP_FIXED, uintptr(dst))
		if err != nil {
			return fmt.Errorf("move %s %#x to %#x: %w", b.Path, b.Start, dst, err)
		}
		if uint64(got) != dst {
			return fmt.Errorf("move %s: landed at %#x, want %#x", b.Path, got, dst)
		}
		// The syscall instruction moved with the vDSO.
		if b.Path == "[vdso]" {
			if _, err := m.tr.FindSyscallInsn(); err != nil {
				return fmt.Errorf("find syscall instruction: %w", err)
			}
		}
	}
	return nil
}

// findHole returns a page-aligned range of size bytes free in both layouts.
func findHole(cur []procfs.Mapping, vmas []image.Vma, size uint64) (uint64, error) {
	busy := func(a uint64) bool {
		for _, c := range cur {
			if a < c.End && c.Start < a+size {
				return true
			}
		}
		for _, v := range vmas {
			if a < v.End && v.Start < a+size {
				return true
			}
		}
		return false
	}
	for a := uint64(1 << 32); a < 1<<46; a += size {
		if !busy(a) {
			return a, nil
		}
	}
	return 0, errors.New("no free range for scratch memory")
}

// mapMemory creates every mapping at its address and writes eager pages.
func (m *morph) mapMemory(ctx context.Context) error {
	// A library has four or five mappings: open each file once (every
	// injected syscall is a round trip to the tracee).
	files := map[fileKey]int{}
	defer func() {
		for _, fd := range files {
			m.sys(0, unix.SYS_CLOSE, uintptr(fd))
		}
	}()
	for _, v := range m.p.Vmas {
		switch v.Kind {
		case image.VmaVDSO, image.VmaVVar, image.VmaVVarVclock, image.VmaVsyscall:
			continue
		}
		if err := m.mapOne(v, files); err != nil {
			return fmt.Errorf("mapping %#x-%#x %s%s: %w", v.Start, v.End, v.Name, v.Path, err)
		}
	}
	return nil
}

// fileKey names a file opened in the clone for its mappings.
type fileKey struct {
	path string
	mode int
}

func (m *morph) mapOne(v image.Vma, files map[fileKey]int) error {
	eager := false
	for _, r := range v.Runs {
		eager = eager || r.Where == image.InPages
	}
	prot := v.Prot
	if eager && v.Shared {
		// /proc/pid/mem writes need a writable shared mapping.
		prot |= unix.PROT_READ | unix.PROT_WRITE
	}
	flags := unix.MAP_FIXED_NOREPLACE
	if v.Shared {
		flags |= unix.MAP_SHARED
	} else {
		flags |= unix.MAP_PRIVATE
	}
	fd := -1
	switch v.Kind {
	case image.VmaAnon, image.VmaShmem:
		flags |= unix.MAP_ANONYMOUS
		if v.GrowsDown {
			flags |= unix.MAP_GROWSDOWN
		}
	case image.VmaFile:
		mode := unix.O_RDONLY
		if v.Shared && v.Prot&unix.PROT_WRITE != 0 {
			mode = unix.O_RDWR
		}
		k := fileKey{v.Path, mode}
		if open, ok := files[k]; ok {
			fd = open
			break
		}
		path, err := m.str(v.Path)
		if err != nil {
			return err
		}
		tfd, err := m.sys(0, unix.SYS_OPENAT, uintptr(unix.AT_FDCWD&0xffffffff), path, uintptr(mode|unix.O_CLOEXEC), 0)
		if err != nil {
			return fmt.Errorf("open %s: %w", v.Path, err)
		}
		fd = int(tfd)
		files[k] = fd
	default:
		return fmt.Errorf("kind %q: %w", v.Kind, ErrUnsupported)
	}
	got, err := m.sys(0, unix.SYS_MMAP, uintptr(v.Start), uintptr(v.Len()), uintptr(prot), uintptr(flags), uintptr(fd), uintptr(v.Offset))
	if err != nil {
		return fmt.Errorf("mmap: %w", err)
	}
	if uint64(got) != v.Start {
		return fmt.Errorf("mmap landed at %#x", got)
	}
	if eager {
		if err := m.writeRuns(v); err != nil {
			return err
		}
	}
	if prot != v.Prot {
		if _, err := m.sys(0, unix.SYS_MPROTECT, uintptr(v.Start), uintptr(v.Len()), uintptr(v.Prot)); err != nil {
			return fmt.Errorf("mprotect: %w", err)
		}
	}
	for _, a := range v.Advice {
		if a == unix.MADV_DONTFORK || a == unix.MADV_WIPEONFORK || a == unix.MADV_DONTDUMP || a == unix.MADV_HUGEPAGE || a == unix.MADV_NOHUGEPAGE {
			if _, err := m.sys(0, unix.SYS_MADVISE, uintptr(v.Start), uintptr(v.Len()), uintptr(a)); err != nil {
				return fmt.Errorf("madvise %d: %w", a, err)
			}
		}
	}
	return nil
}

// writeRuns copies a mapping's eager pages from pages.img into the child.
func (m *morph) writeRuns(v image.Vma) error {
	if m.pages == nil {
		return fmt.Errorf("%w: eager pages but no %s", ErrBadImage, image.PagesFile)
	}
	for _, r := range v.Runs {
		if r.Where != image.InPages {
			continue
		}
		// One buffer per restore, no larger than needed: a fresh 4 MiB
		// per mapping cost milliseconds of page faults each.
		if want := min(4<<20, r.NPages*image.PageSize); uint64(len(m.buf)) < want {
			m.buf = make([]byte, want)
		}
		buf := m.buf
		for done := uint64(0); done < r.NPages*image.PageSize; {
			n := min(uint64(len(buf)), r.NPages*image.PageSize-done)
			if _, err := m.pages.ReadAt(buf[:n], int64(r.Off+done)); err != nil {
				return fmt.Errorf("read pages file at %d: %w", r.Off+done, err)
			}
			if err := m.x.WriteMem(r.Addr+done, buf[:n]); err != nil {
				return fmt.Errorf("write %#x+%#x: %w", r.Addr+done, n, err)
			}
			done += n
		}
	}
	return nil
}

// Features the clone's uffd asks for: the pager must see the clone drop,
// unmap and move memory so it never fills a page the clone discarded
// (uffd.LazyFeatures), and must see forks: a child inherits the missing
// pages and would read them as zero if nobody served it.
const cloneFeatures = uffd.LazyFeatures | uffd.FeatureEventFork

// lazyMemory registers MISSING faults on mappings with lazy runs and
// starts the pager: everything after this may touch lazy memory.
func (m *morph) lazyMemory(ctx context.Context) error {
	var ranges, zero []uffd.Range
	var vmas []image.Vma
	for _, v := range m.p.Vmas {
		lazy := false
		at := v.Start
		for _, r := range v.Runs {
			if r.Where != image.OnServer {
				continue
			}
			lazy = true
			if r.Addr > at {
				zero = append(zero, uffd.Range{Start: at, Len: r.Addr - at})
			}
			ranges = append(ranges, uffd.Range{Start: r.Addr, Len: r.NPages * image.PageSize})
			at = r.End()
		}
		if !lazy {
			continue
		}
		if at < v.End {
			zero = append(zero, uffd.Range{Start: at, Len: v.End - at})
		}
		vmas = append(vmas, v)
	}
	if len(vmas) == 0 {
		return nil
	}
	f, err := m.tr.NewUffd(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		return fmt.Errorf("create uffd in clone: %w", err)
	}
	u, err := uffd.FromFile(f) // dups f
	f.Close()
	if err != nil {
		return err
	}
	m.r.u = u
	if _, err := u.API(cloneFeatures); err != nil {
		return fmt.Errorf("uffd api: %w", err)
	}
	for _, v := range vmas {
		if _, err := u.Register(v.Start, v.Len(), uffd.ModeMissing); err != nil {
			return fmt.Errorf("register %#x+%#x: %w", v.Start, v.Len(), err)
		}
	}
	batch := m.o.FaultBatch
	if batch == 0 {
		batch = 64 << 10
	}
	fetch := fetcherFor{ctx: ctx, f: m.o.Fetcher, proc: m.p.ID}
	pg := &pager{r: m.r, ranges: ranges, zero: zero, fetch: fetch, batch: batch}
	if m.r.lazy, err = pg.newLazy(u); err != nil {
		return err
	}
	if m.r.loop, err = uffd.NewLoop(m.r.lazy); err != nil {
		return fmt.Errorf("fault loop: %w", err)
	}
	if err := m.r.loop.Add(u); err != nil {
		return fmt.Errorf("fault loop: %w", err)
	}
	m.r.pager = pg
	m.r.startPager()
	return nil
}

// fetcherFor adapts a PageFetcher to one process for uffd.Lazy.
type fetcherFor struct {
	ctx  context.Context
	f    PageFetcher
	proc uint32
}

func (f fetcherFor) Fetch(addr uint64, buf []byte) error { return f.f.Fetch(f.ctx, f.proc, addr, buf) }

// mmFields restores the mm_struct fields and the exe link (PR_SET_MM_MAP).
func (m *morph) mmFields(ctx context.Context) error {
	path, err := m.str(m.p.Exe)
	if err != nil {
		return err
	}
	exeFd, err := m.sys(0, unix.SYS_OPENAT, uintptr(unix.AT_FDCWD&0xffffffff), path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open exe %s: %w", m.p.Exe, err)
	}
	defer m.sys(0, unix.SYS_CLOSE, exeFd)
	auxvAddr := m.scratch + 4096
	var auxv []byte
	for _, w := range m.p.MM.Auxv {
		auxv = binary.LittleEndian.AppendUint64(auxv, w)
	}
	if err := m.x.WriteMem(auxvAddr, auxv); err != nil {
		return err
	}
	mm := m.p.MM
	var b []byte
	for _, w := range []uint64{mm.StartCode, mm.EndCode, mm.StartData, mm.EndData, mm.StartBrk, mm.Brk,
		mm.StartStack, mm.ArgStart, mm.ArgEnd, mm.EnvStart, mm.EnvEnd, auxvAddr} {
		b = binary.LittleEndian.AppendUint64(b, w)
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(len(auxv)))
	b = binary.LittleEndian.AppendUint32(b, uint32(exeFd))
	if err := m.x.WriteMem(m.scratch, b); err != nil {
		return err
	}
	const prSetMM, prSetMMMap = 35, 14
	if _, err := m.sys(0, unix.SYS_PRCTL, prSetMM, prSetMMMap, uintptr(m.scratch), uintptr(len(b)), 0); err != nil {
		return fmt.Errorf("prctl PR_SET_MM_MAP: %w", err)
	}
	return nil
}
