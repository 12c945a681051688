package integration

// Failures of the cowmig command: each must exit non-zero with one line
// naming the problem, leave the source running and verifying, and leave
// no daemon, clone, descriptor or socket behind.

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/internal/testworkload"
)

// checkClean checks what a failed command may not leave behind: processes
// (other than allowed), processes naming dir, a page-server socket in dir
// and descriptors of this process beyond fds.
func checkClean(t *testing.T, dir string, fds int, allowed ...int) {
	t.Helper()
	checkNoLeftovers(t, allowed...)
	if p := processesMentioning(dir); len(p) > 0 {
		t.Errorf("processes left behind for %s: %v", dir, p)
	}
	if fileExists(filepath.Join(dir, "pages.sock")) {
		t.Errorf("the failed command left %s", filepath.Join(dir, "pages.sock"))
	}
	if n := openFds(t); n != fds {
		t.Errorf("this process has %d fds, %d before the command", n, fds)
	}
}

// tracerPid is pid's TracerPid.
func tracerPid(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "TracerPid:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// checkSourceOK checks that a source survived a failed command: running,
// not stopped, not traced, memory intact.
func checkSourceOK(t *testing.T, src *testworkload.Proc) {
	t.Helper()
	checkRunning(t, src.Pid)
	if tp := tracerPid(src.Pid); tp != "0" {
		t.Errorf("pid %d is still traced by %s", src.Pid, tp)
	}
	verifySource(t, src)
}

func TestCheckpointMissingPid(t *testing.T) {
	h := newHarness(t)
	// Pids are below pid_max: pid_max itself never exists.
	b, err := os.ReadFile("/proc/sys/kernel/pid_max")
	if err != nil {
		t.Fatal(err)
	}
	pid := strings.TrimSpace(string(b))
	for _, mode := range []string{"live", "stop"} {
		t.Run(mode, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "image")
			fds := openFds(t)
			r := h.run(runOpts{}, "checkpoint", "--pid", pid, "--image", dir, "--mode", mode)
			checkFailure(t, r, "checkpoint", "pid "+pid, "no such process")
			checkClean(t, dir, fds)
		})
	}
}

// fdHolder runs pyworkload with an extra descriptor of the given kind at
// fd 50, which cowmig cannot checkpoint.
const fdHolder = `import os, runpy, select, sys
kind, script = sys.argv[1], sys.argv[2]
if kind == "epoll":
    holder = select.epoll()
    os.dup2(holder.fileno(), 50)
    holder.close()
else:
    fd = os.eventfd(0)
    os.dup2(fd, 50)
    os.close(fd)
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
`

func TestCheckpointUnsupportedFd(t *testing.T) {
	h := newHarness(t)
	script := testworkload.PythonScript(t)
	holder := filepath.Join(t.TempDir(), "holder.py")
	if err := os.WriteFile(holder, []byte(fdHolder), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"epoll", "eventfd"} {
		t.Run(kind, func(t *testing.T) {
			src := testworkload.Start(t, []string{testworkload.Python, holder, kind, script, "16", "--quiet"}, nil)
			verifySource(t, src)
			target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/50", src.Pid))
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]string{"epoll": "eventpoll", "eventfd": "eventfd"}[kind]
			if !strings.Contains(target, want) {
				t.Fatalf("fd 50 of the holder is %q, want %s", target, want)
			}
			// Both paths: the live checkpoint runs in a daemon, stop in
			// the command; a second attempt must fail the same way.
			srcFds := fdTable(t, src.Pid)
			for _, mode := range []string{"live", "stop"} {
				dir := filepath.Join(t.TempDir(), "image")
				fds := openFds(t)
				r := h.run(runOpts{}, "checkpoint", "--pid", strconv.Itoa(src.Pid), "--image", dir, "--mode", mode)
				checkFailure(t, r, "checkpoint", fmt.Sprintf("pid %d", src.Pid), "fd 50", want, "unsupported")
				checkClean(t, dir, fds, src.Pid)
				checkSourceOK(t, src)
				if got := fdTable(t, src.Pid); got != srcFds {
					t.Errorf("the failed checkpoint changed the source's fds:\nbefore:\n%s\nafter:\n%s", srcFds, got)
				}
			}
		})
	}
}

