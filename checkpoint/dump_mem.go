package checkpoint

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/checkpoint/procfs"
	"github.com/cowmig/cowmig/uffd"
)

// memClass says how a mapping's contents enter the snapshot.
type memClass int

const (
	// classSkip: nothing to copy (shared file mappings: the file is the
	// content; the vDSO and vvar pages: the kernel provides them).
	classSkip memClass = iota
	// classPin: private anonymous memory. Live and full dumps
	// write-protect it and pin its populated pages in pipes; a stop dump
	// copies it while frozen.
	classPin
	// classCopy: copied while frozen: the anonymous (COW) pages of private
	// file mappings (sync WP rejects them, DESIGN §3), shared anonymous
	// memory and unreadable anonymous memory (vmsplice cannot pin it).
	classCopy
)

// Linux madvise values re-applied on restore, by smaps VmFlags mnemonic.
var adviceByFlag = map[string]int{
	"hg": unix.MADV_HUGEPAGE,
	"nh": unix.MADV_NOHUGEPAGE,
	"dd": unix.MADV_DONTDUMP,
	"dc": unix.MADV_DONTFORK,
	"wf": unix.MADV_WIPEONFORK,
}

// pinRun is a run of populated pages of a classPin mapping.
type pinRun struct {
	vma    int // index in Process.Vmas
	addr   uint64
	npages uint64
}

// memory builds p.Vmas, copies what must be copied now and, for live and
// full dumps, write-protects and pins the rest.
func (d *dumper) memory(p *image.Process) (*Snapshot, error) {
	maps, err := d.frozenMaps()
	if err != nil {
		return nil, fmt.Errorf("read maps: %w", err)
	}
	d.mark("maps")
	pm, err := procfs.OpenPagemap(d.pid)
	if err != nil {
		return nil, fmt.Errorf("open pagemap: %w", err)
	}
	defer pm.Close()
	type described struct {
		m     procfs.Mapping
		v     image.Vma
		class memClass
	}
	var ds []described
	var wpVmas []image.Vma
	// fork: a shadow process keeps the snapshot (shadow.go); nothing is
	// write-protected or pinned.
	fork := d.o.Mode != image.ModeStop && d.o.COW == COWFork
	for _, m := range maps {
		v, class, err := d.describe(m)
		if err != nil {
			return nil, err
		}
		if v.Kind == image.VmaVsyscall {
			continue
		}
		if v.Kind == image.VmaVDSO || v.Kind == image.VmaVVar || v.Kind == image.VmaVVarVclock {
			d.img.VDSO = append(d.img.VDSO, v)
		}
		if class == classPin && fork && (m.HasFlag("dc") || m.HasFlag("wf")) {
			// MADV_DONTFORK or MADV_WIPEONFORK: the shadow has no copy.
			class = classCopy
		}
		ds = append(ds, described{m, v, class})
		if class == classPin && d.o.Mode != image.ModeStop && !fork {
			wpVmas = append(wpVmas, v)
		}
	}
	// Live and full dumps write-protect the anonymous memory while the
	// page map is scanned: the scan reads the target's page tables from
	// this process and the protection rewrites them in the kernel, with
	// the target stopped, so they share nothing but the page table locks.
	// (The pins must not overlap the protection: see pin.)
	var s *Snapshot
	var wpDone chan error
	if len(wpVmas) > 0 {
		if s, err = d.newSnapshot(p.ID); err != nil {
			return nil, err
		}
		d.mark("uffd")
		wpDone = make(chan error, 1)
		go func() { wpDone <- s.protect(wpVmas) }()
	}
	ok := false
	defer func() {
		if !ok && s != nil {
			if wpDone != nil {
				<-wpDone
			}
			s.Release() // stops the fault loop too
		}
	}()

	var pins []pinRun
	// toCopy are the regions of p.Vmas[vma] copied while frozen.
	type toCopy struct {
		vma     int
		regions []procfs.PageRegion
	}
	var copies []toCopy
	for _, dd := range ds {
		v, class := dd.v, dd.class
		if class == classSkip {
			p.Vmas = append(p.Vmas, v)
			continue
		}
		regions, err := populated(pm, dd.m, class)
		if err != nil {
			return nil, err
		}
		if class == classPin && d.o.Mode != image.ModeStop {
			for _, r := range regions {
				pins = append(pins, pinRun{vma: len(p.Vmas), addr: r.Start, npages: (r.End - r.Start) / image.PageSize})
			}
			p.Vmas = append(p.Vmas, v)
			continue
		}
		if class == classCopy && v.Kind == image.VmaShmem {
			// Shared memory pages need not be mapped here to exist:
			// copy the whole mapping and keep the non-zero pages.
			regions = []procfs.PageRegion{{Start: dd.m.Start, End: dd.m.End}}
		}
		copies = append(copies, toCopy{len(p.Vmas), regions})
		p.Vmas = append(p.Vmas, v)
	}
	d.mark("scan")
	if s != nil {
		// The copies read the target's memory, which the protection
		// slows down many times over (measured): let it finish first.
		err = <-wpDone
		wpDone = nil
		if err != nil {
			return nil, err
		}
		d.mark("writeprotect")
	}
	for _, c := range copies {
		v := &p.Vmas[c.vma]
		for _, r := range c.regions {
			runs, err := d.copyNow(r.Start, r.End, v.Kind == image.VmaShmem)
			if err != nil {
				return nil, err
			}
			v.Runs = append(v.Runs, runs...)
		}
	}
	for _, v := range p.Vmas {
		for _, r := range v.Runs {
			d.img.Stats.PagesEager += r.NPages
		}
	}
	d.img.Stats.PagesTotal = d.img.Stats.PagesEager
	d.mark("copy")
	if fork {
		if len(pins) == 0 {
			ok = true
			return nil, nil
		}
		s, err := d.shadowSnapshot(p, pins, pm)
		if err != nil {
			return nil, err
		}
		ok = true
		return s, nil
	}
	if s == nil {
		ok = true
		return nil, nil
	}
	if len(pins) == 0 {
		s.Release()
		ok = true
		return nil, nil
	}
	if err := d.pin(s, p, pins); err != nil {
		return nil, err
	}
	ok = true
	return s, nil
}

