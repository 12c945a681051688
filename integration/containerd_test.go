package integration

// Tests of the containerd shim on real components: two containerd
// instances (hosts A and B, two network namespaces joined by veth), runc,
// ctr and nerdctl, and the kvserver workload (internal/ctrtest). They need
// root and the tools `make deps` installs; they skip without them.

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/internal/ctrtest"
	"github.com/cowmig/cowmig/internal/live"
	"github.com/cowmig/cowmig/shim/shimapi"
)

const kvPort = "7070"

// ctrHosts starts hosts A and B for the shim built by TestMain.
func ctrHosts(t *testing.T) (a, b *ctrtest.Host) {
	t.Helper()
	needRoot(t)
	return ctrtest.CowmigHosts(t, filepath.Dir(shimBin))
}

// query asks the kvserver at addr from h's network namespace.
func query(t *testing.T, h *ctrtest.Host, addr, cmd string) string {
	t.Helper()
	line, err := h.Query(addr, cmd, 10*time.Second)
	if err != nil {
		t.Fatalf("host %s: %s to %s: %v", h.Name(), cmd, addr, err)
	}
	return line
}

// kvState is a kvserver's PAUSE or VERIFY answer: its step count and the
// checksum of all its memory.
type kvState struct {
	count uint64
	sum   string
}

var kvStateRE = regexp.MustCompile(`count=(\d+) .*sum=([0-9a-f]+)|count=(\d+) sum=([0-9a-f]+)`)

func parseKV(t *testing.T, line, want string) kvState {
	t.Helper()
	if !strings.HasPrefix(line, want) {
		t.Fatalf("kvserver answered %q, want %q...", line, want)
	}
	m := kvStateRE.FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("kvserver answer %q has no count and sum", line)
	}
	c, s := m[1], m[2]
	if c == "" {
		c, s = m[3], m[4]
	}
	n, _ := strconv.ParseUint(c, 10, 64)
	return kvState{n, s}
}

// waitCountAbove waits (10 s at most) until the kvserver at addr counts
// more steps than n: it runs on.
func waitCountAbove(t *testing.T, h *ctrtest.Host, addr string, n uint64, who string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var c uint64
		line := query(t, h, addr, "GET")
		if _, err := fmt.Sscanf(line, "count %d", &c); err != nil {
			t.Fatalf("%s answered GET with %q", who, line)
		}
		if c > n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not run on: count %d, then %d after 10 s", who, n, c)
		}
		time.Sleep(10 * time.Millisecond) // the workload's progress has no event to wait on
	}
}

