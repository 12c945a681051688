package inject

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestCloneInPidNS recreates a child with pid 777 and a thread with tid 778
// inside a fresh pid namespace, makes them run exit_group(42), and checks
// that the target (the namespace's init) reaps pid 777 with status 42.
func TestCloneInPidNS(t *testing.T) {
	for _, m := range []struct {
		name string
		opts Options
	}{
		{"singlestep", Options{TraceClone: true, SuspendSeccomp: true}},
		{"syscallstops", Options{TraceClone: true, SyscallStops: true}},
	} {
		t.Run(m.name, func(t *testing.T) { testCloneInPidNS(t, m.opts) })
	}
}

func testCloneInPidNS(t *testing.T, opts Options) {
	needTarget(t)
	checkFdLeak(t)
	tg := startTarget(t, "init", func(c *exec.Cmd) {
		c.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	})
	if nspid := statusField(t, fmt.Sprintf("/proc/%d/status", tg.pid), "NSpid"); !strings.HasSuffix(nspid, "\t1") {
		t.Fatalf("target NSpid %q: not init of a new pid namespace", nspid)
	}
	before := takeSnapshot(t, tg.pid)
	p := seizeT(t, tg.pid, opts)
	if _, err := p.Syscall(0, unix.SYS_FORK); err == nil {
		t.Fatal("fork through Syscall with TraceClone was allowed")
	}
	child, err := p.CloneProcess(777)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// On failure: the namespace's init cannot exit while the child is
		// still traced.
		if err := child.Kill(); err != nil && !errors.Is(err, ErrClosed) {
			t.Errorf("cleanup kill child: %v", err)
		}
	})
	hostPid := child.Pid()
	if got := statusField(t, fmt.Sprintf("/proc/%d/status", hostPid), "NSpid"); got != fmt.Sprintf("%d\t777", hostPid) {
		t.Fatalf("child NSpid %q, want %d\\t777", got, hostPid)
	}
	if got := statusField(t, fmt.Sprintf("/proc/%d/status", hostPid), "PPid"); got != fmt.Sprint(tg.pid) {
		t.Fatalf("child PPid %s, want %d", got, tg.pid)
	}
	if _, _, ok := child.ScratchRange(); !ok {
		t.Error("child did not adopt the inherited scratch mapping")
	}
	if err := child.CloneThread(0, 778); err != nil {
		t.Fatal(err)
	}
	tids := child.Threads()
	if len(tids) != 2 || tids[0] != hostPid {
		t.Fatalf("child threads %v", tids)
	}
	if got := statusField(t, fmt.Sprintf("/proc/%d/task/%d/status", hostPid, tids[1]), "NSpid"); got != fmt.Sprintf("%d\t778", tids[1]) {
		t.Fatalf("thread NSpid %q, want %d\\t778", got, tids[1])
	}
	// The new tasks have not run: they are still ptrace-stopped.
	for i, tid := range tids {
		if s := procState(tid); s != 't' {
			t.Errorf("task %d state %c, want t (traced)", tid, s)
		}
		// Injected gettid answers in the child's pid namespace.
		if got, err := child.Syscall(tid, unix.SYS_GETTID); err != nil || int(got) != 777+i {
			t.Errorf("gettid in %d: %d, %v; want %d", tid, got, err, 777+i)
		}
	}
	// Both threads run exit_group(42) when detached.
	insn, err := child.FindSyscallInsn()
	if err != nil {
		t.Fatal(err)
	}
	for _, tid := range tids {
		st, _ := stateOf(t, child, tid)
		r := st.Regs
		r.Rip, r.Rax, r.Orig_rax, r.Rdi = insn, unix.SYS_EXIT_GROUP, ^uint64(0), 42
		if err := child.SetSavedRegs(tid, r); err != nil {
			t.Fatal(err)
		}
	}
	if err := child.Detach(); err != nil {
		t.Fatal(err)
	}
	if err := p.Detach(); err != nil {
		t.Fatal(err)
	}
	if got := tg.line(t); got != "reaped 777 42" {
		t.Fatalf("target said %q, want reaped 777 42", got)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", hostPid)); !os.IsNotExist(err) {
		t.Errorf("child %d still in /proc: %v", hostPid, err)
	}
	before.unchanged(t, tg.pid)
}

