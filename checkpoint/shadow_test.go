package checkpoint

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/checkpoint/inject"
	"github.com/cowmig/cowmig/checkpoint/procfs"
)

// A mapping that a fork does not hand over with its pages (here
// MADV_WIPEONFORK, as if set after the flags were read) fails
// checkInherited; an ordinary one passes. Needs root and python3.
func TestCheckInherited(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (ptrace)")
	}
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Fatal("python3 missing: make deps installs it")
	}
	script := `import mmap, sys, time, ctypes
def mk():
    m = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.write(b"x" * (4 << 20))
    return m
wiped, kept = mk(), mk()
wiped.madvise(18)  # MADV_WIPEONFORK
addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
print(hex(addr(wiped)), hex(addr(kept)), flush=True)
time.sleep(600)
`
	cmd := exec.Command(py, "-c", script)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	var wiped, kept uint64
	if _, err := fmt.Sscanf(line, "%v %v", &wiped, &kept); err != nil {
		t.Fatalf("script said %q: %v", line, err)
	}
	maps, err := procfs.Maps(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	p := &image.Process{}
	var runs []pinRun
	for _, m := range maps {
		if m.Start == wiped || m.Start == kept {
			p.Vmas = append(p.Vmas, image.Vma{Start: m.Start, End: m.End})
			runs = append(runs, pinRun{vma: len(p.Vmas) - 1, addr: m.Start, npages: (m.End - m.Start) / image.PageSize})
		}
	}
	if len(runs) != 2 {
		t.Fatalf("found %d of the 2 mappings in %v", len(runs), maps)
	}
	tr, err := inject.Seize(cmd.Process.Pid, inject.Options{SuspendSeccomp: true})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Detach()
	sh, err := tr.Shadow("test-shadow")
	if err != nil {
		t.Fatal(err)
	}
	defer sh.Kill()
	pm, err := procfs.OpenPagemap(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	for i, want := range []bool{p.Vmas[0].Start == kept, p.Vmas[1].Start == kept} {
		err := checkInherited(p, runs[i:i+1], pm, sh.Pid())
		if want && err != nil {
			t.Errorf("ordinary mapping %#x: %v", p.Vmas[i].Start, err)
		}
		if !want && (!errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "WIPEONFORK")) {
			t.Errorf("wiped mapping %#x: %v, want a refusal", p.Vmas[i].Start, err)
		}
	}
}
