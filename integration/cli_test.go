package integration

// Successful runs of the cowmig command: checkpoint in every mode, restore,
// inspect and release, checked through the clones' own memory verification.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/internal/testworkload"
)

// pagerTimeout bounds the wait for a pager to make every page local.
const pagerTimeout = 90 * time.Second

func mustCounter(t *testing.T, line, key string) uint64 {
	t.Helper()
	n, err := testworkload.Counter(line, key)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// waitPager waits for the clone's pager to exit and checks it succeeded.
// For a live image its log must say that every lazy page arrived.
func waitPager(t *testing.T, c *clone, lazy uint64) {
	t.Helper()
	e, err := waitExit(c.st.PagerPid, pagerTimeout)
	if err != nil {
		t.Fatalf("pager: %v; log:\n%s", err, c.pagerLog())
	}
	if !e.reaped || !e.status.Exited() || e.status.ExitStatus() != 0 {
		t.Fatalf("pager %d %v; log:\n%s", c.st.PagerPid, e, c.pagerLog())
	}
	if lazy > 0 {
		if want := fmt.Sprintf("all %d lazy pages local", lazy); !strings.Contains(c.pagerLog(), want) {
			t.Errorf("pager log lacks %q:\n%s", want, c.pagerLog())
		}
	}
}

// checkCloneIdentity checks that c is a new process with the source's pid
// inside its own pid namespace.
func checkCloneIdentity(t *testing.T, c *clone, src *testworkload.Proc, mode string, lazy uint64) {
	t.Helper()
	if c.st.Mode != mode || c.st.LazyPages != lazy {
		t.Errorf("restore reports mode %q, %d lazy pages; want %q, %d", c.st.Mode, c.st.LazyPages, mode, lazy)
	}
	if c.st.Pid == src.Pid || c.st.NSPid != src.Pid {
		t.Errorf("clone host pid %d ns pid %d; want a new host pid and ns pid %d", c.st.Pid, c.st.NSPid, src.Pid)
	}
	if got := nsPid(c.st.Pid); got != src.Pid {
		t.Errorf("clone %d sees itself as pid %d, want %d", c.st.Pid, got, src.Pid)
	}
}

func TestCheckpointRestore(t *testing.T) {
	for _, mode := range []string{"live", "full", "stop", "live-fork", "full-fork"} {
		t.Run(mode, func(t *testing.T) { testCheckpointRestore(t, mode) })
	}
}

// testCheckpointRestore checkpoints in mode ("live-fork" and "full-fork":
// live and full with --cow fork), restores and compares.
func testCheckpointRestore(t *testing.T, mode string) {
	h := newHarness(t)
	bin := testworkload.BuildC(t)
	fileMap := filepath.Join(t.TempDir(), "filemap")
	// No -fork: with a child alive at the snapshot instant the process
	// is a tree (TestCheckpointProcessWithChild); TestForkDuringLazyRestore
	// covers forks in a clone.
	src := testworkload.Start(t, []string{bin, "-mem", "128", "-threads", "2", "-thp", "-churn", "-filemap", fileMap, "-quiet"}, nil)
	before := verifySource(t, src)
	tids := tasks(t, src.Pid)
	fds := fdTable(t, src.Pid)
	dir := filepath.Join(t.TempDir(), "image")

	st := h.checkpoint(src.Pid, dir, mode)
	mode = strings.TrimSuffix(mode, "-fork")
	if got := tasks(t, src.Pid); !slices.Equal(got, tids) {
		t.Fatalf("source threads %v before the checkpoint, %v after", tids, got)
	}
	if got := fdTable(t, src.Pid); got != fds {
		t.Errorf("the checkpoint changed the source's fds:\nbefore:\n%s\nafter:\n%s", fds, got)
	}
	verifySource(t, src) // the source runs on, unharmed
	const minPages = 128 << 20 / image.PageSize
	if st.PagesTotal < minPages {
		t.Errorf("checkpoint holds %d pages, want ≥ %d (128 MiB of writers)", st.PagesTotal, minPages)
	}
	if mode == "live" {
		if !alive(st.ServerPid) || !strings.Contains(procCmdline(st.ServerPid), dir) {
			t.Fatalf("page server %d is not running (%q)", st.ServerPid, procCmdline(st.ServerPid))
		}
		if want := "unix:" + filepath.Join(dir, "pages.sock"); st.Endpoint != want {
			t.Errorf("endpoint %q, want %q", st.Endpoint, want)
		}
		if st.PagesLazy < minPages {
			t.Errorf("%d lazy pages, want ≥ %d", st.PagesLazy, minPages)
		}
	} else {
		if st.ServerPid != 0 || st.Endpoint != "" || st.PagesLazy != 0 {
			t.Errorf("%s checkpoint: server %d, endpoint %q, %d lazy pages; want none", mode, st.ServerPid, st.Endpoint, st.PagesLazy)
		}
		if fi, err := os.Stat(filepath.Join(dir, image.PagesFile)); err != nil || uint64(fi.Size()) < st.PagesEager*image.PageSize {
			t.Errorf("pages.img: %v; want ≥ %d pages", err, st.PagesEager)
		}
		// Restore must need no page server: there is none to release.
		if p := processesMentioning(dir); len(p) > 0 {
			t.Errorf("a %s checkpoint left processes behind: %v", mode, p)
		}
		checkFailure(t, h.run(runOpts{}, "release", "--image", dir), "release", "nothing to release")
	}

	in := h.inspect(dir)
	if !strings.Contains(in.header, "mode "+mode) {
		t.Errorf("inspect header %q does not say mode %s", in.header, mode)
	}
	if !slices.Equal(in.threads, tids) {
		t.Errorf("inspect lists threads %v, the source has %v", in.threads, tids)
	}
	var eager, lazy uint64
	var big *inspectVma
	for i, v := range in.vmas {
		eager, lazy = eager+v.eager, lazy+v.lazy
		if v.pages != v.eager+v.lazy {
			t.Errorf("inspect row %#x: %d pages != %d eager + %d lazy", v.start, v.pages, v.eager, v.lazy)
		}
		if v.kind == "anon" && v.end-v.start >= 64<<20 && v.pages*image.PageSize >= 64<<20 {
			big = &in.vmas[i]
		}
	}
	if big == nil {
		t.Errorf("inspect lists no populated anonymous mapping of ≥ 64 MiB: %+v", in.vmas)
	} else {
		t.Logf("inspect: %#x-%#x %s, %d pages", big.start, big.end, big.kind, big.pages)
	}
	if eager != st.PagesEager || lazy != st.PagesLazy {
		t.Errorf("inspect rows add up to %d eager and %d lazy pages, the checkpoint reported %d and %d", eager, lazy, st.PagesEager, st.PagesLazy)
	}

	c := h.restore(dir, runOpts{})
	checkCloneIdentity(t, c, src, mode, st.PagesLazy)
	pagerRunning := alive(c.st.PagerPid)
	first := c.verify(t)
	t.Logf("clone (pager running: %v): %s", pagerRunning, first)
	// The snapshot was taken after the first verify of the source.
	if a, b := mustCounter(t, before, "steps"), mustCounter(t, first, "steps"); b < a {
		t.Errorf("clone's steps %d < %d, the source's before the checkpoint", b, a)
	}
	waitPager(t, c, st.PagesLazy)
	second := c.verify(t)
	if a, b := mustCounter(t, first, "steps"), mustCounter(t, second, "steps"); b <= a {
		t.Errorf("clone's steps did not grow: %d then %d", a, b)
	}
	verifySource(t, src)

	if mode != "live" {
		return
	}
	// release ends the page server and keeps the image.
	if r := h.run(runOpts{}, "release", "--image", dir); r.code != 0 || r.stderr != "" {
		t.Errorf("%v: want exit 0 and silence", r)
	}
	e, err := waitExit(st.ServerPid, exitTimeout)
	if err != nil {
		t.Fatalf("page server after release: %v; log:\n%s", err, readFile(filepath.Join(dir, "server.log")))
	}
	if !e.reaped || !e.status.Exited() || e.status.ExitStatus() != 0 {
		t.Errorf("page server %v after release; log:\n%s", e, readFile(filepath.Join(dir, "server.log")))
	}
	if st.ShadowPid != 0 {
		// The shadow died with its snapshot: a zombie until the source
		// reaps it (its next checkpoint does).
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", st.ShadowPid)); err == nil && !strings.Contains(string(b), "(cowmig-shadow) Z") {
			t.Errorf("shadow %d after release: %s", st.ShadowPid, b)
		}
	}
	for _, f := range []string{image.MetaFile, image.PagesFile} {
		if !fileExists(filepath.Join(dir, f)) {
			t.Errorf("release removed %s", f)
		}
	}
	if again := h.inspect(dir); !slices.Equal(again.threads, tids) || len(again.vmas) != len(in.vmas) {
		t.Errorf("inspect after release differs: threads %v, %d mappings", again.threads, len(again.vmas))
	}
	c.verify(t)
	verifySource(t, src)
}