// waitStatus waits until container id's task on h has status want.
func waitStatus(t *testing.T, h *ctrtest.Host, id, want string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		_, st := h.TaskPid(t, id)
		if st == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("host %s: task %s is %s after %v, want %s", h.Name(), id, st, timeout, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The source is paused at a safe point (PAUSE) for the checkpoint, so the
// clone must hold exactly the source's memory: same count, same checksum
// of all of it. Then both run on, and the source keeps serving.
func TestCtrContainerCheckpointRestoreLive(t *testing.T) {
	a, b := ctrHosts(t)
	addrA := a.RunKV(t, "kv", shimapi.RuntimeName, "-mib", "128", "-port", kvPort)
	// Writers run during the first checkpoint: the clone must verify.
	a.MustCtr(t, "container", "checkpoint", "--task", "kv", "ckpt/kv:running")
	src := parseKV(t, query(t, a, addrA, "PAUSE"), "paused")
	a.MustCtr(t, "container", "checkpoint", "--task", "kv", "ckpt/kv:paused")
	query(t, a, addrA, "RESUME")
	a.MoveImage(t, b, "ckpt/kv:paused")
	a.MoveImage(t, b, "ckpt/kv:running")

	b.MustCtr(t, "container", "restore", "--live", "clone1", "ckpt/kv:paused")
	addrB := b.IP() + ":" + kvPort
	got := parseKV(t, query(t, b, addrB, "VERIFY"), "verify ok")
	if got != src {
		t.Errorf("clone holds count=%d sum=%s, the source had count=%d sum=%s at the checkpoint", got.count, got.sum, src.count, src.sum)
	}
	// The clone is an ordinary task: ps and exec work on it.
	clonePid, _ := b.TaskPid(t, "clone1")
	if ps := b.MustCtr(t, "task", "ps", "clone1"); !strings.Contains(ps, strconv.Itoa(clonePid)) {
		t.Errorf("ctr task ps clone1 = %q, want pid %d", ps, clonePid)
	}
	if out, err := b.Ctr("task", "exec", "--exec-id", "e1", "clone1", "/kvserver", "-bogus"); err == nil || !strings.Contains(err.Error()+out, "usage: kvserver") {
		t.Errorf("ctr task exec in the clone: %v %q, want kvserver's usage", err, out)
	}
	// Its stdio is the restoring task's: pipes whose other ends B's shim
	// (the clone's parent) holds.
	checkStdioOfShim(t, clonePid)
	query(t, b, addrB, "RESUME")
	// The writers were parked: give them the time to move on (their
	// first writes fault pages in from A) before a VERIFY parks them.
	waitCountAbove(t, b, addrB, got.count, "clone")
	parseKV(t, query(t, b, addrB, "VERIFY"), "verify ok")
	// The source kept running and serving.
	waitCountAbove(t, a, addrA, src.count, "source")
	parseKV(t, query(t, a, addrA, "VERIFY"), "verify ok")

	// A second clone of another snapshot, taken under fire.
	b.MustCtr(t, "task", "kill", "-s", "KILL", "clone1")
	waitStatus(t, b, "clone1", "STOPPED", 10*time.Second)
	b.MustCtr(t, "container", "restore", "--live", "clone2", "ckpt/kv:running")
	v := parseKV(t, query(t, b, addrB, "VERIFY"), "verify ok")
	t.Logf("clone of the running source: %+v", v)
	// And a third clone of the paused snapshot: one snapshot, several clones.
	b.MustCtr(t, "task", "kill", "-s", "KILL", "clone2")
	waitStatus(t, b, "clone2", "STOPPED", 10*time.Second)
	b.MustCtr(t, "container", "restore", "--live", "clone3", "ckpt/kv:paused")
	if got := parseKV(t, query(t, b, addrB, "VERIFY"), "verify ok"); got != src {
		t.Errorf("second clone of one snapshot holds %+v, want %+v", got, src)
	}
}

// Errors through ctr: a container running two processes is refused at
// checkpoint and keeps running; a restore whose page server is gone fails
// with the reason and leaves no task running.
func TestCtrErrors(t *testing.T) {
	a, b := ctrHosts(t)
	addrA := a.RunKV(t, "kv", shimapi.RuntimeName, "-mib", "32", "-port", kvPort)
	exec := a.Command("ctr", "-a", a.Address(), "-n", a.Namespace(), "task", "exec", "--exec-id", "second", "kv",
		"/kvserver", "-mib", "1", "-port", "7071")
	if err := exec.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { exec.Process.Kill(); exec.Wait() }()
	if _, err := ctrtest.WaitReady(a.Netns().Name, a.IP()+":7071", ctrtest.ReadyTimeout); err != nil {
		t.Fatal(err)
	}
	_, err := a.Ctr("container", "checkpoint", "--task", "kv", "ckpt/kv:two")
	if err == nil || !strings.Contains(err.Error(), "2 processes") {
		t.Errorf("checkpoint of a two-process container: %v, want a refusal naming 2 processes", err)
	}
	parseKV(t, query(t, a, addrA, "VERIFY"), "verify ok")
	if _, st := a.TaskPid(t, "kv"); st != "RUNNING" {
		t.Errorf("source task is %s after the refused checkpoint", st)
	}
	a.Ctr("task", "kill", "-s", "KILL", "--exec-id", "second", "kv")
	exec.Wait()

	srcPid, _ := a.TaskPid(t, "kv")
	a.MustCtr(t, "container", "checkpoint", "--task", "kv", "ckpt/kv:1")
	a.MoveImage(t, b, "ckpt/kv:1")
	killAndWait(t, daemonOf(t, "__cowmig-page-server", fmt.Sprintf("--pid\x00%d\x00", srcPid)))
	_, err = b.Ctr("container", "restore", "--live", "clone", "ckpt/kv:1")
	if err == nil || !strings.Contains(err.Error(), "page server") {
		t.Fatalf("restore without a page server: %v, want an error naming the page server", err)
	}
	if out, _ := b.Ctr("task", "ls"); strings.Contains(out, "RUNNING") {
		t.Errorf("a task runs after the failed restore:\n%s", out)
	}
}

// A real program: Debian's python3 (the host's /usr, bind-mounted
// read-only into the kvserver image's rootfs) running pyworkload with
// 256 MiB of state and its TCP protocol: the clone on B holds exactly the
// source's state at the snapshot instant, and both run on.
func TestCtrPythonClone(t *testing.T) {
	a, b := ctrHosts(t)
	script, err := filepath.Abs("../internal/testworkload/pyworkload.py")
	if err != nil {
		t.Fatal(err)
	}
	a.MustCtr(t, "run", "-d", "--net-host", "--runtime", shimapi.RuntimeName,
		"--log-uri", "file://"+filepath.Join(a.Dir(), "py.log"),
		"--mount", "type=bind,src=/usr,dst=/usr,options=rbind:ro",
		"--mount", "type=bind,src=/usr/lib64,dst=/lib64,options=rbind:ro",
		"--mount", "type=bind,src=/usr/lib,dst=/lib,options=rbind:ro",
		"--mount", "type=bind,src="+script+",dst=/pyworkload.py,options=rbind:ro",
		ctrtest.ImageRef, "py", "/usr/bin/python3", "/pyworkload.py", "256", "--port", kvPort, "--quiet")
	addrA := a.IP() + ":" + kvPort
	if _, err := ctrtest.WaitReady(a.Netns().Name, addrA, 2*ctrtest.ReadyTimeout); err != nil {
		t.Fatalf("python container: %v\n%s", err, readFile(filepath.Join(a.Dir(), "py.log")))
	}
	src := parseKV(t, query(t, a, addrA, "PAUSE"), "paused")
	a.MustCtr(t, "container", "checkpoint", "--task", "py", "ckpt/py:1")
	query(t, a, addrA, "RESUME")
	a.MoveImage(t, b, "ckpt/py:1")
	b.MustCtr(t, "container", "restore", "--live", "clone", "ckpt/py:1")
	addrB := b.IP() + ":" + kvPort
	if got := parseKV(t, query(t, b, addrB, "VERIFY"), "verify ok"); got != src {
		t.Errorf("python clone holds %+v, the source had %+v at the snapshot", got, src)
	}
	query(t, b, addrB, "RESUME")
	parseKV(t, query(t, b, addrB, "VERIFY"), "verify ok")
	parseKV(t, query(t, a, addrA, "VERIFY"), "verify ok")
}

// ctr task checkpoint (the client pauses the task around the call) →
// export/import → restore on B. `ctr c restore` cannot restore a task
// checkpoint (its index lacks the image name annotation), so cowmig
// restore --checkpoint does.
func TestCtrTaskCheckpointRestore(t *testing.T) {
	a, b := ctrHosts(t)
	addrA := a.RunKV(t, "kv", shimapi.RuntimeName, "-mib", "128", "-port", kvPort)
	src := parseKV(t, query(t, a, addrA, "PAUSE"), "paused")
	ref := ctrtest.CheckpointRef(t, a.MustCtr(t, "task", "checkpoint", "kv"))
	query(t, a, addrA, "RESUME")
	if _, st := a.TaskPid(t, "kv"); st != "RUNNING" {
		t.Fatalf("source task is %s after the checkpoint", st)
	}
	a.MoveImage(t, b, ref)
	if out, err := b.Ctr("container", "restore", "--live", "nope", ref); err == nil {
		t.Logf("ctr c restore of a task checkpoint worked after all: %s", out)
	}
	out := cowmigCmd(t, b, "restore", "--address", b.Address(), "--namespace", b.Namespace(), "--checkpoint", ref, "--json", "clone")
	var res struct{ Pid int }
	if err := json.Unmarshal([]byte(out), &res); err != nil || res.Pid <= 0 {
		t.Fatalf("cowmig restore --json: %q (%v)", out, err)
	}
	got := parseKV(t, query(t, b, b.IP()+":"+kvPort, "VERIFY"), "verify ok")
	if got != src {
		t.Errorf("clone holds %+v, the source had %+v", got, src)
	}
	parseKV(t, query(t, a, addrA, "VERIFY"), "verify ok")
}

// ctr task checkpoint --exit: migration. The source task stops once the
// snapshot is safe; the clone on B runs from the page server that outlives
// the source's task (and its deletion).
func TestCtrCheckpointExitMigrates(t *testing.T) {
	a, b := ctrHosts(t)
	addrA := a.RunKV(t, "kv", shimapi.RuntimeName, "-mib", "128", "-port", kvPort)
	src := parseKV(t, query(t, a, addrA, "PAUSE"), "paused")
	ref := ctrtest.CheckpointRef(t, a.MustCtr(t, "task", "checkpoint", "--exit", "kv"))
	waitStatus(t, a, "kv", "STOPPED", 10*time.Second)
	a.MustCtr(t, "task", "delete", "kv")
	a.MoveImage(t, b, ref)
	cowmigCmd(t, b, "restore", "--address", b.Address(), "--namespace", b.Namespace(), "--checkpoint", ref, "clone")
	got := parseKV(t, query(t, b, b.IP()+":"+kvPort, "VERIFY"), "verify ok")
	if got != src {
		t.Errorf("migrated clone holds %+v, the source had %+v", got, src)
	}
	query(t, b, b.IP()+":"+kvPort, "RESUME")
	parseKV(t, query(t, b, b.IP()+":"+kvPort, "VERIFY"), "verify ok")
}

// The page server on A, or the pager on B, is killed while B's clone
// still pulls pages: the clone is killed (never left running on
// zero-filled pages: the shim holds the clone's uffd, so its faults wait
// for the kill), the task reports the kill, and containerd's events say
// why.
func TestCtrPageServerKilledDuringRestore(t *testing.T) {
	for _, victim := range []string{"page-server", "pager"} {
		t.Run(victim, func(t *testing.T) { testKilledDuringRestore(t, victim) })
	}
}

func testKilledDuringRestore(t *testing.T, victim string) {
	a, b := ctrHosts(t)
	a.RunKV(t, "kv", shimapi.RuntimeName, "-mib", "768", "-port", kvPort)
	a.MustCtr(t, "container", "checkpoint", "--task", "kv", "ckpt/kv:1")
	a.MoveImage(t, b, "ckpt/kv:1")
	srcPid, _ := a.TaskPid(t, "kv")

	events := b.Command("ctr", "-a", b.Address(), "-n", b.Namespace(), "events")
	evOut, err := events.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := events.Start(); err != nil {
		t.Fatal(err)
	}
	defer events.Process.Kill()
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(evOut)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()

	b.MustCtr(t, "container", "restore", "--live", "clone", "ckpt/kv:1")
	kill := daemonOf(t, "__cowmig-page-server", fmt.Sprintf("--pid\x00%d\x00", srcPid))
	if victim == "pager" {
		clonePid, _ := b.TaskPid(t, "clone")
		kill = daemonOf(t, "__cowmig-pager", fmt.Sprintf("--stub\x00%d\x00", clonePid))
	}
	if err := kill.Kill(); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, b, "clone", "STOPPED", 20*time.Second)
	var failed, exited bool
	timeout := time.After(10 * time.Second)
	for !(failed && exited) {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("ctr events ended")
			}
			if strings.Contains(l, "/tasks/cowmig/restore-failed") && strings.Contains(l, "clone") {
				failed = true
				t.Logf("event: %s", l)
			}
			if strings.Contains(l, "/tasks/exit") && strings.Contains(l, `"clone"`) {
				exited = true
				if !strings.Contains(l, `"exit_status":137`) {
					t.Errorf("clone exit event %s, want exit status 137 (SIGKILL)", l)
				}
			}
		case <-timeout:
			t.Fatalf("events: restore-failed %v, exit %v", failed, exited)
		}
	}
	log := readFile(filepath.Join(b.State(), "io.containerd.runtime.v2.task", b.Namespace(), "clone", "cowmig-pager.log"))
	if strings.Contains(log, "lazy pages local") {
		t.Fatalf("the clone had every page before the kill; the test proves nothing:\n%s", log)
	}
	t.Logf("pager log:\n%s", log)
}

