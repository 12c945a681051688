package procfs

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// findMapping returns the mapping of maps starting at start.
func findMapping(t *testing.T, maps []Mapping, start uint64) Mapping {
	t.Helper()
	for _, m := range maps {
		if m.Start == start {
			return m
		}
	}
	t.Fatalf("no mapping starts at %#x", start)
	return Mapping{}
}

func selfMaps(t *testing.T) []Mapping {
	t.Helper()
	maps, err := Maps(os.Getpid())
	if err != nil {
		t.Fatalf("Maps(self): %v", err)
	}
	return maps
}

func TestMapsAnon(t *testing.T) {
	ps := os.Getpagesize()
	// PROT_NONE pages on both sides keep the middle from merging with a
	// neighbour, so its bounds are exactly ours.
	b := mmapT(t, -1, 0, 18*ps, unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	mid := b[ps : 17*ps]
	if err := unix.Mprotect(mid, unix.PROT_READ|unix.PROT_WRITE); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		mid[i*ps] = 1
	}
	m := findMapping(t, selfMaps(t), addrOf(mid))
	if m.End != addrOf(mid)+uint64(16*ps) || !m.Read || !m.Write || m.Exec || m.Shared ||
		m.Offset != 0 || m.Inode != 0 || m.Major != 0 || m.Minor != 0 || m.Path != "" {
		t.Fatalf("anon mapping: %+v", m)
	}
	if !m.IsAnon() || m.IsFile() || m.IsSpecial() || m.IsSharedAnon() || m.Len() != uint64(16*ps) {
		t.Errorf("classification of %+v", m)
	}
	if m.Rss != uint64(3*ps) || m.AnonHugePages != 0 {
		t.Errorf("Rss = %d AnonHugePages = %d, want %d, 0", m.Rss, m.AnonHugePages, 3*ps)
	}
	for _, f := range []string{"rd", "wr", "mr", "mw", "me"} {
		if !m.HasFlag(f) {
			t.Errorf("VmFlags %v lack %q", m.VmFlags, f)
		}
	}
	if m.HasFlag("ex") || m.HasFlag("sh") {
		t.Errorf("VmFlags %v", m.VmFlags)
	}
	lo := findMapping(t, selfMaps(t), addrOf(b))
	if lo.Read || lo.Write || lo.Exec {
		t.Errorf("guard below: %+v", lo)
	}

	// A name shows in the path column; the mapping stays anonymous.
	if err := setAnonName(mid, "cowmig test"); err != nil {
		t.Logf("PR_SET_VMA_ANON_NAME: %v; skipping the named part", err)
		return
	}
	m = findMapping(t, selfMaps(t), addrOf(mid))
	if m.Path != "[anon:cowmig test]" || !m.IsAnon() || m.End != addrOf(mid)+uint64(16*ps) {
		t.Errorf("named anon mapping: %+v", m)
	}
}

func TestMapsFile(t *testing.T) {
	ps := os.Getpagesize()
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "map me (x).dat")
	data := bytes.Repeat([]byte("0123456789abcdef"), 4*ps/16)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	b := mmapT(t, int(f.Fd()), int64(2*ps), 2*ps, unix.PROT_READ, unix.MAP_SHARED)
	if !bytes.Equal(b, data[2*ps:]) {
		t.Fatal("mapped bytes differ from the file")
	}
	m := findMapping(t, selfMaps(t), addrOf(b))
	want := Mapping{
		Start: addrOf(b), End: addrOf(b) + uint64(2*ps), Read: true, Shared: true,
		Offset: uint64(2 * ps), Major: unix.Major(st.Dev), Minor: unix.Minor(st.Dev), Inode: st.Ino, Path: path,
	}
	if !mappingEq(m, want) {
		t.Fatalf("file mapping:\n got %+v\nwant %+v", m, want)
	}
	// A read-only fd gives VM_MAYSHARE ("ms") without VM_SHARED ("sh").
	if !m.IsFile() || m.IsAnon() || m.Deleted() || m.IsMemfd() || !m.HasFlag("ms") || m.HasFlag("sh") || m.Rss != uint64(2*ps) {
		t.Errorf("classification of %+v", m)
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	m = findMapping(t, selfMaps(t), addrOf(b))
	if m.Path != path+" (deleted)" || !m.Deleted() || m.FilePath() != path || !m.IsFile() {
		t.Errorf("deleted file mapping: %+v", m)
	}
}

// mappingEq compares the header fields (not VmFlags or the sizes).
func mappingEq(a, b Mapping) bool {
	return a.Start == b.Start && a.End == b.End && a.Read == b.Read && a.Write == b.Write &&
		a.Exec == b.Exec && a.Shared == b.Shared && a.Offset == b.Offset && a.Major == b.Major &&
		a.Minor == b.Minor && a.Inode == b.Inode && a.Path == b.Path
}

func TestMapsMemfdAndSharedAnon(t *testing.T) {
	ps := os.Getpagesize()
	fd, err := unix.MemfdCreate("cowmig test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(ps)); err != nil {
		t.Fatal(err)
	}
	mf := mmapT(t, fd, 0, ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	sa := mmapT(t, -1, 0, 2*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	maps := selfMaps(t)

	m := findMapping(t, maps, addrOf(mf))
	if m.Path != "/memfd:cowmig test (deleted)" || !m.IsMemfd() || m.IsFile() || m.IsAnon() || !m.Shared || !m.Deleted() || m.Inode == 0 {
		t.Errorf("memfd mapping: %+v", m)
	}
	m = findMapping(t, maps, addrOf(sa))
	if m.Path != "/dev/zero (deleted)" || !m.IsSharedAnon() || m.IsFile() || m.IsAnon() || !m.Shared || m.End-m.Start != uint64(2*ps) {
		t.Errorf("shared anon mapping: %+v", m)
	}
	if err := setAnonName(sa, "shm"); err == nil {
		m = findMapping(t, selfMaps(t), addrOf(sa))
		if m.Path != "[anon_shmem:shm]" || !m.IsSharedAnon() || m.IsAnon() {
			t.Errorf("named shared anon mapping: %+v", m)
		}
	}
}