func TestCheckpointNoPermission(t *testing.T) {
	h := newHarness(t)
	bin := testworkload.BuildC(t)
	src := testworkload.Start(t, []string{bin, "-mem", "8", "-threads", "1", "-quiet"}, nil)
	// A directory uid 65534 may write the image into: the failure must
	// be the one about the process, not about the directory.
	base, err := os.MkdirTemp("", "cowmig-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o777); err != nil {
		t.Fatal(err)
	}
	nobody := runOpts{cred: &syscall.Credential{Uid: 65534, Gid: 65534}}
	for _, mode := range []string{"live", "stop"} {
		t.Run(mode, func(t *testing.T) {
			dir := filepath.Join(base, mode)
			fds := openFds(t)
			r := h.run(nobody, "checkpoint", "--pid", strconv.Itoa(src.Pid), "--image", dir, "--mode", mode)
			checkFailure(t, r, "checkpoint", fmt.Sprintf("pid %d", src.Pid), "permission denied")
			checkClean(t, dir, fds, src.Pid)
			checkSourceOK(t, src)
		})
	}
}

// copyImage copies the image files of src into a new directory.
func copyImage(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	for _, name := range []string{image.MetaFile, image.PagesFile} {
		in, err := os.Open(filepath.Join(src, name))
		if err != nil {
			t.Fatal(err)
		}
		out, err := os.Create(filepath.Join(dst, name))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(out, in); err != nil {
			t.Fatal(err)
		}
		in.Close()
		if err := out.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

func TestRestoreCorruptImage(t *testing.T) {
	h := newHarness(t)
	bin := testworkload.BuildC(t)
	src := testworkload.Start(t, []string{bin, "-mem", "8", "-threads", "1", "-quiet"}, nil)
	good := filepath.Join(t.TempDir(), "image")
	st := h.checkpoint(src.Pid, good, "full")
	if st.PagesEager == 0 {
		t.Fatal("full image without pages")
	}
	truncate := func(name string, keep func(size int64) int64) func(string) error {
		return func(dir string) error {
			p := filepath.Join(dir, name)
			fi, err := os.Stat(p)
			if err != nil {
				return err
			}
			return os.Truncate(p, keep(fi.Size()))
		}
	}
	cases := []struct {
		name    string
		corrupt func(dir string) error
	}{
		{"flipped-byte", func(dir string) error {
			p := filepath.Join(dir, image.MetaFile)
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			b[len(b)/2] ^= 0x20
			return os.WriteFile(p, b, 0o600)
		}},
		{"truncated-cowmig.img", truncate(image.MetaFile, func(n int64) int64 { return n / 2 })},
		{"truncated-pages.img", truncate(image.PagesFile, func(n int64) int64 { return n - image.PageSize })},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyImage(t, good)
			if err := tc.corrupt(dir); err != nil {
				t.Fatal(err)
			}
			fds := openFds(t)
			r := h.run(runOpts{}, "restore", "--image", dir)
			checkFailure(t, r, "restore", "bad image")
			checkClean(t, dir, fds, src.Pid)
			checkFailure(t, h.run(runOpts{}, "inspect", "--image", dir), "inspect", "bad image")
			checkSourceOK(t, src)
		})
	}
	// The intact image restores: the corruption is what was refused.
	c := h.restore(good, runOpts{})
	t.Logf("intact image's clone: %s", c.verify(t))
	waitPager(t, c, 0)
}