func readFile(p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	return string(b)
}

func TestTwoClonesOfOneSnapshot(t *testing.T) {
	h := newHarness(t)
	bin := testworkload.BuildC(t)
	src := testworkload.Start(t, []string{bin, "-mem", "64", "-threads", "2", "-churn", "-quiet"}, nil)
	dir := filepath.Join(t.TempDir(), "image")
	st := h.checkpoint(src.Pid, dir, "live")
	c1 := h.restore(dir, runOpts{})
	c2 := h.restore(dir, runOpts{})
	if c1.st.Pid == c2.st.Pid {
		t.Fatalf("both clones are pid %d", c1.st.Pid)
	}
	for _, c := range []*clone{c1, c2} {
		checkCloneIdentity(t, c, src, "live", st.PagesLazy)
		t.Logf("clone %d: %s", c.st.Pid, c.verify(t))
	}
	for _, c := range []*clone{c1, c2} {
		waitPager(t, c, st.PagesLazy)
	}
	// Independent copies: each clone's steps go on from the snapshot.
	for _, c := range []*clone{c1, c2} {
		t.Logf("clone %d: %s", c.st.Pid, c.verify(t))
	}
	verifySource(t, src)
	h.run(runOpts{}, "release", "--image", dir)
	if _, err := waitExit(st.ServerPid, exitTimeout); err != nil {
		t.Errorf("page server after release: %v", err)
	}
}