// checkStdioOfShim checks that fds 1 and 2 of pid are pipes that its
// parent, the task's shim, also holds (the task's IO).
func checkStdioOfShim(t *testing.T, pid int) {
	t.Helper()
	status := readFile(fmt.Sprintf("/proc/%d/status", pid))
	m := regexp.MustCompile(`PPid:\s+(\d+)`).FindStringSubmatch(status)
	if m == nil {
		t.Fatalf("no PPid in /proc/%d/status", pid)
	}
	shimFds := map[string]bool{}
	ents, _ := os.ReadDir("/proc/" + m[1] + "/fd")
	for _, e := range ents {
		if l, err := os.Readlink("/proc/" + m[1] + "/fd/" + e.Name()); err == nil {
			shimFds[l] = true
		}
	}
	if cmd := readFile("/proc/" + m[1] + "/cmdline"); !strings.Contains(cmd, "containerd-shim-cowmig-v2") {
		t.Fatalf("parent %s of the clone is %q, not the shim", m[1], cmd)
	}
	for _, fd := range []string{"1", "2"} {
		l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd))
		if err != nil || !strings.HasPrefix(l, "pipe:") || !shimFds[l] {
			t.Errorf("clone fd %s is %q (%v), not a pipe of its shim's", fd, l, err)
		}
	}
}

