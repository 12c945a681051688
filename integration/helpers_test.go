package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/internal/ctrtest"
	"github.com/cowmig/cowmig/internal/testworkload"
)

// cowmigBin is the command under test. TestMain builds it once before any
// test runs; it is read-only afterwards.
var cowmigBin, shimBin string

const (
	// cliTimeout bounds one cowmig invocation.
	cliTimeout = 2 * time.Minute
	// exitTimeout bounds the wait for a daemon or clone to go away.
	exitTimeout = 30 * time.Second
)

func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "cowmig-cli-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "integration: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	// uid 65534 runs the binary too (TestCheckpointNoPermission).
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "integration: %v\n", err)
		return 1
	}
	root, err := ctrtest.ModuleRoot()
	if err != nil {
		fmt.Fprintf(os.Stderr, "integration: %v\n", err)
		return 1
	}
	bin := filepath.Join(dir, "cowmig")
	build := exec.Command(ctrtest.GoTool(), "build", "-o", bin, "./cmd/cowmig")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "integration: go build ./cmd/cowmig: %v\n%s", err, out)
		return 1
	}
	cowmigBin = bin
	// The containerd tests put this directory on containerd's PATH.
	shimBin = filepath.Join(dir, "containerd-shim-cowmig-v2")
	build = exec.Command(ctrtest.GoTool(), "build", "-o", shimBin, "./cmd/containerd-shim-cowmig-v2")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "integration: go build ./cmd/containerd-shim-cowmig-v2: %v\n%s", err, out)
		return 1
	}
	if os.Geteuid() == 0 {
		// The daemons the command leaves behind (page server, pager) and
		// the clones' namespace stubs are reparented to this process when
		// their parents exit: tests can then reap them, read their exit
		// status, and see any that leak.
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			fmt.Fprintf(os.Stderr, "integration: become a subreaper: %v\n", err)
			return 1
		}
	}
	return m.Run()
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// pythonScript writes a Python program into a temporary file for
// testworkload.Python to run. A missing interpreter fails the test: make
// deps installs it, so a skip would only hide a broken setup.
func pythonScript(t *testing.T, name, src string) string {
	t.Helper()
	if _, err := os.Stat(testworkload.Python); err != nil {
		t.Fatalf("needs %s (make deps installs python3): %v", testworkload.Python, err)
	}
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: cowmig uses ptrace, userfaultfd, pid and network namespaces")
	}
}

// harness runs the command for one test.
type harness struct {
	t *testing.T
	// tmp is TMPDIR of every run: restore logs and stub directories land
	// here, not in the shared /tmp.
	tmp string
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	needRoot(t)
	h := &harness{t: t, tmp: t.TempDir()}
	t.Cleanup(func() {
		// Stubs run from TMPDIR: one still here outlived its clone.
		for pid := stubUnder(h.tmp); pid != 0; pid = stubUnder(h.tmp) {
			t.Errorf("restore stub %d (%s) outlived the test", pid, procCmdline(pid))
			killComm(t, pid, "cowmig-stub")
		}
	})
	return h
}

// runOpts adjust one invocation.
type runOpts struct {
	// prefix runs the command under another one (ip netns exec NS).
	prefix []string
	// cred runs the command as another user.
	cred *syscall.Credential
}

// cliResult is one finished invocation.
type cliResult struct {
	args           []string
	pid            int
	code           int
	stdout, stderr string
}

func (r cliResult) String() string {
	return fmt.Sprintf("cowmig %s: exit %d, stdout %q, stderr %q", strings.Join(r.args, " "), r.code, r.stdout, r.stderr)
}