// frozenMaps reads the frozen target's mappings. smaps, which has the
// VmFlags, walks every page table to count RSS (~20 ms per GiB), so it is
// read before the freeze (d.preMaps) and only the cheap maps file now; a
// mapping that appeared or changed in between makes us pay for smaps.
func (d *dumper) frozenMaps() ([]procfs.Mapping, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", d.pid))
	if err != nil {
		return nil, err
	}
	maps, err := procfs.ParseSmaps(b)
	if err != nil {
		return nil, err
	}
	// The injector's scratch mapping is new since the pre-read, and not
	// the target's.
	s, e, hasScratch := d.tr.ScratchRange()
	if hasScratch {
		maps = withoutRange(maps, s, e)
	}
	type key struct {
		start, end, off uint64
		r, w, x, s      bool
		path            string
	}
	k := func(m procfs.Mapping) key {
		return key{m.Start, m.End, m.Offset, m.Read, m.Write, m.Exec, m.Shared, m.Path}
	}
	pre := make(map[key]procfs.Mapping, len(d.preMaps))
	for _, m := range d.preMaps {
		pre[k(m)] = m
	}
	for i := range maps {
		m, ok := pre[k(maps[i])]
		if !ok {
			full, err := procfs.Maps(d.pid)
			if err == nil && hasScratch {
				full = withoutRange(full, s, e)
			}
			return full, err
		}
		// Rss is from before the freeze: only a hint (see populated).
		maps[i].VmFlags, maps[i].Rss = m.VmFlags, m.Rss
	}
	return maps, nil
}