// killAndWait SIGKILLs p (not our child) and waits until it is gone.
func killAndWait(t *testing.T, p *os.Process) {
	t.Helper()
	fd, err := unix.PidfdOpen(p.Pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil {
		t.Fatal(err)
	}
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	if n, err := unix.Poll(fds, 10000); n != 1 || err != nil {
		t.Fatalf("pid %d still there after SIGKILL: %v", p.Pid, err)
	}
}

// daemonOf finds the shim daemon (page server, pager) whose command line
// has the argument with and holds want.
func daemonOf(t *testing.T, with, want string) *os.Process {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !strings.Contains(string(b), with+"\x00") || !strings.Contains(string(b), want) {
			continue
		}
		p, _ := os.FindProcess(pid)
		return p
	}
	t.Fatalf("no %s daemon with %q", with, want)
	return nil
}

// The container's seccomp filter, capabilities and no_new_privs read the
// same on the clone as on the source.
func TestCtrSecurityAttributesPreserved(t *testing.T) {
	a, b := ctrHosts(t)
	logURI := "file://" + filepath.Join(a.Dir(), "kv.log")
	a.MustCtr(t, "run", "-d", "--net-host", "--seccomp", "--cap-drop", "CAP_NET_RAW", "--cap-add", "CAP_SYS_NICE",
		"--runtime", shimapi.RuntimeName, "--log-uri", logURI, ctrtest.ImageRef, "kv", "/kvserver", "-mib", "32", "-port", kvPort)
	if _, err := ctrtest.WaitReady(a.Netns().Name, a.IP()+":"+kvPort, ctrtest.ReadyTimeout); err != nil {
		t.Fatal(err)
	}
	srcPid, _ := a.TaskPid(t, "kv")
	want := securityStatus(t, srcPid)
	if !strings.Contains(want, "Seccomp:\t2") {
		t.Fatalf("source runs without a seccomp filter:\n%s", want)
	}
	a.MustCtr(t, "container", "checkpoint", "--task", "kv", "ckpt/kv:1")
	a.MoveImage(t, b, "ckpt/kv:1")
	b.MustCtr(t, "container", "restore", "--live", "clone", "ckpt/kv:1")
	parseKV(t, query(t, b, b.IP()+":"+kvPort, "VERIFY"), "verify ok")
	clonePid, _ := b.TaskPid(t, "clone")
	if got := securityStatus(t, clonePid); got != want {
		t.Errorf("clone's /proc/PID/status:\n%s\nsource's:\n%s", got, want)
	}
}

