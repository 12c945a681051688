package ctrtest

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Addresses of the two hosts on their veth link.
const (
	IPA = "10.77.0.1"
	IPB = "10.77.0.2"
	// prefixLen is the link's netmask length.
	prefixLen = 24
)

// runBase holds one directory per Net, named by its id: the hosts' state
// directories and sockets (short paths: unix socket paths are limited to
// 108 bytes) and the record a later run needs to clean up after a killed
// one. The netns names carry the same id.
const runBase = "/run/cowmig-ctrtest"

// netnsPrefix starts the name of every network namespace this package makes.
const netnsPrefix = "cowmig-ct-"

// rootsFile, in a Net's run directory, lists the containerd root
// directories and namespaces of its hosts, one "root <path>" or
// "ns <name>" line each, so a later run can unmount and remove them if this
// run is killed.
const rootsFile = "leftovers"

// Netns is one network namespace of a Net: a "host" with a veth end.
type Netns struct {
	Name string // under /run/netns
	IP   string // of its veth end
	Veth string // name of its veth end
	net  *Net
}

// Path is the namespace's bind mount, for nsenter --net= or setns.
func (n *Netns) Path() string { return "/run/netns/" + n.Name }

// Net is two network namespaces A (IPA) and B (IPB) with lo up, joined by
// a veth pair. Each has its own loopback, so both can listen on the same
// port, and each can reach the other's IP.
type Net struct {
	ID     string // unique per Net: "<pid>-<random hex>"
	A, B   *Netns
	runDir string
}

// NewNet creates a Net, deleted at t.Cleanup (after the hosts started on
// it, since cleanups run last-in first-out). It first removes what killed
// runs of any test binary using this package left behind: network
// namespaces, processes in them, mounts, cgroups, directories.
func NewNet(t testing.TB) *Net {
	t.Helper()
	SkipUnlessRoot(t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skipf("needs iproute2's ip (scripts/deps.sh installs it): %v", err)
	}
	for _, err := range sweepLeftovers() {
		t.Logf("clean up after a killed run: %v", err)
	}
	var rnd [4]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		t.Fatalf("random id: %v", err)
	}
	h := hex.EncodeToString(rnd[:])
	n := &Net{ID: fmt.Sprintf("%d-%s", os.Getpid(), h)}
	n.runDir = filepath.Join(runBase, n.ID)
	n.A = &Netns{Name: netnsPrefix + n.ID + "-a", IP: IPA, Veth: "cmg" + h + "a", net: n}
	n.B = &Netns{Name: netnsPrefix + n.ID + "-b", IP: IPB, Veth: "cmg" + h + "b", net: n}
	if err := os.MkdirAll(n.runDir, 0o700); err != nil {
		t.Fatalf("create %s: %v", n.runDir, err)
	}
	t.Cleanup(func() {
		for _, err := range n.destroy() {
			t.Errorf("delete net %s: %v", n.ID, err)
		}
	})
	steps := [][]string{
		{"netns", "add", n.A.Name},
		{"netns", "add", n.B.Name},
		{"-n", n.A.Name, "link", "set", "lo", "up"},
		{"-n", n.B.Name, "link", "set", "lo", "up"},
		{"link", "add", n.A.Veth, "netns", n.A.Name, "type", "veth", "peer", "name", n.B.Veth, "netns", n.B.Name},
		{"-n", n.A.Name, "addr", "add", fmt.Sprintf("%s/%d", IPA, prefixLen), "dev", n.A.Veth},
		{"-n", n.B.Name, "addr", "add", fmt.Sprintf("%s/%d", IPB, prefixLen), "dev", n.B.Veth},
		{"-n", n.A.Name, "link", "set", n.A.Veth, "up"},
		{"-n", n.B.Name, "link", "set", n.B.Veth, "up"},
	}
	for _, args := range steps {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return n
}

// record appends one line to the Net's leftovers file.
func (n *Net) record(line string) error {
	f, err := os.OpenFile(filepath.Join(n.runDir, rootsFile), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("open leftovers record: %w", err)
	}
	_, werr := f.WriteString(line + "\n")
	cerr := f.Close()
	if err := errors.Join(werr, cerr); err != nil {
		return fmt.Errorf("write leftovers record: %w", err)
	}
	return nil
}

// destroy kills what is left in the Net's namespaces, unmounts and removes
// what its hosts left, and deletes the namespaces (which deletes the veth).
func (n *Net) destroy() []error {
	return cleanupRun(n.ID, n.runDir)
}