// run runs cowmig with args and returns its exit code and output. It
// fails the test only if the command cannot run or hangs.
func (h *harness) run(o runOpts, args ...string) cliResult {
	h.t.Helper()
	argv := append(append(append([]string(nil), o.prefix...), cowmigBin), args...)
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	// GOTRACEBACK: a hung daemon's SIGQUIT dump (quitDaemons) shows
	// every goroutine.
	cmd.Env = append(os.Environ(), "TMPDIR="+h.tmp, "GOTRACEBACK=all")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// A daemon that kept the command's stdout or stderr would make Wait
	// hang: the check below reports it instead.
	cmd.WaitDelay = 10 * time.Second
	if o.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: o.cred}
	}
	err := cmd.Run()
	r := cliResult{args: args, stdout: stdout.String(), stderr: stderr.String()}
	if cmd.Process != nil {
		r.pid = cmd.Process.Pid
	}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case errors.Is(err, exec.ErrWaitDelay):
		h.t.Fatalf("%v: a process it left behind still holds its stdout or stderr", r)
	case ctx.Err() != nil:
		h.t.Fatalf("%v: did not finish within %v\n%s", r, cliTimeout, quitDaemons(imageArg(args)))
	case errors.As(err, &exitErr):
		r.code = exitErr.ExitCode()
	default:
		h.t.Fatalf("run %q: %v", argv, err)
	}
	return r
}

// imageArg returns the value of --image in args.
func imageArg(args []string) string {
	for i, a := range args {
		if a == "--image" && i+1 < len(args) {
			return args[i+1]
		}
	}
	return cowmigBin
}

// quitDaemons ends the daemons a hung command left behind for image dir:
// it reports their threads, then SIGQUIT makes each dump its goroutines to
// its stderr, whose tail it returns.
func quitDaemons(dir string) string {
	var b strings.Builder
	for _, pid := range children() {
		cmdline := procCmdline(pid)
		if !alive(pid) || !strings.Contains(cmdline, cowmigBin) || !strings.Contains(cmdline, dir) {
			continue
		}
		errPath, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/2", pid))
		fmt.Fprintf(&b, "daemon %d (%s):\n%s", pid, cmdline, threadReport(pid))
		_ = unix.Kill(pid, unix.SIGQUIT)
		if _, err := waitExit(pid, 5*time.Second); err != nil {
			_ = unix.Kill(pid, unix.SIGKILL)
			_, _ = waitExit(pid, 5*time.Second)
		}
		if errPath != "" {
			e, _ := os.ReadFile(errPath)
			fmt.Fprintf(&b, "its stderr %s:\n%s\n", errPath, e[max(0, len(e)-8000):])
		}
	}
	return b.String()
}

// threadReport describes what pid's threads are doing.
func threadReport(pid int) string {
	var b strings.Builder
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, e := range ents {
		d := fmt.Sprintf("/proc/%d/task/%s/", pid, e.Name())
		stat, _ := os.ReadFile(d + "stat")
		wchan, _ := os.ReadFile(d + "wchan")
		sc, _ := os.ReadFile(d + "syscall")
		stack, _ := os.ReadFile(d + "stack")
		fmt.Fprintf(&b, "  thread %s: %s wchan %s syscall %s\n    %s\n", e.Name(), strings.TrimSpace(string(stat)), wchan,
			strings.TrimSpace(string(sc)), strings.ReplaceAll(strings.TrimSpace(string(stack)), "\n", "\n    "))
	}
	return b.String()
}

// verifySource asks a source workload to verify itself; on failure it
// reports what its threads are doing.
func verifySource(t *testing.T, src *testworkload.Proc) string {
	t.Helper()
	line, err := src.VerifyLine(testworkload.DefaultTimeout)
	if err != nil {
		t.Fatalf("verify source %d: %v\n%s", src.Pid, err, threadReport(src.Pid))
	}
	return line
}

// mustRun runs cowmig and fails the test unless it exits 0.
func (h *harness) mustRun(o runOpts, args ...string) cliResult {
	h.t.Helper()
	r := h.run(o, args...)
	if r.code != 0 {
		h.t.Fatalf("%v", r)
	}
	return r
}