// cowmigCmd runs the cowmig command and fails the test on error; its
// stdout is returned.
func cowmigCmd(t *testing.T, h *ctrtest.Host, args ...string) string {
	t.Helper()
	out, err := cowmigCmdErr(h, args...)
	if err != nil {
		t.Fatalf("host %s: cowmig %s: %v\n%s", h.Name(), strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(out)
}

// cowmigCmdErr runs the cowmig command in h's network namespace.
func cowmigCmdErr(h *ctrtest.Host, args ...string) (string, error) {
	cmd := h.Command(cowmigBin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out) + stderr.String(), err
	}
	return string(out), nil
}

func securityStatus(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		for _, k := range []string{"Cap", "NoNewPrivs", "Seccomp"} {
			if strings.HasPrefix(l, k) {
				out = append(out, l)
			}
		}
	}
	return strings.Join(out, "\n")
}

// cowmig checkpoint|restore through containerd: options ctr cannot
// express (mode, listen address, TTL) and JSON statistics.
func TestCLIContainerd(t *testing.T) {
	a, b := ctrHosts(t)
	addrA := a.RunKV(t, "kv", shimapi.RuntimeName, "-mib", "64", "-port", kvPort)
	src := parseKV(t, query(t, a, addrA, "PAUSE"), "paused")
	img := filepath.Join(a.Dir(), "img")
	out := cowmigCmd(t, a, "checkpoint", "--address", a.Address(), "--namespace", a.Namespace(),
		"--image", img, "--listen", "tcp:0.0.0.0:0", "--advertise", "tcp:"+a.IP(), "--ttl", "30s", "--json", "kv")
	var st live.CheckpointStats
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("checkpoint --json: %q: %v", out, err)
	}
	if st.Mode != "live" || st.FreezeMs <= 0 || st.PagesTotal == 0 || st.ContainerID != "kv" ||
		!strings.HasPrefix(st.Endpoint, "tcp:"+a.IP()+":") || strings.HasSuffix(st.Endpoint, ":0") {
		t.Errorf("checkpoint stats %+v", st)
	}
	query(t, a, addrA, "RESUME")
	// The image directory moves to B as files.
	imgB := filepath.Join(b.Dir(), "img")
	if out, err := exec.Command("cp", "-r", img, imgB).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	out = cowmigCmd(t, b, "restore", "--address", b.Address(), "--namespace", b.Namespace(), "--image", imgB, "--json", "clone")
	var res struct {
		Pid  int
		Shim *live.RestoreStats
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || res.Pid <= 0 || res.Shim == nil || res.Shim.RestoreMs <= 0 {
		t.Fatalf("restore --json: %q (%v)", out, err)
	}
	if got := parseKV(t, query(t, b, b.IP()+":"+kvPort, "VERIFY"), "verify ok"); got != src {
		t.Errorf("clone holds %+v, the source had %+v", got, src)
	}
	// A corrupt image is refused at create, before runc runs anything.
	bad := filepath.Join(b.Dir(), "bad")
	if out, err := exec.Command("cp", "-r", img, bad).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	meta := filepath.Join(bad, "cowmig.img")
	mb, err := os.ReadFile(meta)
	if err != nil {
		t.Fatal(err)
	}
	mb[len(mb)/2] ^= 0xff
	if err := os.WriteFile(meta, mb, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := cowmigCmdErr(b, "restore", "--address", b.Address(), "--namespace", b.Namespace(), "--image", bad, "clone2"); err == nil || !strings.Contains(out, "checkpoint image") {
		t.Errorf("restore of a corrupt image: %v %q, want a refusal naming the checkpoint image", err, out)
	}
	if out, _ := b.Ctr("task", "ls"); strings.Contains(out, "clone2") {
		t.Errorf("a task exists after the refused restore:\n%s", out)
	}
	// Wrong container, wrong runtime: clear errors.
	if out, err := cowmigCmdErr(a, "checkpoint", "--address", a.Address(), "--namespace", a.Namespace(), "--image", img+"2", "nosuch"); err == nil || !strings.Contains(out, "container nosuch") || !strings.Contains(out, "not found") {
		t.Errorf("checkpoint of a missing container: %v %q", err, out)
	}
}

// The drop-in loads: containerd's merged config registers the runtime.
func TestCtrDropInLoads(t *testing.T) {
	a, _ := ctrHosts(t)
	out, err := a.Exec("containerd", "--config", a.ConfigPath(), "config", "dump")
	if err != nil {
		t.Fatalf("config dump: %v\n%s", err, out)
	}
	if !regexp.MustCompile(`(?s)runtimes\.cowmig\]\s*runtime_type = 'io\.containerd\.cowmig\.v2'`).MatchString(out) {
		t.Errorf("containerd config dump shows no cowmig runtime:\n%s", out)
	}
}

// nerdctl: checkpoint create (which stops the container) and start
// --checkpoint with the cowmig runtime.
func TestNerdctlCheckpoint(t *testing.T) {
	ctrtest.SkipUnlessNerdctl(t)
	a, _ := ctrHosts(t)
	if out, err := a.Nerdctl("run", "-d", "--net", "host", "--runtime", shimapi.RuntimeName, "--name", "kvn",
		ctrtest.ImageRef, "-mib", "64", "-port", kvPort); err != nil {
		t.Fatalf("nerdctl run: %v\n%s", err, out)
	}
	addr := a.IP() + ":" + kvPort
	if _, err := ctrtest.WaitReady(a.Netns().Name, addr, ctrtest.ReadyTimeout); err != nil {
		t.Fatal(err)
	}
	src := parseKV(t, query(t, a, addr, "PAUSE"), "paused")
	if out, err := a.Nerdctl("checkpoint", "create", "kvn", "ck1"); err != nil {
		t.Fatalf("nerdctl checkpoint create: %v\n%s", err, out)
	}
	if out, err := a.Nerdctl("checkpoint", "ls", "kvn"); err != nil || !strings.Contains(out, "ck1") {
		t.Errorf("nerdctl checkpoint ls: %v\n%s", err, out)
	}
	if out, err := a.Nerdctl("start", "--checkpoint", "ck1", "kvn"); err != nil {
		t.Fatalf("nerdctl start --checkpoint: %v\n%s", err, out)
	}
	if got := parseKV(t, query(t, a, addr, "VERIFY"), "verify ok"); got != src {
		t.Errorf("restored container holds %+v, it had %+v at the checkpoint", got, src)
	}
}

// TLS between page server and pager: both hosts' shims have a certificate
// for their veth address signed by one CA, and trust that CA. A live
// migration works over TLS; a host that does not trust the CA cannot
// restore, with an error that says so, and runs nothing.
func TestCtrTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := newCA(t)
	caPath := filepath.Join(dir, "ca.pem")
	writePEM(t, caPath, "CERTIFICATE", ca.Raw)
	tlsConfig := func(ip string) string {
		cert, key := newServerCert(t, ca, caKey, ip)
		c, k := filepath.Join(dir, ip+".pem"), filepath.Join(dir, ip+"-key.pem")
		writePEM(t, c, "CERTIFICATE", cert)
		writePEM(t, k, "PRIVATE KEY", key)
		return fmt.Sprintf("tls_cert = %q\ntls_key = %q\ntls_ca = %q\n", c, k, caPath)
	}
	needRoot(t)
	a, b := ctrtest.CowmigHosts(t, filepath.Dir(shimBin), tlsConfig)
	addrA := a.RunKV(t, "kv", shimapi.RuntimeName, "-mib", "64", "-port", kvPort)
	src := parseKV(t, query(t, a, addrA, "PAUSE"), "paused")
	a.MustCtr(t, "container", "checkpoint", "--task", "kv", "ckpt/kv:1")
	query(t, a, addrA, "RESUME")
	a.MoveImage(t, b, "ckpt/kv:1")
	b.MustCtr(t, "container", "restore", "--live", "clone", "ckpt/kv:1")
	if got := parseKV(t, query(t, b, b.IP()+":"+kvPort, "VERIFY"), "verify ok"); got != src {
		t.Errorf("clone over TLS holds %+v, the source had %+v", got, src)
	}
	// The image says TLS (the clone above could only be served over it):
	// a CLI restore without the CA refuses at once.
	img := filepath.Join(dir, "img")
	cowmigCmd(t, a, "checkpoint", "--address", a.Address(), "--namespace", a.Namespace(), "--image", img, "kv")
	meta, err := image.Read(img)
	if err != nil {
		t.Fatal(err)
	}
	if !meta.EndpointTLS || !strings.HasPrefix(meta.Endpoint, "tcp:"+a.IP()+":") {
		t.Fatalf("image of a TLS page server: endpoint %q, tls %v", meta.Endpoint, meta.EndpointTLS)
	}
	out, err := cowmigCmdErr(b, "restore", "--image", img)
	if err == nil || !strings.Contains(out, "speaks TLS") {
		t.Errorf("restore without the CA: %v %q, want a refusal naming TLS", err, out)
	}
}