func TestPythonClone(t *testing.T) {
	h := newHarness(t)
	script := testworkload.PythonScript(t)
	src := testworkload.Start(t, []string{testworkload.Python, script, "256", "--quiet"}, nil)
	before := verifySource(t, src)
	dir := filepath.Join(t.TempDir(), "image")
	st := h.checkpoint(src.Pid, dir, "live")
	if st.PagesTotal*image.PageSize < 256<<20 {
		t.Fatalf("snapshot holds %d pages, want ≥ 256 MiB", st.PagesTotal)
	}
	c := h.restore(dir, runOpts{})
	checkCloneIdentity(t, c, src, "live", st.PagesLazy)
	first := c.verify(t)
	checkPythonVerify(t, first)
	if a, b := mustCounter(t, before, "step"), mustCounter(t, first, "step"); b < a {
		t.Errorf("clone's step %d < %d, the source's before the checkpoint", b, a)
	}
	waitPager(t, c, st.PagesLazy)
	second := c.verify(t)
	checkPythonVerify(t, second)
	t.Logf("clone: %s then %s", first, second)
	verifySource(t, src)
}

func checkPythonVerify(t *testing.T, line string) {
	t.Helper()
	f := testworkload.Fields(line)
	if !strings.HasPrefix(line, "verify ok step=") || len(f["sha"]) != 64 {
		t.Errorf("python verify line %q: want verify ok step=<n> sha=<sha256>", line)
	}
}

// tcpServer answers every connection with "hello <n>", n counting the
// connections it has served (state that lives only in its memory).
const tcpServer = `import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
print("ready", os.getpid(), flush=True)
n = 0
while True:
    c, _ = s.accept()
    n += 1
    c.sendall(("hello %d\n" % n).encode())
    c.close()
`

const tcpPort = 7411

// netns creates a network namespace with lo up, deleted at cleanup.
func netns(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skipf("needs iproute2's ip: %v", err)
	}
	exec.Command("ip", "netns", "del", name).Run() // a leftover of a killed run
	for _, args := range [][]string{{"netns", "add", name}, {"-n", name, "link", "set", "lo", "up"}} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v\n%s", name, err, out)
		}
	})
}

// hello connects to 127.0.0.1:port inside network namespace ns and returns
// the line the server sends.
func hello(ns string, port int) (string, error) {
	type result struct {
		line string
		err  error
	}
	done := make(chan result, 1)
	go func() {
		// The thread enters ns and is never unlocked: the runtime ends it
		// with this goroutine instead of reusing it in the wrong namespace.
		runtime.LockOSThread()
		line, err := helloOnThisThread(ns, port)
		done <- result{line, err}
	}()
	r := <-done
	return r.line, r.err
}

