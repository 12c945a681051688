package procfs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func openSelfPagemap(t *testing.T) *Pagemap {
	t.Helper()
	pm, err := OpenPagemap(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pm.Close() })
	return pm
}

// anonPages maps n private anonymous pages with THP off, so every page is
// its own PTE.
func anonPages(t *testing.T, n int) []byte {
	t.Helper()
	b := mmapT(t, -1, 0, n*os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err := unix.Madvise(b, unix.MADV_NOHUGEPAGE); err != nil {
		t.Fatal(err)
	}
	return b
}

// pages builds a region from page numbers relative to base.
func pages(base uint64, from, to int, c PageCategory) PageRegion {
	ps := uint64(os.Getpagesize())
	return PageRegion{Start: base + uint64(from)*ps, End: base + uint64(to)*ps, Categories: c}
}

func scanAll(t *testing.T, pm *Pagemap, a ScanArgs) []PageRegion {
	t.Helper()
	got, err := pm.ScanAll(a)
	if errors.Is(err, ErrNotSupported) {
		t.Skipf("PAGEMAP_SCAN: %v", err)
	}
	if err != nil {
		t.Fatalf("ScanAll(%+v): %v", a, err)
	}
	return got
}

func expectRegions(t *testing.T, what string, got, want []PageRegion) {
	t.Helper()
	if len(got) == 0 && len(want) == 0 {
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s:\n got %v\nwant %v", what, got, want)
	}
}

func TestScanPresent(t *testing.T) {
	ps := os.Getpagesize()
	pm := openSelfPagemap(t)
	b := anonPages(t, 64)
	for i := range 10 {
		b[i*ps] = byte(i + 1)
	}
	b[20*ps] = 21
	base := addrOf(b)
	end := base + uint64(64*ps)
	P, W := PagePresent, PageWritten

	expectRegions(t, "present", scanAll(t, pm, ScanArgs{Start: base, End: end, CategoryMask: P, ReturnMask: P}),
		[]PageRegion{pages(base, 0, 10, P), pages(base, 20, 21, P)})
	// Written pages not under uffd-wp are PageWritten too; nothing else.
	expectRegions(t, "present, all categories", scanAll(t, pm, ScanArgs{Start: base, End: end, CategoryMask: P, ReturnMask: PageAll}),
		[]PageRegion{pages(base, 0, 10, P|W), pages(base, 20, 21, P|W)})
	// Inverting PRESENT in the match selects the untouched pages.
	expectRegions(t, "not present", scanAll(t, pm, ScanArgs{Start: base, End: end, CategoryMask: P, CategoryInvertedMask: P, ReturnMask: P}),
		[]PageRegion{pages(base, 10, 20, 0), pages(base, 21, 64, 0)})
	expectRegions(t, "anyof", scanAll(t, pm, ScanArgs{Start: base, End: end, CategoryAnyOf: P | PageSwapped, ReturnMask: P | PageSwapped}),
		[]PageRegion{pages(base, 0, 10, P), pages(base, 20, 21, P)})
	// No mask at all matches every page; the return mask decides the split.
	expectRegions(t, "everything", scanAll(t, pm, ScanArgs{Start: base, End: end, ReturnMask: P}),
		[]PageRegion{pages(base, 0, 10, P), pages(base, 10, 20, 0), pages(base, 20, 21, P), pages(base, 21, 64, 0)})
	// An unaligned end is rounded up to the page.
	expectRegions(t, "unaligned end", scanAll(t, pm, ScanArgs{Start: base, End: base + uint64(20*ps) + 1, CategoryMask: P, ReturnMask: P}),
		[]PageRegion{pages(base, 0, 10, P), pages(base, 20, 21, P)})
	expectRegions(t, "empty range", scanAll(t, pm, ScanArgs{Start: base, End: base, CategoryMask: P, ReturnMask: P}), nil)

	// MaxPages cuts inside a region and across regions.
	for _, c := range []struct {
		max  uint64
		want []PageRegion
	}{
		{1, []PageRegion{pages(base, 0, 1, P)}},
		{5, []PageRegion{pages(base, 0, 5, P)}},
		{10, []PageRegion{pages(base, 0, 10, P)}},
		{11, []PageRegion{pages(base, 0, 10, P), pages(base, 20, 21, P)}},
		{1000, []PageRegion{pages(base, 0, 10, P), pages(base, 20, 21, P)}},
	} {
		expectRegions(t, "max pages", scanAll(t, pm, ScanArgs{Start: base, End: end, CategoryMask: P, ReturnMask: P, MaxPages: c.max}), c.want)
	}

	// One slot: the walk stops where the second region starts.
	out := make([]PageRegion, 1)
	a := ScanArgs{Start: base, End: end, CategoryMask: P, ReturnMask: P}
	got, walkEnd, err := pm.Scan(a, out)
	if err != nil {
		t.Fatal(err)
	}
	if want := pages(base, 20, 21, 0).Start; len(got) != 1 || got[0] != pages(base, 0, 10, P) || walkEnd != want {
		t.Fatalf("Scan with one slot = %v, walk end %#x; want [0,10) and %#x", got, walkEnd, want)
	}
	a.Start = walkEnd
	got, walkEnd, err = pm.Scan(a, out)
	if err != nil || len(got) != 1 || got[0] != pages(base, 20, 21, P) || walkEnd != end {
		t.Fatalf("second Scan = %v, walk end %#x, %v; want [20,21) and %#x", got, walkEnd, err, end)
	}
	// No output slots: nothing is reported, the whole range is walked.
	a.Start = base
	if got, walkEnd, err := pm.Scan(a, nil); err != nil || len(got) != 0 || walkEnd != end {
		t.Errorf("Scan without slots = %v, %#x, %v", got, walkEnd, err)
	}
	// The kernel validates its arguments.
	if _, _, err := pm.Scan(ScanArgs{Start: base + 1, End: end}, out); !errors.Is(err, unix.EINVAL) {
		t.Errorf("unaligned start: err = %v, want EINVAL", err)
	}
	if _, _, err := pm.Scan(ScanArgs{Start: base, End: end, ReturnMask: 1 << 40}, out); !errors.Is(err, unix.EINVAL) {
		t.Errorf("unknown category: err = %v, want EINVAL", err)
	}
	if _, _, err := pm.Scan(ScanArgs{Start: base, End: end, Flags: 1 << 10}, out); !errors.Is(err, unix.EINVAL) {
		t.Errorf("unknown flag: err = %v, want EINVAL", err)
	}
	// CHECK_WPASYNC on memory without async uffd-wp.
	if _, _, err := pm.Scan(ScanArgs{Start: base, End: end, Flags: PMScanCheckWPAsync, ReturnMask: P}, out); !errors.Is(err, unix.EPERM) {
		t.Errorf("CHECK_WPASYNC without uffd: err = %v, want EPERM", err)
	}
	// Content check: the pages the scan calls present hold what we wrote.
	for i := range 10 {
		if b[i*ps] != byte(i+1) {
			t.Fatalf("page %d changed", i)
		}
	}
}

// TestScanAllManyRegions needs more regions than ScanAll asks for per ioctl
// (scanBatch), so it loops on walk_end.
func TestScanAllManyRegions(t *testing.T) {
	ps := os.Getpagesize()
	pm := openSelfPagemap(t)
	const n = 2*scanBatch + 100
	b := anonPages(t, 2*n)
	for i := 0; i < n; i++ {
		b[2*i*ps] = byte(i)
	}
	base := addrOf(b)
	end := base + uint64(2*n*ps)
	P := PagePresent
	var want, alternating []PageRegion
	for i := 0; i < n; i++ {
		want = append(want, pages(base, 2*i, 2*i+1, P))
		alternating = append(alternating, pages(base, 2*i, 2*i+1, P), pages(base, 2*i+1, 2*i+2, 0))
	}
	expectRegions(t, "every other page", scanAll(t, pm, ScanArgs{Start: base, End: end, CategoryMask: P, ReturnMask: P}), want)
	expectRegions(t, "alternating", scanAll(t, pm, ScanArgs{Start: base, End: end, ReturnMask: P}), alternating)
	// MaxPages counts across the ioctls.
	expectRegions(t, "max pages across calls", scanAll(t, pm, ScanArgs{Start: base, End: end, CategoryMask: P, ReturnMask: P, MaxPages: scanBatch + 7}),
		want[:scanBatch+7])
	if _, err := pm.ScanAll(ScanArgs{Start: end, End: base}); !errors.Is(err, unix.EINVAL) {
		t.Errorf("ScanAll(end < start) err = %v, want EINVAL", err)
	}
}

func TestScanZeroPage(t *testing.T) {
	ps := os.Getpagesize()
	pm := openSelfPagemap(t)
	b := anonPages(t, 8)
	// Reading an untouched private anonymous page maps the shared zero page.
	if b[2*ps] != 0 || b[3*ps+100] != 0 {
		t.Fatal("fresh anonymous memory is not zero")
	}
	b[5*ps] = 1
	base := addrOf(b)
	P, Z, W := PagePresent, PagePFNZero, PageWritten
	expectRegions(t, "zero page", scanAll(t, pm, ScanArgs{Start: base, End: base + uint64(8*ps), CategoryMask: P, ReturnMask: P | Z | W | PageFile}),
		[]PageRegion{pages(base, 2, 4, P|Z|W), pages(base, 5, 6, P|W)})
}

func TestScanPrivateFile(t *testing.T) {
	ps := os.Getpagesize()
	pm := openSelfPagemap(t)
	path := filepath.Join(t.TempDir(), "private")
	data := make([]byte, 4*ps)
	for i := range data {
		data[i] = byte(i * 7)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := mmapT(t, int(f.Fd()), 0, 4*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if !bytes.Equal(b, data) {
		t.Fatal("mapping differs from the file")
	}
	// The write COWs page 1 into an anonymous page.
	b[ps+10] ^= 0xff
	base := addrOf(b)
	P, F := PagePresent, PageFile
	expectRegions(t, "private file", scanAll(t, pm, ScanArgs{Start: base, End: base + uint64(4*ps), CategoryAnyOf: P, ReturnMask: P | F}),
		[]PageRegion{pages(base, 0, 1, P|F), pages(base, 1, 2, P), pages(base, 2, 4, P|F)})
	// Only the anonymous (COW'd) pages: FILE inverted and required.
	expectRegions(t, "anon pages of a file mapping", scanAll(t, pm, ScanArgs{Start: base, End: base + uint64(4*ps),
		CategoryMask: P | F, CategoryInvertedMask: F, ReturnMask: P}),
		[]PageRegion{pages(base, 1, 2, P)})
	onDisk, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(onDisk, data) || b[ps+10] != data[ps+10]^0xff {
		t.Fatal("MAP_PRIVATE write reached the file, or was lost")
	}
}

func TestScanHuge(t *testing.T) {
	mode, err := os.ReadFile("/sys/kernel/mm/transparent_hugepage/enabled")
	if err != nil || strings.Contains(string(mode), "[never]") {
		t.Skipf("transparent huge pages disabled (%q, %v)", mode, err)
	}
	const huge = 2 << 20
	pm := openSelfPagemap(t)
	raw := mmapT(t, -1, 0, 4*huge, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	off := int((huge - addrOf(raw)%huge) % huge)
	b := raw[off : off+2*huge]
	if err := unix.Madvise(b, unix.MADV_HUGEPAGE); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < len(b); i += os.Getpagesize() {
		b[i] = 1
	}
	base := addrOf(b)
	var thp uint64
	for _, m := range selfMaps(t) {
		if m.Start <= base && base < m.End {
			thp = m.AnonHugePages
		}
	}
	if thp != 2*huge {
		t.Skipf("kernel backed only %d of %d bytes with THP (memory fragmented?)", thp, 2*huge)
	}
	P, H := PagePresent, PageHuge
	expectRegions(t, "huge", scanAll(t, pm, ScanArgs{Start: base, End: base + 2*huge, CategoryMask: P, ReturnMask: P | H}),
		[]PageRegion{{Start: base, End: base + 2*huge, Categories: P | H}})
}

func TestScanGuard(t *testing.T) {
	ps := os.Getpagesize()
	pm := openSelfPagemap(t)
	b := anonPages(t, 8)
	for i := range 8 {
		b[i*ps] = 1
	}
	if err := unix.Madvise(b[2*ps:4*ps], unix.MADV_GUARD_INSTALL); err != nil {
		t.Skipf("MADV_GUARD_INSTALL: %v", err)
	}
	base := addrOf(b)
	P, W, G := PagePresent, PageWritten, PageGuard
	// A guard marker is a non-present PTE without the uffd-wp bit, so the
	// kernel reports it as written too.
	expectRegions(t, "guard", scanAll(t, pm, ScanArgs{Start: base, End: base + uint64(8*ps), ReturnMask: P | W | G}),
		[]PageRegion{pages(base, 0, 2, P|W), pages(base, 2, 4, G|W), pages(base, 4, 8, P|W)})
	// Guards do not split the VMA: maps shows one mapping over all 8 pages.
	var whole bool
	for _, m := range selfMaps(t) {
		whole = whole || (m.Start <= base && base+uint64(8*ps) <= m.End)
	}
	if !whole {
		t.Error("no single mapping covers the guarded range")
	}
}

// TestScanWPAsync checks PMScanWPMatching the way the engine uses it for
// dirty tracking: with an async uffd-wp registration, each scan reports the
// pages written since the previous one and protects them again.
func TestScanWPAsync(t *testing.T) {
	requireRoot(t)
	ps := os.Getpagesize()
	pm := openSelfPagemap(t)
	b := anonPages(t, 16)
	for i := range 16 {
		b[i*ps] = 1
	}
	uffd, err := uffdWPAsync(b)
	if err != nil {
		t.Skipf("userfaultfd with UFFD_FEATURE_WP_ASYNC: %v", err)
	}
	defer unix.Close(uffd)
	base := addrOf(b)
	end := base + uint64(16*ps)
	W := PageWritten
	track := ScanArgs{Start: base, End: end, Flags: PMScanWPMatching | PMScanCheckWPAsync, CategoryMask: W, ReturnMask: W}

	expectRegions(t, "first pass protects everything", scanAll(t, pm, track), []PageRegion{pages(base, 0, 16, W)})
	expectRegions(t, "nothing written since", scanAll(t, pm, track), nil)
	b[3*ps] = 2
	b[7*ps+5] = 3
	expectRegions(t, "two writes", scanAll(t, pm, track), []PageRegion{pages(base, 3, 4, W), pages(base, 7, 8, W)})
	expectRegions(t, "re-protected", scanAll(t, pm, track), nil)
	b[9*ps] = 4
	// A read-only scan reports without protecting; every page is WPALLOWED.
	look := ScanArgs{Start: base, End: end, ReturnMask: PageWPAllowed | W | PagePresent}
	A, P := PageWPAllowed, PagePresent
	expectRegions(t, "read-only scan", scanAll(t, pm, look),
		[]PageRegion{pages(base, 0, 9, A|P), pages(base, 9, 10, A|P|W), pages(base, 10, 16, A|P)})
	expectRegions(t, "write still reported", scanAll(t, pm, track), []PageRegion{pages(base, 9, 10, W)})
	if b[3*ps] != 2 || b[7*ps+5] != 3 || b[9*ps] != 4 || b[0] != 1 {
		t.Fatal("async write-protect lost a write")
	}
}

// TestScanMatchesPagemapRead compares PAGEMAP_SCAN with the classic
// /proc/PID/pagemap entries (bit 63 present, bit 62 swapped) over the whole
// address space of a stopped child.
func TestScanMatchesPagemapRead(t *testing.T) {
	requireRoot(t)
	ps := uint64(os.Getpagesize())
	cmd := startSleep(t, t.TempDir())
	pid := cmd.Process.Pid
	maps, err := Maps(pid)
	if err != nil {
		t.Fatal(err)
	}
	pm, err := OpenPagemap(pid)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	raw, err := os.Open(procPath(pid, "pagemap"))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	var present uint64
	for _, m := range maps {
		if m.IsSpecial() {
			continue // VM_PFNMAP and gate areas are skipped by the scan
		}
		regs := scanAll(t, pm, ScanArgs{Start: m.Start, End: m.End, CategoryAnyOf: PagePresent | PageSwapped, ReturnMask: PagePresent | PageSwapped})
		entries := make([]byte, m.Len()/ps*8)
		if _, err := raw.ReadAt(entries, int64(m.Start/ps*8)); err != nil {
			t.Fatal(err)
		}
		for i := uint64(0); i < m.Len()/ps; i++ {
			e := binary.NativeEndian.Uint64(entries[i*8:])
			var want PageCategory
			if e&(1<<63) != 0 {
				want |= PagePresent
			}
			if e&(1<<62) != 0 {
				want |= PageSwapped
			}
			addr := m.Start + i*ps
			var got PageCategory
			for _, r := range regs {
				if r.Start <= addr && addr < r.End {
					got = r.Categories
				}
			}
			if got != want {
				t.Fatalf("%s page %#x: scan says %v, pagemap entry %#x", m.Path, addr, got, e)
			}
			if got&PagePresent != 0 {
				present++
			}
		}
	}
	if present == 0 {
		t.Fatal("no present pages in the child at all")
	}
}