// checkpointStats is `cowmig checkpoint --json`.
type checkpointStats struct {
	Mode       string             `json:"mode"`
	COW        string             `json:"cow"`
	ShadowPid  int                `json:"shadow_pid"`
	Image      string             `json:"image"`
	Pid        int                `json:"pid"`
	FreezeMs   float64            `json:"freeze_ms"`
	PagesTotal uint64             `json:"pages_total"`
	PagesEager uint64             `json:"pages_eager"`
	PagesLazy  uint64             `json:"pages_lazy"`
	Endpoint   string             `json:"endpoint"`
	ServerPid  int                `json:"server_pid"`
	PhasesMs   map[string]float64 `json:"phases_ms"`
}

// checkpoint runs `cowmig checkpoint --json` of pid into dir in mode (a
// mode "live-fork" or "full-fork" adds --cow fork) and checks the output's
// consistency. A page server it starts is killed when the test ends.
func (h *harness) checkpoint(pid int, dir, mode string) checkpointStats {
	h.t.Helper()
	args := []string{"checkpoint", "--pid", strconv.Itoa(pid), "--image", dir, "--json"}
	cow := ""
	if m, ok := strings.CutSuffix(mode, "-fork"); ok {
		mode, cow = m, "fork"
		args = append(args, "--cow", "fork")
	}
	r := h.mustRun(runOpts{}, append(args, "--mode", mode)...)
	var st checkpointStats
	decodeOneJSON(h.t, r, &st)
	if r.stderr != "" {
		h.t.Errorf("%v: want nothing on stderr", r)
	}
	if st.ServerPid != 0 {
		h.t.Cleanup(func() { killDaemon(h.t, st.ServerPid, dir) })
	}
	h.t.Logf("checkpoint %s of pid %d: froze %.1f ms, %d pages (%d eager, %d lazy), server %d",
		mode, pid, st.FreezeMs, st.PagesTotal, st.PagesEager, st.PagesLazy, st.ServerPid)
	if st.Mode != mode || st.Pid != pid || st.Image != dir {
		h.t.Fatalf("checkpoint reports mode %q pid %d image %q, want %q %d %q", st.Mode, st.Pid, st.Image, mode, pid, dir)
	}
	if mode != "stop" && (st.COW != cow && !(cow == "" && st.COW == "uffd")) {
		h.t.Fatalf("checkpoint reports copy-on-write %q, want %q", st.COW, cow)
	}
	if (cow == "fork" && mode == "live") != (st.ShadowPid != 0) {
		h.t.Fatalf("checkpoint reports shadow pid %d (cow %q, mode %s)", st.ShadowPid, cow, mode)
	}
	if st.PagesEager+st.PagesLazy != st.PagesTotal {
		h.t.Errorf("checkpoint --json: %d eager + %d lazy pages != %d total", st.PagesEager, st.PagesLazy, st.PagesTotal)
	}
	return st
}

// decodeOneJSON checks that r printed exactly one JSON line and decodes it.
func decodeOneJSON(t *testing.T, r cliResult, v any) {
	t.Helper()
	if strings.Count(r.stdout, "\n") != 1 || !strings.HasSuffix(r.stdout, "\n") {
		t.Fatalf("%v: want one line of JSON on stdout", r)
	}
	if err := json.Unmarshal([]byte(r.stdout), v); err != nil {
		t.Fatalf("%v: decode JSON: %v", r, err)
	}
}

// restoreStats is `cowmig restore --json`.
type restoreStats struct {
	Pid       int     `json:"pid"`
	NSPid     int     `json:"ns_pid"`
	RestoreMs float64 `json:"restore_ms"`
	Mode      string  `json:"mode"`
	LazyPages uint64  `json:"lazy_pages"`
	PagerPid  int     `json:"pager_pid"`
}

