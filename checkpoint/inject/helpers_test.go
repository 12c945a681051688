package inject

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// targetBin is the test target built from testdata/target.c by TestMain
// ("" when not root or gcc is missing; the tests then skip).
var targetBin string

var targetBuildErr error

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "inject-test-")
	if err == nil && os.Geteuid() == 0 {
		// The unprivileged targets must be able to exec it.
		os.Chmod(dir, 0o755)
		bin := filepath.Join(dir, "target")
		out, cerr := exec.Command("gcc", "-O2", "-Wall", "-pthread", "-o", bin, "testdata/target.c").CombinedOutput()
		if cerr != nil {
			targetBuildErr = fmt.Errorf("gcc: %v: %s", cerr, out)
		} else {
			targetBin = bin
		}
	}
	code := m.Run()
	if dir != "" {
		os.RemoveAll(dir)
	}
	os.Exit(code)
}

// needTarget skips the test unless it runs as root with the target built.
func needTarget(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (ptrace of other users' processes, /dev/userfaultfd, set_tid)")
	}
	if targetBin == "" {
		t.Skipf("test target not built: %v", targetBuildErr)
	}
}

// checkFdLeak fails the test if it ends with more fds open in this process
// than it started with. Register it first so that it runs last.
func checkFdLeak(t testing.TB) {
	t.Helper()
	before := listOwnFds(t)
	t.Cleanup(func() {
		after := listOwnFds(t)
		if len(after) > len(before) {
			t.Errorf("fd leak: %d fds before, %d after: %v", len(before), len(after), diffKeys(after, before))
		}
	})
}

func listOwnFds(t testing.TB) map[string]string {
	return fdLinks(t, os.Getpid())
}

// fdLinks maps each fd of pid to its link target.
func fdLinks(t testing.TB, pid int) map[string]string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("read %s: %v", dir, err)
	}
	m := map[string]string{}
	for _, e := range ents {
		l, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // the ReadDir fd itself
		}
		m[e.Name()] = l
	}
	return m
}

func diffKeys(a, b map[string]string) []string {
	var d []string
	for k, v := range a {
		if b[k] != v {
			d = append(d, k+"->"+v)
		}
	}
	sort.Strings(d)
	return d
}

// target is a running test target.
type target struct {
	cmd   *exec.Cmd
	pid   int
	tid   int // the thread serving stdin
	stdin io.WriteCloser
	lines chan string
}

// startTarget runs targetBin mode and waits for its "ready" line. The
// target is killed and reaped at cleanup.
func startTarget(t testing.TB, mode string, configure func(*exec.Cmd)) *target {
	t.Helper()
	cmd := exec.Command(targetBin, mode)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if configure != nil {
		configure(cmd)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	tg := &target{cmd: cmd, pid: cmd.Process.Pid, stdin: stdin, lines: make(chan string, 100)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(tg.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			tg.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		stdin.Close()
		<-done
	})
	f := strings.Fields(tg.line(t))
	if len(f) != 3 || f[0] != "ready" {
		t.Fatalf("target said %q, want ready <pid> <tid>", f)
	}
	tg.tid, _ = strconv.Atoi(f[2])
	return tg
}

// line returns the target's next output line (fails after 10 s).
func (tg *target) line(t testing.TB) string {
	t.Helper()
	select {
	case l, ok := <-tg.lines:
		if !ok {
			t.Fatal("target closed its stdout")
		}
		return l
	case <-time.After(10 * time.Second):
		t.Fatal("no output from target in 10 s")
	}
	return ""
}

// ask sends one command line and returns the reply line.
func (tg *target) ask(t testing.TB, cmd string) string {
	t.Helper()
	if _, err := io.WriteString(tg.stdin, cmd+"\n"); err != nil {
		t.Fatalf("write %q to target: %v", cmd, err)
	}
	return tg.line(t)
}

// snapshot is what must be equal before Seize and after Detach.
type snapshot struct {
	fds  map[string]string
	maps string
}

func takeSnapshot(t testing.TB, pid int) snapshot {
	t.Helper()
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	return snapshot{fds: fdLinks(t, pid), maps: string(maps)}
}

// unchanged fails the test if pid's fds or maps differ from before.
func (before snapshot) unchanged(t testing.TB, pid int) {
	t.Helper()
	after := takeSnapshot(t, pid)
	if d := diffKeys(after.fds, before.fds); len(d) > 0 || len(after.fds) != len(before.fds) {
		t.Errorf("fds changed: before %v, after %v", before.fds, after.fds)
	}
	if before.maps != after.maps {
		t.Errorf("maps changed:\nbefore:\n%s\nafter:\n%s", before.maps, after.maps)
	}
}

// seizeT seizes pid and detaches at cleanup if the test did not.
func seizeT(t testing.TB, pid int, o Options) *Process {
	t.Helper()
	p, err := Seize(pid, o)
	if err != nil {
		t.Fatalf("seize %d: %v", pid, err)
	}
	t.Cleanup(func() {
		if err := p.Detach(); err != nil && !errors.Is(err, ErrClosed) {
			t.Errorf("cleanup detach: %v", err)
		}
	})
	return p
}

// waitFor polls cond (reading /proc) until it holds; it fails after 10 s.
// It is used only for states the target reports nowhere else (blocked in a
// syscall, group-stopped).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		runtime.Gosched()
	}
}

// inSyscall reports whether thread tid of pid is blocked in syscall nr.
func inSyscall(pid, tid int, nr int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/syscall", pid, tid))
	if err != nil {
		return false
	}
	f := strings.Fields(string(b))
	return len(f) > 0 && f[0] == strconv.Itoa(nr)
}

// procState returns the state letter of /proc/pid/stat.
func procState(pid int) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 || i+2 >= len(b) {
		return 0
	}
	return b[i+2]
}

// statusField returns a field of /proc/pid/status (or a task's).
func statusField(t testing.TB, path, key string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && k == key {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("%s: no %s", path, key)
	return ""
}

func unprivileged(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
}

// errnoOf extracts the errno of an injected syscall's error.
func errnoOf(err error) unix.Errno {
	var e unix.Errno
	if errors.As(err, &e) {
		return e
	}
	return 0
}

// tracerRunning reports whether a tracer goroutine exists. Detach returns
// once the goroutine closed its done channel, which it does just before it
// returns, so callers poll.
func tracerRunning() bool {
	buf := make([]byte, 1<<20)
	return bytes.Contains(buf[:runtime.Stack(buf, true)], []byte("(*tracer).loop"))
}

// stateOf returns thread tid's (0: the leader's) ThreadState and the
// process-wide pending signals, failing the test on error.
func stateOf(t testing.TB, p *Process, tid int) (ThreadState, []Siginfo) {
	t.Helper()
	if tid == 0 {
		tid = p.Pid()
	}
	sts, shared, err := p.ThreadStates()
	if err != nil {
		t.Fatalf("thread states: %v", err)
	}
	for _, st := range sts {
		if st.Tid == tid {
			return st, shared
		}
	}
	t.Fatalf("thread %d not among %d stopped threads", tid, len(sts))
	return ThreadState{}, nil
}