// cleanupRun removes everything of the Net with the given id: processes in
// its network namespaces or in the cgroups of its containerd namespaces,
// mounts under its run directory and recorded roots, those cgroups, runc
// state, the namespaces themselves and the directories.
func cleanupRun(id, runDir string) []error {
	var errs []error
	var roots, namespaces []string
	if b, err := os.ReadFile(filepath.Join(runDir, rootsFile)); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, " "); ok && k == "root" {
				roots = append(roots, v)
			} else if ok && k == "ns" {
				namespaces = append(namespaces, v)
			}
		}
	}
	nsNames := []string{netnsPrefix + id + "-a", netnsPrefix + id + "-b"}
	if err := killProcesses(nsNames, namespaces); err != nil {
		errs = append(errs, err)
	}
	for _, dir := range append([]string{runDir}, roots...) {
		if err := unmountUnder(dir); err != nil {
			errs = append(errs, err)
		}
	}
	for _, ns := range namespaces {
		errs = append(errs, removeCgroups(ns)...)
		// The runc shim keeps runc's state in /run/containerd/runc/<ns>
		// whatever containerd's state directory is.
		if err := os.RemoveAll(filepath.Join("/run/containerd/runc", ns)); err != nil {
			errs = append(errs, fmt.Errorf("remove runc state of %s: %w", ns, err))
		}
	}
	for _, name := range nsNames {
		if _, err := os.Stat("/run/netns/" + name); err != nil {
			continue
		}
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del %s: %w: %s", name, err, bytes.TrimSpace(out)))
		}
	}
	for _, dir := range append([]string{runDir}, roots...) {
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
		}
	}
	return errs
}

// sweepLeftovers cleans up after runs whose test process is gone: a Net's
// id starts with the pid of the process that made it.
func sweepLeftovers() []error {
	ids := map[string]bool{}
	if ents, err := os.ReadDir(runBase); err == nil {
		for _, e := range ents {
			ids[e.Name()] = true
		}
	}
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			if rest, ok := strings.CutPrefix(e.Name(), netnsPrefix); ok && len(rest) > 2 {
				ids[rest[:len(rest)-2]] = true // strip "-a"/"-b"
			}
		}
	}
	var errs []error
	for id := range ids {
		pidStr, _, ok := strings.Cut(id, "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid <= 0 {
			continue
		}
		if pid == os.Getpid() || unix.Kill(pid, 0) == nil {
			continue // still running: its own cleanups will do it
		}
		errs = append(errs, cleanupRun(id, filepath.Join(runBase, id))...)
	}
	return errs
}

// killProcesses SIGKILLs every process whose network namespace is one of
// the named ones or whose cgroup path has a "/<ns>/" element for one of the
// containerd namespaces (containers with a network namespace of their own),
// and waits until they are gone. Our own children must be reaped by their
// owners; zombies do not count.
func killProcesses(netnsNames, ctrNamespaces []string) error {
	type key struct{ dev, ino uint64 }
	targets := map[key]bool{}
	for _, name := range netnsNames {
		var st unix.Stat_t
		if err := unix.Stat("/run/netns/"+name, &st); err == nil {
			targets[key{st.Dev, st.Ino}] = true
		}
	}
	match := func(pid int) bool {
		var st unix.Stat_t
		if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st); err == nil && targets[key{st.Dev, st.Ino}] {
			return true
		}
		if len(ctrNamespaces) == 0 {
			return false
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		if err != nil {
			return false
		}
		for _, ns := range ctrNamespaces {
			if bytes.Contains(b, []byte("/"+ns+"/")) {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var left []int
		for _, pid := range listPids() {
			if pid == os.Getpid() || !match(pid) || isZombie(pid) {
				continue
			}
			left = append(left, pid)
			unix.Kill(pid, unix.SIGKILL) // ESRCH: already gone
		}
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v survive SIGKILL", left)
		}
		// SIGKILL is asynchronous; the kernel needs a moment to tear
		// the processes down, and there is nothing to wait on for
		// processes that are not our children.
		time.Sleep(10 * time.Millisecond)
	}
}

func listPids() []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true // gone
	}
	// The state follows the ")" that ends the command name.
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] == 'Z' || b[i+2] == 'X'
}

// unmountUnder lazily unmounts every mount point at or below dir, deepest
// first.
func unmountUnder(dir string) error {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("read mountinfo: %w", err)
	}
	var points []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		p := unescapeMount(f[4])
		if p == dir || strings.HasPrefix(p, dir+"/") {
			points = append(points, p)
		}
	}
	var errs []error
	for i := len(points) - 1; i >= 0; i-- {
		if err := unix.Unmount(points[i], unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", points[i], err))
		}
	}
	return errors.Join(errs...)
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space, ...).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// removeCgroups removes the cgroup directories runc made for containerd
// namespace ns (cgroupfs paths "/<ns>/<container>") in every hierarchy,
// deepest first. Empty cgroups only: processes must be gone already.
func removeCgroups(ns string) []error {
	var errs []error
	tops, _ := filepath.Glob("/sys/fs/cgroup/*/" + ns)
	if fi, err := os.Stat("/sys/fs/cgroup/" + ns); err == nil && fi.IsDir() {
		tops = append(tops, "/sys/fs/cgroup/"+ns) // a pure cgroup v2 host
	}
	for _, top := range tops {
		var dirs []string
		filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := unix.Rmdir(dirs[i]); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dirs[i], err))
			}
		}
	}
	return errs
}

// exitedBySignal reports whether err from cmd.Wait says the process died
// of one of sigs: the signals we stop it with, not worth a test error.
func exitedBySignal(err error, sigs ...syscall.Signal) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() {
		return false
	}
	for _, s := range sigs {
		if ws.Signal() == s {
			return true
		}
	}
	return false
}