// clone is a restored workload whose stdout the test reads.
type clone struct {
	*testworkload.Proc
	st restoreStats
	// cliPid is the restore command's pid: it names the pager's log.
	cliPid int
	// stub is pid 1 of the clone's pid namespace.
	stub int
	// logPath is the pager's log.
	logPath string
	// stderrPath is where the clone's fd 2 pointed after the restore.
	stderrPath string
}

// restore runs `cowmig restore --json` with the clone's stdout on a FIFO
// the test reads. The clone, its namespace and its pager are killed when
// the test ends.
func (h *harness) restore(dir string, o runOpts) *clone {
	h.t.Helper()
	t := h.t
	fifoDir := t.TempDir()
	fifo := filepath.Join(fifoDir, "stdout")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatalf("mkfifo: %v", err)
	}
	// O_RDWR: the open does not wait for a writer, and the command's own
	// open for writing does not wait for a reader.
	out, err := os.OpenFile(fifo, os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("open %s: %v", fifo, err)
	}
	errPath := filepath.Join(fifoDir, "stderr")
	r := h.run(o, "restore", "--image", dir, "--stdin", "/dev/null", "--stdout", fifo, "--stderr", errPath, "--json")
	if r.code != 0 {
		out.Close()
		t.Fatalf("%v", r)
	}
	c := &clone{cliPid: r.pid, logPath: filepath.Join(h.tmp, fmt.Sprintf("cowmig-restore-%d.log", r.pid))}
	var st restoreStats
	decodeOneJSON(t, r, &st)
	if r.stderr != "" {
		t.Errorf("%v: want nothing on stderr", r)
	}
	c.st = st
	c.Proc = testworkload.Attach(c.st.Pid, out)
	c.stub = procPPid(c.st.Pid)
	c.stderrPath, _ = os.Readlink(fmt.Sprintf("/proc/%d/fd/2", c.st.Pid))
	if c.stub == 0 {
		// The clone is gone already: find its namespace's stub by the
		// directory it runs from.
		c.stub = stubUnder(h.tmp)
	}
	t.Cleanup(func() {
		c.Close()
		// SIGKILL to pid 1 of the namespace ends the clone with it.
		killComm(t, c.stub, "cowmig-stub")
		killComm(t, c.st.Pid, "")
		killDaemon(t, c.st.PagerPid, "__restore-daemon")
	})
	if c.st.Pid <= 0 || c.st.PagerPid <= 0 {
		t.Fatalf("%v: want the clone's and the pager's pids", r)
	}
	if comm := procComm(c.stub); comm != "cowmig-stub" {
		t.Fatalf("clone %d (state %q): parent %d is %q, want the restore stub\n%s", c.st.Pid, procState(c.st.Pid), c.stub, comm, c.diagnosis())
	}
	t.Logf("restored pid %d (host %d) in %.1f ms, %d lazy pages, pager %d", c.st.NSPid, c.st.Pid, c.st.RestoreMs, c.st.LazyPages, c.st.PagerPid)
	return c
}

// stubUnder returns a live restore stub whose executable lies under dir.
func stubUnder(dir string) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err == nil && procComm(pid) == "cowmig-stub" && alive(pid) && strings.HasPrefix(procCmdline(pid), dir+"/") {
			return pid
		}
	}
	return 0
}

// verify asks the clone to verify itself; on failure it reports what the
// clone, its stub and its pager are doing.
func (c *clone) verify(t *testing.T) string {
	t.Helper()
	line, err := c.VerifyLine(testworkload.DefaultTimeout)
	if err != nil {
		t.Fatalf("verify clone %d: %v\n%s", c.st.Pid, err, c.diagnosis())
	}
	return line
}