// withoutRange cuts [start, end) — the injector's scratch mapping, which
// the kernel may have merged with a neighbour — out of maps.
func withoutRange(maps []procfs.Mapping, start, end uint64) []procfs.Mapping {
	var out []procfs.Mapping
	for _, m := range maps {
		if m.End <= start || m.Start >= end {
			out = append(out, m)
			continue
		}
		if m.Start < start {
			lo := m
			lo.End = start
			out = append(out, lo)
		}
		if m.End > end {
			hi := m
			if hi.IsFile() {
				hi.Offset += end - m.Start
			}
			hi.Start = end
			out = append(out, hi)
		}
	}
	return out
}

// describe turns one mapping into its image form and class.
func (d *dumper) describe(m procfs.Mapping) (image.Vma, memClass, error) {
	v := image.Vma{Start: m.Start, End: m.End, Shared: m.Shared, GrowsDown: m.HasFlag("gd")}
	if m.Read {
		v.Prot |= unix.PROT_READ
	}
	if m.Write {
		v.Prot |= unix.PROT_WRITE
	}
	if m.Exec {
		v.Prot |= unix.PROT_EXEC
	}
	for _, f := range m.VmFlags {
		if a, ok := adviceByFlag[f]; ok {
			v.Advice = append(v.Advice, a)
		}
	}
	where := fmt.Sprintf("pid %d mapping %#x-%#x %s", d.pid, m.Start, m.End, m.Path)
	if (m.HasFlag("io") || m.HasFlag("pf")) && !m.IsSpecial() {
		return v, classSkip, fmt.Errorf("%s: device (VM_IO/VM_PFNMAP) mapping: %w", where, ErrUnsupported)
	}
	switch {
	case m.Path == "[vdso]":
		v.Kind = image.VmaVDSO
		return v, classSkip, nil
	case m.Path == "[vvar]":
		v.Kind = image.VmaVVar
		return v, classSkip, nil
	case m.Path == "[vvar_vclock]":
		v.Kind = image.VmaVVarVclock
		return v, classSkip, nil
	case m.Path == "[vsyscall]":
		v.Kind = image.VmaVsyscall
		return v, classSkip, nil
	case m.IsSpecial():
		return v, classSkip, fmt.Errorf("%s: special mapping: %w", where, ErrUnsupported)
	case m.IsSysV():
		return v, classSkip, fmt.Errorf("%s: SysV shared memory: %w", where, ErrUnsupported)
	case m.IsMemfd() || (m.Shared && (m.Path == "" || m.Path == "/dev/zero (deleted)" || strings.HasPrefix(m.Path, "[anon_shmem:"))):
		// Restored as shared anonymous memory with the same content.
		v.Kind, v.Name = image.VmaShmem, m.Path
		return v, classCopy, nil
	case m.IsAnon():
		v.Kind = image.VmaAnon
		if m.Path != "" {
			v.Name = m.Path
		}
		if !m.Read || m.Shared {
			return v, classCopy, nil
		}
		return v, classPin, nil
	case m.IsFile():
		if m.Deleted() {
			return v, classSkip, fmt.Errorf("%s: mapping of a deleted file: %w", where, ErrUnsupported)
		}
		v.Kind, v.Path, v.Offset, v.Inode = image.VmaFile, m.Path, m.Offset, m.Inode
		if st, err := os.Stat(m.Path); err == nil {
			v.Size = st.Size()
		}
		if m.Shared {
			return v, classSkip, nil
		}
		return v, classCopy, nil
	}
	return v, classSkip, fmt.Errorf("%s: unknown mapping kind: %w", where, ErrUnsupported)
}