func helloOnThisThread(ns string, port int) (string, error) {
	f, err := os.Open("/run/netns/" + ns)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
		return "", fmt.Errorf("enter netns %s: %w", ns, err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 10}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return "", fmt.Errorf("connect to 127.0.0.1:%d in %s: %w", port, ns, err)
	}
	var got []byte
	buf := make([]byte, 64)
	for !strings.Contains(string(got), "\n") {
		n, err := unix.Read(fd, buf)
		if err != nil {
			return "", fmt.Errorf("read from 127.0.0.1:%d in %s: %w", port, ns, err)
		}
		if n == 0 {
			break
		}
		got = append(got, buf[:n]...)
	}
	return strings.TrimSpace(string(got)), nil
}

func mustHello(t *testing.T, ns string, want int) {
	t.Helper()
	line, err := hello(ns, tcpPort)
	if err != nil {
		t.Fatal(err)
	}
	if w := "hello " + strconv.Itoa(want); line != w {
		t.Fatalf("server in %s answered %q, want %q", ns, line, w)
	}
}

// A live checkpoint of a TCP server in netns A, restored into netns B:
// the clone listens there and its counter goes on from the snapshot.
func TestTCPListenerAcrossNetns(t *testing.T) {
	h := newHarness(t)
	nsA := fmt.Sprintf("cowmig-test-a-%d", os.Getpid())
	nsB := fmt.Sprintf("cowmig-test-b-%d", os.Getpid())
	netns(t, nsA)
	netns(t, nsB)
	script := pythonScript(t, "server.py", tcpServer)
	// ip netns exec execs the server: it keeps ip's pid.
	src := testworkload.Start(t, []string{"ip", "netns", "exec", nsA, testworkload.Python, script, strconv.Itoa(tcpPort)}, nil)
	if src.ReadyPid != src.Pid {
		t.Fatalf("server says pid %d, started %d", src.ReadyPid, src.Pid)
	}
	mustHello(t, nsA, 1)
	mustHello(t, nsA, 2)
	if line, err := hello(nsB, tcpPort); err == nil {
		t.Fatalf("netns B answers %q before the restore", line)
	}

	dir := filepath.Join(t.TempDir(), "image")
	st := h.checkpoint(src.Pid, dir, "live")
	mustHello(t, nsA, 3) // the source serves on

	c := h.restore(dir, runOpts{prefix: []string{"ip", "netns", "exec", nsB}})
	checkCloneIdentity(t, c, src, "live", st.PagesLazy)
	// The clone's memory is the snapshot's: two connections served.
	mustHello(t, nsB, 3)
	mustHello(t, nsB, 4)
	mustHello(t, nsA, 4)
	waitPager(t, c, st.PagesLazy)
	mustHello(t, nsB, 5)
	mustHello(t, nsA, 5)
}

// forkCheck holds MiB of random bytes and, on SIGUSR1, forks a child that
// checks them against the checksum taken at start: "verify ok" if the
// child exits 0. It forks only on request, so a snapshot never holds a
// child.
const forkCheck = `import hashlib, os, signal, sys
buf = bytearray(os.urandom(1 << 20)) * int(sys.argv[1])
want = hashlib.sha256(buf).hexdigest()
sigs = {signal.SIGUSR1, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
print("ready", os.getpid(), flush=True)
while signal.sigwait(sigs) == signal.SIGUSR1:
    pid = os.fork()
    if pid == 0:
        os._exit(0 if hashlib.sha256(buf).hexdigest() == want else 1)
    _, st = os.waitpid(pid, 0)
    if st == 0:
        print("verify ok child=%d sha=%s" % (pid, want), flush=True)
    else:
        print("verify FAIL child %d wait status %#x" % (pid, st), flush=True)
`