// diagnosis describes the clone's threads, its pager and the kernel log.
func (c *clone) diagnosis() string {
	var b strings.Builder
	fmt.Fprintf(&b, "clone %d state %q, stub %d state %q, pager %d state %q\n", c.st.Pid, procState(c.st.Pid), c.stub, procState(c.stub), c.st.PagerPid, procState(c.st.PagerPid))
	b.WriteString(threadReport(c.st.Pid))
	fmt.Fprintf(&b, "pager log:\n%s", c.pagerLog())
	if c.stderrPath != "" {
		e, _ := os.ReadFile(c.stderrPath)
		fmt.Fprintf(&b, "\nclone's stderr %s (shared with the source):\n%s", c.stderrPath, e[max(0, len(e)-1500):])
	}
	if out, err := exec.Command("dmesg").Output(); err == nil {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		fmt.Fprintf(&b, "\ndmesg tail:\n%s", strings.Join(lines[max(0, len(lines)-8):], "\n"))
	}
	return b.String()
}

// pagerLog returns the pager's log (empty if missing).
func (c *clone) pagerLog() string {
	b, _ := os.ReadFile(c.logPath)
	return string(b)
}

// killDaemon SIGKILLs pid if its command line still mentions marker (a
// pid may have been reused), then waits for it to go away.
func killDaemon(t *testing.T, pid int, marker string) {
	t.Helper()
	if pid <= 0 || !strings.Contains(procCmdline(pid), marker) {
		return
	}
	_ = unix.Kill(pid, unix.SIGKILL)
	if _, err := waitExit(pid, exitTimeout); err != nil {
		t.Errorf("cleanup: %v", err)
	}
}

// killComm SIGKILLs pid if its comm is comm ("" for any), then waits.
func killComm(t *testing.T, pid int, comm string) {
	t.Helper()
	if pid <= 0 {
		return
	}
	c := procComm(pid)
	if c == "" || (comm != "" && c != comm) || procState(pid) == "Z" {
		reapIfChild(pid)
		return
	}
	_ = unix.Kill(pid, unix.SIGKILL)
	if _, err := waitExit(pid, exitTimeout); err != nil {
		t.Errorf("cleanup: %v", err)
	}
}

// procExit is how a process ended; status is known only if this process
// reaped it.
type procExit struct {
	reaped bool
	status unix.WaitStatus
}

func (e procExit) String() string {
	switch {
	case !e.reaped:
		return "exited (status unknown: not our child)"
	case e.status.Exited():
		return fmt.Sprintf("exited with status %d", e.status.ExitStatus())
	case e.status.Signaled():
		return fmt.Sprintf("killed by %v", e.status.Signal())
	}
	return fmt.Sprintf("wait status %#x", uint32(e.status))
}

// waitExit polls until pid has exited: reaped here if it is our child
// (daemons are, through the subreaper), else gone or a zombie in /proc.
func waitExit(pid int, timeout time.Duration) (procExit, error) {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		var ws unix.WaitStatus
		wpid, err := unix.Wait4(pid, &ws, unix.WNOHANG|unix.WALL, nil)
		switch {
		case err == nil && wpid == pid:
			return procExit{reaped: true, status: ws}, nil
		case errors.Is(err, unix.ECHILD):
			if s := procState(pid); s == "" || s == "Z" || s == "X" {
				return procExit{}, nil
			}
		}
		if time.Now().After(deadline) {
			return procExit{}, fmt.Errorf("pid %d (%s, state %s) still running after %v", pid, procComm(pid), procState(pid), timeout)
		}
		<-tick.C
	}
}

// reapIfChild reaps pid if it is a zombie child of this process.
func reapIfChild(pid int) {
	var ws unix.WaitStatus
	_, _ = unix.Wait4(pid, &ws, unix.WNOHANG|unix.WALL, nil)
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	s := procState(pid)
	return s != "" && s != "Z" && s != "X"
}

// procStat returns the fields of /proc/pid/stat after the command name
// (state first), or nil.
func procStat(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil
	}
	return strings.Fields(string(b[i+1:]))
}

func procState(pid int) string {
	if f := procStat(pid); len(f) > 0 {
		return f[0]
	}
	return ""
}

func procPPid(pid int) int {
	if f := procStat(pid); len(f) > 1 {
		n, _ := strconv.Atoi(f[1])
		return n
	}
	return 0
}