// TestCloneErrors: the clone helpers need TraceClone, and a taken pid fails
// cleanly.
func TestCloneErrors(t *testing.T) {
	needTarget(t)
	checkFdLeak(t)
	tg := startTarget(t, "init", func(c *exec.Cmd) {
		c.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	})
	before := takeSnapshot(t, tg.pid)
	p := seizeT(t, tg.pid, Options{})
	if _, err := p.CloneProcess(5); err == nil {
		t.Fatal("CloneProcess without TraceClone succeeded")
	}
	if err := p.CloneThread(0, 5); err == nil {
		t.Fatal("CloneThread without TraceClone succeeded")
	}
	if err := p.Detach(); err != nil {
		t.Fatal(err)
	}
	p = seizeT(t, tg.pid, Options{TraceClone: true})
	if _, err := p.CloneProcess(1); err == nil {
		t.Fatal("CloneProcess with a taken pid succeeded")
	}
	if err := p.CloneThread(0, 1); err == nil {
		t.Fatal("CloneThread with a taken tid succeeded")
	}
	if got := p.Threads(); len(got) != 1 {
		t.Fatalf("threads after failed clones: %v", got)
	}
	if err := p.Detach(); err != nil {
		t.Fatal(err)
	}
	before.unchanged(t, tg.pid)
}

// Shadow forks a stopped copy of a multi-threaded target: named as asked,
// exit signal 0, child of the target, in a tracing stop; the target is
// left as found and runs on; Kill leaves a zombie of the target's.
func TestShadow(t *testing.T) {
	needTarget(t)
	defer checkFdLeak(t)
	tg := startTarget(t, "threads", nil)
	before := takeSnapshot(t, tg.pid)
	p := seizeT(t, tg.pid, Options{SuspendSeccomp: true})
	t0 := time.Now()
	sh, err := p.Shadow("test-shadow")
	if err != nil {
		t.Fatalf("shadow: %v", err)
	}
	t.Logf("shadow %d in %v", sh.Pid(), time.Since(t0))
	if err := p.Detach(); err != nil {
		t.Fatalf("detach: %v", err)
	}
	before.unchanged(t, tg.pid)
	if got := tg.ask(t, "check"); got != "running" {
		t.Fatalf("target after shadow: %q, want running", got)
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", sh.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after "(comm) ": state ppid ... exit_signal is field 38.
	i := strings.LastIndexByte(string(stat), ')')
	f := strings.Fields(string(stat[i+2:]))
	if !strings.Contains(string(stat), "(test-shadow) t ") || f[1] != strconv.Itoa(tg.pid) || f[35] != "0" {
		t.Fatalf("shadow stat %q: want comm test-shadow, tracing stop, ppid %d, exit signal 0", stat, tg.pid)
	}
	if st := statusField(t, fmt.Sprintf("/proc/%d/status", sh.Pid()), "Threads"); st != "1" {
		t.Fatalf("shadow has %s threads, want 1", st)
	}
	// It holds no file of the target's.
	if fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", sh.Pid())); err != nil || len(fds) != 0 {
		t.Fatalf("shadow fds: %d (%v), want none", len(fds), err)
	}
	if len(fdLinks(t, tg.pid)) == 0 {
		t.Fatal("the target lost its fds with the shadow's unshare")
	}
	if err := sh.Kill(); err != nil {
		t.Fatalf("kill shadow: %v", err)
	}
	if s := procState(sh.Pid()); s != 'Z' {
		t.Fatalf("killed shadow in state %q, want a zombie awaiting the target", s)
	}
	if _, err := p.Shadow("x"); !errors.Is(err, ErrClosed) {
		t.Fatalf("shadow of a detached process: %v, want ErrClosed", err)
	}
}
