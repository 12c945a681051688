package ctrbench

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cowmig/cowmig/internal/ctrtest"
)

// kvPort is the kvserver's port: the source's on A, the clone's on B.
const kvPort = "7070"

// Environment knobs.
const (
	envBench = "COWMIG_BENCH"
	envReps  = "COWMIG_CTRBENCH_REPS"
	envSizes = "COWMIG_CTRBENCH_SIZES"
)

// config is the benchmark's size.
type config struct {
	reps  int
	sizes []int // MiB
}

// readConfig reads the environment knobs.
func readConfig() (config, error) {
	c := config{reps: 5, sizes: []int{256, 1024}}
	if s := os.Getenv(envReps); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return c, fmt.Errorf("%s=%q: want a positive integer", envReps, s)
		}
		c.reps = n
	}
	if s := os.Getenv(envSizes); s != "" {
		c.sizes = nil
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 1 {
				return c, fmt.Errorf("%s=%q: want MiB sizes like 256,1024", envSizes, s)
			}
			c.sizes = append(c.sizes, n)
		}
	}
	return c, nil
}

// binaries are the commands under test, built from this tree.
type binaries struct {
	dir    string // holds containerd-shim-cowmig-v2: containerd's PATH
	cowmig string
}

// buildBinaries builds the shim and the cowmig CLI into a fresh directory.
func buildBinaries(t *testing.T) binaries {
	t.Helper()
	dir := t.TempDir()
	if err := ctrtest.BuildCommands(dir, "./cmd/containerd-shim-cowmig-v2", "./cmd/cowmig"); err != nil {
		t.Fatal(err)
	}
	return binaries{dir: dir, cowmig: filepath.Join(dir, "cowmig")}
}

// removeContainer kills container id's task on h, waits for it to stop
// and deletes task and container, so its port is free again.
func removeContainer(t *testing.T, h *ctrtest.Host, id string) {
	t.Helper()
	h.MustCtr(t, "task", "kill", "-s", "KILL", id)
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, st := h.TaskPid(t, id); st == "STOPPED" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("host %s: task %s does not stop after SIGKILL", h.Name(), id)
		}
		time.Sleep(10 * time.Millisecond) // ctr offers nothing to wait on
	}
	h.MustCtr(t, "task", "rm", id)
	h.MustCtr(t, "container", "rm", id)
}

// pageServers lists the shim's page-server daemons that snapshot srcPid.
func pageServers(srcPid int) []int {
	want := fmt.Sprintf("\x00--pid\x00%d\x00", srcPid)
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || !alive(pid) {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && strings.Contains(string(b), "\x00__cowmig-page-server\x00") && strings.Contains(string(b), want) {
			out = append(out, pid)
		}
	}
	return out
}

// waitPageServersGone waits up to timeout for srcPid's page servers to
// exit; with kill it SIGKILLs them first. It returns those still alive.
func waitPageServersGone(srcPid int, kill bool, timeout time.Duration) []int {
	deadline := time.Now().Add(timeout)
	for {
		pids := pageServers(srcPid)
		if len(pids) == 0 {
			return nil
		}
		if kill {
			for _, p := range pids {
				if proc, err := os.FindProcess(p); err == nil {
					_ = proc.Kill()
				}
			}
		}
		if time.Now().After(deadline) {
			return pids
		}
		// The shim reaps its daemons; nothing here can wait on them.
		time.Sleep(5 * time.Millisecond)
	}
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	s := b[i+2]
	return s != 'Z' && s != 'X'
}

// exportDiagnosis describes an exported image archive that does not
// import: its entries, and the blobs of ref in A's content store.
func (bn *bench) exportDiagnosis(tar, ref string) string {
	var b strings.Builder
	out, err := exec.Command("tar", "tvf", tar).CombinedOutput()
	fmt.Fprintf(&b, "tar tvf %s (%v):\n%s", tar, err, out)
	content, err := bn.a.Ctr("content", "ls")
	fmt.Fprintf(&b, "host a: ctr content ls (%v):\n%s", err, content)
	blobs := filepath.Join(bn.a.Root(), "io.containerd.content.v1.content", "blobs", "sha256")
	ents, _ := os.ReadDir(blobs)
	fmt.Fprintf(&b, "host a: %s:\n", blobs)
	for _, e := range ents {
		if fi, err := e.Info(); err == nil {
			fmt.Fprintf(&b, "  %s %d bytes %v\n", e.Name(), fi.Size(), fi.ModTime().Format(time.RFC3339Nano))
		}
	}
	img, err := bn.a.Ctr("image", "ls")
	fmt.Fprintf(&b, "host a: ctr image ls (%v):\n%s", err, img)
	return b.String()
}