func TestRestoreWrongToken(t *testing.T) {
	h := newHarness(t)
	bin := testworkload.BuildC(t)
	src := testworkload.Start(t, []string{bin, "-mem", "16", "-threads", "1", "-quiet"}, nil)
	good := filepath.Join(t.TempDir(), "image")
	st := h.checkpoint(src.Pid, good, "live")
	dir := copyImage(t, good)
	img, err := image.Read(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(img.Token) == 0 {
		t.Fatal("live image without a token")
	}
	img.Token[0] ^= 0xff
	if err := image.Write(dir, img); err != nil {
		t.Fatal(err)
	}
	fds := openFds(t)
	r := h.run(runOpts{}, "restore", "--image", dir)
	checkFailure(t, r, "restore", "token")
	checkClean(t, dir, fds, src.Pid, st.ServerPid)
	if !alive(st.ServerPid) {
		t.Fatalf("page server %d died of a bad token", st.ServerPid)
	}
	checkSourceOK(t, src)
	// The server still serves the right token.
	c := h.restore(good, runOpts{})
	t.Logf("clone with the right token: %s", c.verify(t))
	waitPager(t, c, st.PagesLazy)
	c.verify(t)
}

// A clone whose page server dies mid-restore must be killed, never run
// on zero pages; its pager must fail. With --cow fork, the shadow dies
// with its page server (PTRACE_O_EXITKILL): it never runs.
func TestPageServerDiesMidRestore(t *testing.T) {
	for _, mode := range []string{"live", "live-fork"} {
		t.Run(mode, func(t *testing.T) { testPageServerDiesMidRestore(t, mode) })
	}
}

func testPageServerDiesMidRestore(t *testing.T, mode string) {
	h := newHarness(t)
	bin := testworkload.BuildC(t)
	src := testworkload.Start(t, []string{bin, "-mem", "512", "-threads", "2", "-quiet"}, nil)
	dir := filepath.Join(t.TempDir(), "image")
	st := h.checkpoint(src.Pid, dir, mode)
	c := h.restore(dir, runOpts{})
	if err := unix.Kill(st.ServerPid, unix.SIGKILL); err != nil {
		t.Fatalf("kill page server: %v", err)
	}
	if _, err := waitExit(st.ServerPid, exitTimeout); err != nil {
		t.Fatal(err)
	}
	if st.ShadowPid != 0 {
		if _, err := waitExit(st.ShadowPid, exitTimeout); err != nil {
			t.Fatalf("shadow outlived its page server: %v", err)
		}
	}
	if _, err := waitExit(c.st.Pid, exitTimeout); err != nil {
		t.Fatalf("clone kept running after its page server died: %v", err)
	}
	e, err := waitExit(c.st.PagerPid, exitTimeout)
	if err != nil {
		t.Fatalf("pager: %v", err)
	}
	log := c.pagerLog()
	if strings.Contains(log, "lazy pages local") {
		t.Fatalf("the pager had every page before the server died; the test needs a bigger snapshot:\n%s", log)
	}
	if !e.reaped || (e.status.Exited() && e.status.ExitStatus() == 0) {
		t.Errorf("pager %v, want a failure", e)
	}
	if !strings.Contains(log, "the clone was killed") {
		t.Errorf("pager log does not say the clone was killed:\n%s", log)
	}
	t.Logf("pager %v: %s", e, strings.TrimSpace(log))
	checkNoLeftovers(t, src.Pid)
	checkSourceOK(t, src) // the source survives losing its server
}

// childHolder forks a child that sleeps; on SIGUSR1 it checks that the
// child is still its own ("verify ok") with waitpid(WNOHANG).
const childHolder = `import os, signal, sys, time
child = os.fork()
if child == 0:
    while True:
        time.sleep(3600)
sigs = {signal.SIGUSR1, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
print("ready", os.getpid(), flush=True)
while signal.sigwait(sigs) == signal.SIGUSR1:
    try:
        r = os.waitpid(child, os.WNOHANG)
        print("verify ok child=%d" % child if r == (0, 0) else "verify FAIL child %d exited: %r" % (child, r), flush=True)
    except ChildProcessError as e:
        print("verify FAIL child %d: %s" % (child, e), flush=True)
`

// A process with a child is a process tree: cowmig must refuse it (naming
// the child) or restore a clone that still has its child. A clone that
// lost its children fails on its next waitpid.
func TestCheckpointProcessWithChild(t *testing.T) {
	h := newHarness(t)
	script := pythonScript(t, "child.py", childHolder)
	src := testworkload.Start(t, []string{testworkload.Python, script}, nil)
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", src.Pid, src.Pid))
	if err != nil {
		t.Fatal(err)
	}
	child, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("children of %d: %q", src.Pid, b)
	}
	t.Cleanup(func() { killComm(t, child, "") })
	verifySource(t, src)
	dir := filepath.Join(t.TempDir(), "image")
	r := h.run(runOpts{}, "checkpoint", "--pid", strconv.Itoa(src.Pid), "--image", dir, "--mode", "stop")
	// Process trees are not supported: the default is to refuse, naming
	// the child (--leave-children is the explicit way to dump one alone).
	if r.code == 0 {
		t.Fatalf("checkpoint of a process with child %d succeeded; want a refusal", child)
	}
	checkFailure(t, r, "checkpoint", strconv.Itoa(child))
	checkSourceOK(t, src)
	verifySource(t, src)
}
