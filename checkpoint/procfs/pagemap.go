package procfs

import (
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// PageCategory is a set of PAGE_IS_* bits of the PAGEMAP_SCAN ioctl
// (include/uapi/linux/fs.h, Linux 6.7; PageGuard since 6.15).
type PageCategory uint64

// Page categories, as defined by the kernel's uapi header.
const (
	PageWPAllowed PageCategory = 1 << 0 // VMA registered for async uffd write-protect
	PageWritten   PageCategory = 1 << 1 // not uffd-write-protected (written since protected)
	PageFile      PageCategory = 1 << 2 // maps a page-cache (non-anonymous) page
	PagePresent   PageCategory = 1 << 3
	PageSwapped   PageCategory = 1 << 4
	PagePFNZero   PageCategory = 1 << 5 // maps the shared zero page
	PageHuge      PageCategory = 1 << 6 // THP or hugetlb mapping
	PageSoftDirty PageCategory = 1 << 7
	PageGuard     PageCategory = 1 << 8 // MADV_GUARD_INSTALL guard page (also reported PageWritten)

	// PageAll is every category this package knows. Kernels older than
	// 6.15 reject PageGuard with EINVAL.
	PageAll PageCategory = 1<<9 - 1
)

var categoryNames = [...]string{"wpallowed", "written", "file", "present", "swapped", "pfnzero", "huge", "softdirty", "guard"}

func (c PageCategory) String() string {
	if c == 0 {
		return "0"
	}
	var parts []string
	for i, n := range categoryNames {
		if c&(1<<i) != 0 {
			parts = append(parts, n)
		}
	}
	if rest := c &^ PageAll; rest != 0 {
		parts = append(parts, fmt.Sprintf("%#x", uint64(rest)))
	}
	return strings.Join(parts, "|")
}

// PAGEMAP_SCAN flags (pm_scan_arg.flags).
const (
	// PMScanWPMatching write-protects, atomically with reporting them, the
	// matching pages that are PageWritten. VMAs without async uffd-wp are
	// skipped silently unless PMScanCheckWPAsync is also set.
	PMScanWPMatching = 1 << 0
	// PMScanCheckWPAsync fails the scan with EPERM at the first VMA that is
	// not registered for async uffd write-protect.
	PMScanCheckWPAsync = 1 << 1
)

// PageRegion is struct page_region: [Start, End) with the reported
// categories. Its layout is the kernel's, so a []PageRegion is handed to the
// ioctl as is.
type PageRegion struct {
	Start, End uint64
	Categories PageCategory
}

// ScanArgs selects the pages of one PAGEMAP_SCAN call.
//
// A page matches when, after its categories are XOR'ed with
// CategoryInvertedMask, every bit of CategoryMask is set and, if
// CategoryAnyOf is not zero, at least one bit of CategoryAnyOf is set
// (fs/proc/task_mmu.c pagemap_scan_is_interesting_page). Matching pages are
// reported with their categories ANDed with ReturnMask; adjacent pages with
// equal reported categories share one region.
//
// PageFile is only computed when it appears in CategoryMask, CategoryAnyOf
// or ReturnMask; inverting it alone matches as if no page were a file page.
// An anonymous page never touched is not PagePresent; a page only read maps
// the shared zero page and is PagePresent|PagePFNZero.
type ScanArgs struct {
	Start, End           uint64 // Start page aligned; End is rounded up to a page
	Flags                uint64 // PMScanWPMatching, PMScanCheckWPAsync
	CategoryMask         PageCategory
	CategoryInvertedMask PageCategory
	CategoryAnyOf        PageCategory
	ReturnMask           PageCategory
	MaxPages             uint64 // stop after this many matching pages; 0 = no limit
}

// Pagemap is an open /proc/PID/pagemap, the handle PAGEMAP_SCAN runs on.
// Its methods may be called concurrently.
type Pagemap struct {
	f *os.File
}

// OpenPagemap opens /proc/PID/pagemap. The caller needs PTRACE_MODE_READ
// access to pid. The handle keeps pid's mm, not pid, so it stays usable
// across execve of other processes but sees an empty address space once the
// target has exited.
func OpenPagemap(pid int) (*Pagemap, error) {
	path := procPath(pid, "pagemap")
	f, err := os.Open(path)
	if err != nil {
		return nil, wrap("open "+path, err)
	}
	return &Pagemap{f: f}, nil
}

// Close closes the pagemap file.
func (p *Pagemap) Close() error { return p.f.Close() }

// scanBatch is how many regions ScanAll asks for per ioctl.
const scanBatch = 512

// ScanAll repeats Scan from each call's walk end until the whole range is
// walked (or MaxPages matching pages were found in total), and merges
// adjacent regions with equal categories across calls.
func (p *Pagemap) ScanAll(a ScanArgs) ([]PageRegion, error) {
	ps := uint64(os.Getpagesize())
	if a.End < a.Start {
		return nil, fmt.Errorf("pagemap scan %#x-%#x: end before start: %w", a.Start, a.End, unix.EINVAL)
	}
	end := (a.End + ps - 1) &^ (ps - 1)
	buf := make([]PageRegion, scanBatch)
	var out []PageRegion
	var found uint64
	cur := a
	for cur.Start < end {
		if a.MaxPages != 0 {
			cur.MaxPages = a.MaxPages - found
		}
		regs, walkEnd, err := p.Scan(cur, buf)
		if err != nil {
			return nil, err
		}
		for _, r := range regs {
			found += (r.End - r.Start) / ps
			out = appendRegion(out, r)
		}
		if walkEnd >= end || (a.MaxPages != 0 && found >= a.MaxPages) {
			break
		}
		if walkEnd <= cur.Start {
			// The kernel stops short without output only when a hugetlb
			// page cannot be write-protected in part; retrying would
			// loop.
			return nil, fmt.Errorf("pagemap scan %#x-%#x: no progress at %#x", a.Start, a.End, walkEnd)
		}
		cur.Start = walkEnd
	}
	return out, nil
}

// appendRegion appends r to out, extending the last region instead when r
// continues it with the same categories.
func appendRegion(out []PageRegion, r PageRegion) []PageRegion {
	if n := len(out); n > 0 && out[n-1].End == r.Start && out[n-1].Categories == r.Categories {
		out[n-1].End = r.End
		return out
	}
	return append(out, r)
}