// populated returns the pages of m that hold data of their own: present or
// swapped, not the shared zero page, and for file mappings not the page
// cache's page (only COW copies).
func populated(pm *procfs.Pagemap, m procfs.Mapping, class memClass) ([]procfs.PageRegion, error) {
	if class == classPin && m.Rss == m.Len() {
		// Wholly resident just before the freeze (a large heap, the usual
		// case): pin it all without a scan, which costs ~15 ms per GiB
		// here. A page dropped since then is pinned as the zero page it
		// now reads as, which is its content at the snapshot instant.
		return []procfs.PageRegion{{Start: m.Start, End: m.End}}, nil
	}
	// FILE and PFNZERO cost a look at every page (~3x the scan): ask for
	// FILE only where it matters. Zero-page PTEs of anonymous memory are
	// then pinned like any page, which is harmless.
	ret := procfs.PagePresent | procfs.PageSwapped
	if m.IsFile() {
		ret |= procfs.PageFile | procfs.PagePFNZero
	}
	regs, err := pm.ScanAll(procfs.ScanArgs{
		Start:         m.Start,
		End:           m.End,
		CategoryAnyOf: procfs.PagePresent | procfs.PageSwapped,
		ReturnMask:    ret,
	})
	if err != nil {
		return nil, fmt.Errorf("scan pagemap %#x-%#x: %w", m.Start, m.End, err)
	}
	out := regs[:0]
	for _, r := range regs {
		if r.Categories&procfs.PagePFNZero != 0 {
			continue
		}
		if m.IsFile() && r.Categories&procfs.PageFile != 0 {
			continue
		}
		if n := len(out); n > 0 && out[n-1].End == r.Start {
			out[n-1].End = r.End
			continue
		}
		out = append(out, r)
	}
	return out, nil
}

// copyNow copies [start, end) of the frozen target into pages.img. With
// dropZero, all-zero pages are left out (they read as zero on restore).
func (d *dumper) copyNow(start, end uint64, dropZero bool) ([]image.Run, error) {
	const chunk = 4 << 20
	var runs []image.Run
	// One buffer per dump, no larger than needed: a fresh 4 MiB per call
	// cost milliseconds of page faults each, during the freeze.
	if want := min(uint64(chunk), end-start); uint64(len(d.copyBuf)) < want {
		d.copyBuf = make([]byte, want)
	}
	for a := start; a < end; a += chunk {
		n := min(uint64(chunk), end-a)
		b := d.copyBuf[:n]
		if err := d.tr.ReadMem(a, b); err != nil {
			return nil, fmt.Errorf("copy memory %#x+%#x: %w", a, n, err)
		}
		for pg := uint64(0); pg < n; pg += image.PageSize {
			page := b[pg : pg+image.PageSize]
			if dropZero && isZero(page) {
				continue
			}
			addr := a + pg
			if k := len(runs); k > 0 && runs[k-1].End() == addr && runs[k-1].Off+runs[k-1].NPages*image.PageSize == d.pagesOff {
				runs[k-1].NPages++
			} else {
				runs = append(runs, image.Run{Addr: addr, NPages: 1, Where: image.InPages, Off: d.pagesOff})
			}
			if _, err := d.pages.WriteAt(page, int64(d.pagesOff)); err != nil {
				return nil, fmt.Errorf("write pages file: %w", err)
			}
			d.pagesOff += image.PageSize
		}
	}
	return runs, nil
}

func isZero(b []byte) bool {
	words := unsafe.Slice((*uint64)(unsafe.Pointer(&b[0])), len(b)/8)
	for _, w := range words {
		if w != 0 {
			return false
		}
	}
	return true
}

// pipeSize is the pin pipe size: fs.pipe-max-size capped at 4 MiB.
func pipeSize(want int) int {
	if want > 0 {
		return want
	}
	n := 1 << 20
	if b, err := os.ReadFile("/proc/sys/fs/pipe-max-size"); err == nil {
		if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			n = v
		}
	}
	return min(n, 4<<20)
}

// Features the source uffd needs. The pipes hold the snapshot, so munmap,
// madvise and fork need no attention from the monitor (fork drops the
// registration of the child's copy, whose writes break COW). mremap does:
// without EVENT_REMAP the kernel drops the protection of the pages it
// moves (mm/userfaultfd.c:mremap_userfaultfd_prep) and writes would land
// unnoticed in pages the pipes still pin.
const sourceFeatures = uffd.FeaturePagefaultFlagWP | uffd.FeatureEventRemap