// A child forked by a clone while its pages are still arriving must see
// the snapshot's memory, not zeros.
func TestForkDuringLazyRestore(t *testing.T) {
	h := newHarness(t)
	script := pythonScript(t, "forkcheck.py", forkCheck)
	src := testworkload.Start(t, []string{testworkload.Python, script, "256"}, nil)
	want := testworkload.Fields(verifySource(t, src))["sha"]
	dir := filepath.Join(t.TempDir(), "image")
	st := h.checkpoint(src.Pid, dir, "live")
	c := h.restore(dir, runOpts{})
	if !alive(c.st.PagerPid) {
		t.Fatalf("the pager finished before the clone forked; the test proves nothing; log:\n%s", c.pagerLog())
	}
	line := c.verify(t) // the parent has touched almost nothing yet
	t.Logf("clone: %s", line)
	if got := testworkload.Fields(line)["sha"]; got != want {
		t.Errorf("clone's checksum %s, the source's %s", got, want)
	}
	waitPager(t, c, st.PagesLazy)
	c.verify(t)
	verifySource(t, src)
}

// A clone keeps its name and command line; when it exits, its namespace
// (the restore stub) goes away with it.
func TestCloneLifecycle(t *testing.T) {
	h := newHarness(t)
	bin := testworkload.BuildC(t)
	src := testworkload.Start(t, []string{bin, "-mem", "8", "-threads", "1", "-quiet"}, nil)
	dir := filepath.Join(t.TempDir(), "image")
	h.checkpoint(src.Pid, dir, "full")
	c := h.restore(dir, runOpts{})
	c.verify(t)
	waitPager(t, c, 0)
	if a, b := procComm(src.Pid), procComm(c.st.Pid); a != b {
		t.Errorf("clone's comm is %q, the source's %q", b, a)
	}
	if a, b := procCmdline(src.Pid), procCmdline(c.st.Pid); a != b {
		t.Errorf("clone's command line is %q, the source's %q", b, a)
	}
	if err := c.Signal(unix.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if _, err := waitExit(c.st.Pid, exitTimeout); err != nil {
		t.Fatalf("clone did not exit on SIGTERM: %v", err)
	}
	if e, err := waitExit(c.stub, 5*time.Second); err != nil {
		t.Errorf("the clone exited but its namespace did not: restore stub: %v", err)
	} else {
		t.Logf("restore stub %v", e)
	}
	checkNoLeftovers(t, src.Pid)
}

// A clone that exits while its pages are still arriving must not leave
// its pager or namespace behind, and its pager must not report (to its
// log and to the page server) that it made every page local.
func TestCloneExitsDuringLazyPhase(t *testing.T) {
	h := newHarness(t)
	bin := testworkload.BuildC(t)
	src := testworkload.Start(t, []string{bin, "-mem", "512", "-threads", "2", "-quiet"}, nil)
	dir := filepath.Join(t.TempDir(), "image")
	st := h.checkpoint(src.Pid, dir, "live")
	c := h.restore(dir, runOpts{})
	restored := time.Now()
	if !alive(c.st.PagerPid) || c.pagerLog() != "" {
		t.Fatalf("the pager finished before the test could stop the clone; the test proves nothing; log:\n%s", c.pagerLog())
	}
	start := time.Now()
	if err := c.Signal(unix.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if _, err := waitExit(c.st.Pid, exitTimeout); err != nil {
		t.Fatalf("clone did not exit on SIGTERM: %v", err)
	}
	exited, gone := time.Since(start), time.Since(restored)
	if e, err := waitExit(c.st.PagerPid, 10*time.Second); err != nil {
		t.Errorf("the clone exited during the lazy phase; its pager did not: %v; log:\n%s", err, c.pagerLog())
	} else {
		t.Logf("clone exited %v after SIGTERM; pager %v; log: %s", exited, e, c.pagerLog())
	}
	// "all N lazy pages local after D", D counted from about when the
	// restore returned: a clone gone before D never got them all.
	log := c.pagerLog()
	if _, after, ok := strings.Cut(log, "lazy pages local after "); ok {
		d, err := time.ParseDuration(strings.TrimSpace(after))
		if err != nil {
			t.Fatalf("pager log %q: %v", log, err)
		}
		if gone < d {
			t.Errorf("the clone was gone %v after the restore, yet its pager reports every one of %d pages local after %v: %s",
				gone, st.PagesLazy, d, strings.TrimSpace(log))
		}
	}
	if _, err := waitExit(c.stub, 5*time.Second); err != nil {
		t.Errorf("restore stub: %v", err)
	}
	checkNoLeftovers(t, src.Pid, st.ServerPid)
	verifySource(t, src)
}