func procComm(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func procCmdline(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return ""
	}
	return strings.ReplaceAll(string(b), "\x00", " ")
}

// nsPid is pid's pid in its innermost pid namespace.
func nsPid(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "NSpid:"); ok {
			f := strings.Fields(v)
			n, _ := strconv.Atoi(f[len(f)-1])
			return n
		}
	}
	return 0
}

// tasks returns pid's thread ids, sorted.
func tasks(t *testing.T, pid int) []int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatalf("threads of %d: %v", pid, err)
	}
	var tids []int
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err == nil {
			tids = append(tids, n)
		}
	}
	sort.Ints(tids)
	return tids
}

// fdTable describes pid's open descriptors ("fd -> target" lines).
func fdTable(t *testing.T, pid int) string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("fds of %d: %v", pid, err)
	}
	var lines []string
	for _, e := range ents {
		target, _ := os.Readlink(filepath.Join(dir, e.Name()))
		lines = append(lines, e.Name()+" -> "+target)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// openFds counts this process's open descriptors.
func openFds(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("list own fds: %v", err)
	}
	return len(ents) - 1 // the directory being read
}

// children lists the processes whose parent is this process (through the
// subreaper: also everything the command left behind), except allowed.
func children(allowed ...int) []int {
	self := os.Getpid()
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || procPPid(pid) != self {
			continue
		}
		skip := false
		for _, a := range allowed {
			skip = skip || a == pid
		}
		if !skip {
			out = append(out, pid)
		}
	}
	return out
}

// checkNoLeftovers waits briefly for every process the command left
// behind to exit (reaping it) and fails the test for any that does not.
// allowed are the test's own processes (workloads, daemons it keeps).
func checkNoLeftovers(t *testing.T, allowed ...int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		var live []string
		for _, pid := range children(allowed...) {
			if alive(pid) {
				live = append(live, fmt.Sprintf("%d (%s)", pid, procCmdline(pid)))
			} else {
				reapIfChild(pid)
			}
		}
		if len(live) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("processes left behind: %s", strings.Join(live, ", "))
			return
		}
		<-tick.C
	}
}

// processesMentioning lists live processes whose command line contains s.
func processesMentioning(s string) []string {
	ents, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() || !alive(pid) {
			continue
		}
		if c := procCmdline(pid); strings.Contains(c, s) {
			out = append(out, fmt.Sprintf("%d (%s)", pid, c))
		}
	}
	return out
}

// checkFailure checks a failed command: non-zero exit, nothing on stdout,
// exactly one line "cowmig <cmd>: <reason>" on stderr that contains each
// of wants.
func checkFailure(t *testing.T, r cliResult, cmd string, wants ...string) {
	t.Helper()
	if r.code == 0 {
		t.Fatalf("%v: want a failure", r)
	}
	if strings.Count(r.stderr, "\n") != 1 || !strings.HasSuffix(r.stderr, "\n") {
		t.Errorf("%v: want exactly one line on stderr", r)
	}
	first, _, _ := strings.Cut(r.stderr, "\n")
	if !strings.HasPrefix(first, "cowmig "+cmd+": ") {
		t.Errorf("%v: stderr does not start with %q", r, "cowmig "+cmd+": ")
	}
	for _, w := range wants {
		if !strings.Contains(first, w) {
			t.Errorf("%v: message does not mention %q", r, w)
		}
	}
	if r.stdout != "" {
		t.Errorf("%v: want nothing on stdout", r)
	}
	t.Logf("failed as expected: %s", first)
}

// checkRunning fails the test if pid is gone or stopped.
func checkRunning(t *testing.T, pid int) {
	t.Helper()
	switch s := procState(pid); s {
	case "", "Z", "X":
		t.Fatalf("pid %d is gone", pid)
	case "T", "t":
		t.Fatalf("pid %d is left stopped (state %s)", pid, s)
	}
}