func newCA(t *testing.T) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "cowmig test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return ca, key
}

func newServerCert(t *testing.T, ca *x509.Certificate, caKey *ecdsa.PrivateKey, ip string) (cert, key []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: ip},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP(ip)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature}
	cert, err = x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	key, err = x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// cow = "fork" in the shim's config: the snapshot lives in a shadow
// process in the container (named cowmig-shadow, not counted as a second
// process by the next checkpoint), the clone on B holds exactly the
// source's memory, and a checkpoint with exit falls back to uffd (the
// shadow would die with the task), or is refused when fork was asked for.
func TestCtrForkCOW(t *testing.T) {
	needRoot(t)
	a, b := ctrtest.CowmigHosts(t, filepath.Dir(shimBin), func(string) string { return "cow = \"fork\"\n" })
	addrA := a.RunKV(t, "kv", shimapi.RuntimeName, "-mib", "64", "-port", kvPort)
	src := parseKV(t, query(t, a, addrA, "PAUSE"), "paused")
	img := filepath.Join(a.Dir(), "img")
	out := cowmigCmd(t, a, "checkpoint", "--address", a.Address(), "--namespace", a.Namespace(), "--image", img, "--json", "kv")
	var st live.CheckpointStats
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("checkpoint --json: %q: %v", out, err)
	}
	if st.COW != "fork" || st.ShadowPid == 0 {
		t.Fatalf("checkpoint with cow = fork: stats %+v, want cow fork and a shadow pid", st)
	}
	query(t, a, addrA, "RESUME")
	pidA, _ := a.TaskPid(t, "kv")
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", st.ShadowPid)); err != nil || !strings.Contains(string(b), fmt.Sprintf("(cowmig-shadow) t %d ", pidA)) {
		t.Fatalf("shadow %d: %q (%v), want cowmig-shadow stopped, child of the task's pid %d", st.ShadowPid, b, err, pidA)
	}
	// A second snapshot while the first's shadow lives.
	a.MustCtr(t, "container", "checkpoint", "--task", "kv", "ckpt/kv:fork2")

	imgB := filepath.Join(b.Dir(), "img")
	if out, err := exec.Command("cp", "-r", img, imgB).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	cowmigCmd(t, b, "restore", "--address", b.Address(), "--namespace", b.Namespace(), "--image", imgB, "clone")
	if got := parseKV(t, query(t, b, b.IP()+":"+kvPort, "VERIFY"), "verify ok"); got != src {
		t.Errorf("clone of a fork snapshot holds %+v, the source had %+v", got, src)
	}
	a.MoveImage(t, b, "ckpt/kv:fork2")
	b.MustCtr(t, "task", "kill", "-s", "KILL", "clone")
	waitStatus(t, b, "clone", "STOPPED", 10*time.Second)
	b.MustCtr(t, "container", "restore", "--live", "clone2", "ckpt/kv:fork2")
	parseKV(t, query(t, b, b.IP()+":"+kvPort, "VERIFY"), "verify ok")
	parseKV(t, query(t, a, addrA, "VERIFY"), "verify ok") // the source runs on

	// Exit: fork asked for explicitly is refused, the task runs on.
	if out, err := cowmigCmdErr(a, "checkpoint", "--address", a.Address(), "--namespace", a.Namespace(), "--image", img+"-x", "--cow", "fork", "--exit", "kv"); err == nil || !strings.Contains(out, "use uffd") {
		t.Errorf("checkpoint --cow fork --exit: %v %q, want a refusal", err, out)
	}
	parseKV(t, query(t, a, addrA, "VERIFY"), "verify ok")
	// The configured fork falls back to uffd.
	out = cowmigCmd(t, a, "checkpoint", "--address", a.Address(), "--namespace", a.Namespace(), "--image", img+"-exit", "--exit", "--json", "kv")
	var stx live.CheckpointStats
	if err := json.Unmarshal([]byte(out), &stx); err != nil || stx.COW != "uffd" || stx.ShadowPid != 0 {
		t.Errorf("checkpoint --exit with cow = fork configured: %q (%v), want cow uffd", out, err)
	}
}
