package checkpoint_test

// Engine tests: real processes, the real kernel, root required. They dump
// self-verifying workloads while they write, madvise, munmap, mremap and
// fork, restore clones in new pid namespaces and let the clones verify
// their memory against their own counters.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/checkpoint/procfs"
	"github.com/cowmig/cowmig/internal/testworkload"
)

// needPython fails without Debian's python3: make deps installs it, so a
// skip would only hide a broken setup.
func needPython(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(testworkload.Python); err != nil {
		t.Fatalf("needs %s (make deps installs python3): %v", testworkload.Python, err)
	}
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: ptrace, userfaultfd and pid namespaces")
	}
}

// snapFetcher serves lazy pages straight from an in-process Snapshot: the
// engine tested without the transport.
type snapFetcher struct {
	s *checkpoint.Snapshot
	// failAfter, when > 0, makes the fetch number failAfter after armed
	// is set fail.
	failAfter int
	armed     atomic.Bool
	n         atomic.Int64
}

var errInjected = errors.New("injected fetch failure")

func (f *snapFetcher) Fetch(ctx context.Context, proc uint32, addr uint64, buf []byte) error {
	if f.failAfter > 0 && f.armed.Load() && int(f.n.Add(1)) >= f.failAfter {
		return errInjected
	}
	return f.s.ReadPages(ctx, proc, addr, buf)
}

func token(t *testing.T) []byte {
	b := make([]byte, 32)
	rand.Read(b)
	return b
}

func dump(t *testing.T, pid int, mode image.Mode) (*checkpoint.Result, string) {
	t.Helper()
	return dumpCOW(t, pid, mode, checkpoint.COWUffd)
}

// cows are the copy-on-write methods every live and full test runs with.
var cows = []checkpoint.COW{checkpoint.COWUffd, checkpoint.COWFork}

func dumpCOW(t *testing.T, pid int, mode image.Mode, cow checkpoint.COW) (*checkpoint.Result, string) {
	t.Helper()
	dir := t.TempDir()
	// The workloads fork short-lived children: one may exist at the
	// snapshot instant; the clone goes on without it.
	res, err := checkpoint.Dump(context.Background(), pid, checkpoint.Options{Mode: mode, COW: cow, Dir: dir, Endpoint: "unix:/nonexistent", Token: token(t), LeaveChildren: true})
	if err != nil {
		t.Fatalf("dump %s/%s: %v", mode, cow, err)
	}
	if mode != image.ModeStop && res.Image.Stats.COW != string(cow) {
		t.Fatalf("image records cow %q, want %q", res.Image.Stats.COW, cow)
	}
	if res.Snapshot != nil {
		t.Cleanup(res.Snapshot.Release)
	}
	t.Logf("%s dump: freeze %v, %d pages (%d eager, %d lazy)", mode, res.Freeze, res.Image.Stats.PagesTotal, res.Image.Stats.PagesEager, res.Image.Stats.PagesLazy)
	return res, dir
}

// restore restores dir and returns the clone as a workload Proc reading
// the clone's stdout.
func restore(t *testing.T, dir string, f checkpoint.PageFetcher) (*checkpoint.Restored, *testworkload.Proc) {
	return restoreOpts(t, checkpoint.RestoreOptions{Dir: dir, Fetcher: f})
}

func restoreOpts(t *testing.T, o checkpoint.RestoreOptions) (*checkpoint.Restored, *testworkload.Proc) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	o.Stdout, o.Stderr = w, os.Stderr
	rs, err := checkpoint.Restore(context.Background(), o)
	w.Close()
	if err != nil {
		r.Close()
		t.Fatalf("restore: %v", err)
	}
	t.Cleanup(func() {
		rs.Kill()
		rs.Wait()
		r.Close()
	})
	t.Logf("restored pid %d (host %d) in %v", rs.NSPid, rs.Pid, rs.Duration)
	return rs, testworkload.Attach(rs.Pid, r)
}

func TestSnapshotUnderFire(t *testing.T) {
	needRoot(t)
	bin := testworkload.BuildC(t)
	type run struct {
		mode image.Mode
		cow  checkpoint.COW
	}
	runs := []run{{image.ModeStop, ""}}
	for _, cow := range cows {
		runs = append(runs, run{image.ModeLive, cow}, run{image.ModeFull, cow})
	}
	for _, r := range runs {
		mode := r.mode
		name := string(mode)
		if r.cow != "" {
			name += "/" + string(r.cow)
		}
		t.Run(name, func(t *testing.T) {
			fileMap := filepath.Join(t.TempDir(), "filemap")
			src := testworkload.Start(t, []string{bin, "-mem", "64", "-threads", "3", "-thp", "-churn", "-fork", "-filemap", fileMap}, nil)
			res, dir := dumpCOW(t, src.Pid, mode, r.cow)
			src.Verify(t) // the source runs on, unharmed
			var f checkpoint.PageFetcher
			if res.Snapshot != nil {
				f = &snapFetcher{s: res.Snapshot}
			}
			rs, clone := restore(t, dir, f)
			// Verify while pages are still arriving, then after.
			line := clone.Verify(t)
			t.Logf("clone: %s", line)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if err := rs.Serve(ctx); err != nil {
				t.Fatalf("pager: %v", err)
			}
			clone.Verify(t)
			src.Verify(t)
			if mode == image.ModeLive && r.cow == checkpoint.COWUffd {
				// A fork snapshot's window lasts until it is released.
				select {
				case <-res.Snapshot.WindowClosed():
				case <-ctx.Done():
					t.Fatal("COW window did not close")
				}
			}
		})
	}
}

// A second snapshot taken at once after the first, while the first's COW
// window may still hold the mappings (a mapping has one uffd at a time),
// waits for that window before its freeze; both snapshots restore.
func TestBackToBackSnapshots(t *testing.T) {
	needRoot(t)
	bin := testworkload.BuildC(t)
	src := testworkload.Start(t, []string{bin, "-mem", "128", "-threads", "2"}, nil)
	res1, dir1 := dump(t, src.Pid, image.ModeLive)
	res2, dir2 := dump(t, src.Pid, image.ModeLive)
	for i, c := range []struct {
		res *checkpoint.Result
		dir string
	}{{res1, dir1}, {res2, dir2}} {
		rs, clone := restore(t, c.dir, &snapFetcher{s: c.res.Snapshot})
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		if err := rs.Serve(ctx); err != nil {
			cancel()
			t.Fatalf("pager of snapshot %d: %v", i+1, err)
		}
		cancel()
		t.Logf("clone of snapshot %d: %s", i+1, clone.Verify(t))
		rs.Kill()
		rs.Wait()
	}
	src.Verify(t)
}

func TestPythonClone(t *testing.T) {
	needRoot(t)
	script := testworkload.PythonScript(t)
	for _, cow := range cows {
		t.Run(string(cow), func(t *testing.T) { testPythonClone(t, script, cow) })
	}
}

func testPythonClone(t *testing.T, script string, cow checkpoint.COW) {
	src := testworkload.Start(t, []string{testworkload.Python, script, "256"}, nil)
	res, dir := dumpCOW(t, src.Pid, image.ModeLive, cow)
	if res.Image.Stats.PagesTotal*image.PageSize < 256<<20 {
		t.Fatalf("snapshot holds %d pages, want ≥ 256 MiB", res.Image.Stats.PagesTotal)
	}
	rs, clone := restore(t, dir, &snapFetcher{s: res.Snapshot})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		err := rs.Serve(ctx)
		t.Logf("pager done: %v", err)
		errc <- err
	}()
	line := clone.Verify(t)
	t.Logf("clone: %s", line)
	if err := <-errc; err != nil {
		t.Fatalf("pager: %v", err)
	}
	clone.Verify(t)
	src.Verify(t)
}

// A pager that cannot fetch must kill the clone, never let it run on
// zero-filled pages.
func TestFetchFailureKillsClone(t *testing.T) {
	needRoot(t)
	bin := testworkload.BuildC(t)
	src := testworkload.Start(t, []string{bin, "-mem", "32", "-threads", "2"}, nil)
	res, dir := dump(t, src.Pid, image.ModeLive)
	// On demand only, so that the failure hits the running clone.
	f := &snapFetcher{s: res.Snapshot, failAfter: 1}
	rs, _ := restoreOpts(t, checkpoint.RestoreOptions{Dir: dir, Fetcher: f, NoPrefetch: true})
	f.armed.Store(true)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := rs.Serve(ctx)
	if !errors.Is(err, errInjected) {
		t.Fatalf("pager error %v, want the injected failure", err)
	}
	rs.Wait()
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", rs.Pid)); err == nil {
		if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", rs.Pid)); !strings.Contains(string(b), ") Z") {
			t.Fatalf("clone %d still exists after a fetch failure", rs.Pid)
		}
	}
	src.Verify(t)
}

func TestDumpErrors(t *testing.T) {
	needRoot(t)
	_, err := checkpoint.Dump(context.Background(), 1<<22-1, checkpoint.Options{Mode: image.ModeStop, Dir: t.TempDir()})
	if !errors.Is(err, checkpoint.ErrNoProcess) {
		t.Fatalf("dump of a missing pid: %v, want ErrNoProcess", err)
	}
	// A process with a child is refused and keeps running.
	needPython(t)
	script := `import os, subprocess, sys, time
c = subprocess.Popen(["sleep", "1000"])
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(0.01)
`
	src := testworkload.Start(t, []string{testworkload.Python, "-c", script}, nil)
	_, err = checkpoint.Dump(context.Background(), src.Pid, checkpoint.Options{Mode: image.ModeStop, Dir: t.TempDir()})
	if !errors.Is(err, checkpoint.ErrUnsupported) || !strings.Contains(err.Error(), "child processes") {
		t.Fatalf("dump of a process with a child: %v, want ErrUnsupported naming the children", err)
	}
	st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", src.Pid))
	if !strings.Contains(string(st), "TracerPid:\t0") {
		t.Fatalf("source left traced after a refused dump:\n%s", st)
	}
}

// Pending signals and thread names survive: a blocked SIGUSR2 queued on the
// source is pending on the clone, and comm is the source's.
func TestPendingSignalsAndComm(t *testing.T) {
	needRoot(t)
	needPython(t)
	script := `import signal, os, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(1)
`
	src := testworkload.Start(t, []string{testworkload.Python, "-c", script}, nil)
	if err := src.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	res, dir := dump(t, src.Pid, image.ModeStop)
	if len(res.Image.Processes[0].SharedPending) != 1 || res.Image.Processes[0].SharedPending[0].Signo != int(syscall.SIGUSR2) {
		t.Fatalf("image pending signals: %+v", res.Image.Processes[0].SharedPending)
	}
	rs, _ := restore(t, dir, nil)
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", rs.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(st), "ShdPnd:\t0000000000000800") {
		t.Fatalf("clone status lacks pending SIGUSR2:\n%s", st)
	}
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", rs.Pid))
	if strings.TrimSpace(string(comm)) != "python3" {
		t.Fatalf("clone comm %q, want python3", comm)
	}
}

// A signal queued on one thread (not the process) stays pending on that
// thread of the clone: SIGUSR1 sent with pthread_kill to the main thread,
// which blocks it, is in the clone's main thread's SigPnd and not in the
// shared queue.
func TestThreadPendingSignal(t *testing.T) {
	needRoot(t)
	needPython(t)
	script := `import signal, os, threading, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(1)
`
	src := testworkload.Start(t, []string{testworkload.Python, "-c", script}, nil)
	res, dir := dump(t, src.Pid, image.ModeStop)
	p := res.Image.Processes[0]
	if len(p.SharedPending) != 0 || len(p.Threads[0].Pending) != 1 || p.Threads[0].Pending[0].Signo != int(syscall.SIGUSR1) {
		t.Fatalf("image pending: shared %+v, main thread %+v; want SIGUSR1 on the thread only", p.SharedPending, p.Threads[0].Pending)
	}
	rs, _ := restore(t, dir, nil)
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/status", rs.Pid, rs.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(st), "SigPnd:\t0000000000000200") || !strings.Contains(string(st), "ShdPnd:\t0000000000000000") {
		t.Fatalf("clone's main thread status lacks a thread-pending SIGUSR1:\n%s", st)
	}
}

// waitStopped waits until process pid is in the stopped state.
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Fatal(err)
		}
		if i := strings.LastIndexByte(string(b), ')'); i > 0 && len(b) > i+2 && b[i+2] == 'T' {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d did not stop", pid)
		}
		time.Sleep(time.Millisecond) // polling /proc: nothing to wait on
	}
}

// compareLazyPages compares every lazy page of res's snapshot with the
// memory of the stopped source pid. With maskRseq, the cpu and node fields
// of the threads' rseq areas are left out: the kernel writes them on the
// way back from a syscall, the source's after a fork snapshot (the
// injections that detach it), the shadow's on its own. Those fields are
// the kernel's and are rewritten in the clone.
func compareLazyPages(t *testing.T, res *checkpoint.Result, pid int, maskRseq bool) {
	t.Helper()
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	for _, v := range res.Image.Processes[0].Vmas {
		for _, r := range v.Runs {
			if r.Where != image.OnServer {
				continue
			}
			buf := make([]byte, r.NPages*image.PageSize)
			if err := res.Snapshot.ReadPages(context.Background(), 1, r.Addr, buf); err != nil {
				t.Fatalf("read %#x+%d pages: %v", r.Addr, r.NPages, err)
			}
			want := make([]byte, len(buf))
			if _, err := mem.ReadAt(want, int64(r.Addr)); err != nil {
				t.Fatalf("read source memory %#x: %v", r.Addr, err)
			}
			for _, th := range res.Image.Processes[0].Threads {
				if !maskRseq || th.RseqAddr == 0 {
					continue
				}
				// struct rseq: cpu_id_start, cpu_id (0-7) and node_id,
				// mm_cid (20-27) are the kernel's; rseq_cs and flags
				// must match.
				for _, f := range [][2]uint64{{0, 8}, {20, 28}} {
					for a := th.RseqAddr + f[0]; a < th.RseqAddr+f[1]; a++ {
						if a >= r.Addr && a < r.Addr+uint64(len(buf)) {
							buf[a-r.Addr], want[a-r.Addr] = 0, 0
						}
					}
				}
			}
			if !bytes.Equal(buf, want) {
				t.Fatalf("snapshot of %#x+%d pages differs from the stopped source's memory", r.Addr, r.NPages)
			}
		}
	}
}

// Every lazy page of a fresh live snapshot can be read. Regression: a
// write-protect fault during the freeze (the kernel's rseq update) drained
// a pipe before the store existed and lost it; this failed within a few
// dozen dumps.
func TestReadEveryLazyPage(t *testing.T) {
	needRoot(t)
	needPython(t)
	script := `import os, socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(5)
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(0.01)
`
	for i := 0; i < 40; i++ {
		src := testworkload.Start(t, []string{testworkload.Python, "-c", script}, nil)
		// Stopped, the source cannot change its memory after the
		// snapshot: every lazy page must read as the source's memory.
		if err := syscall.Kill(src.Pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		waitStopped(t, src.Pid)
		res, _ := dump(t, src.Pid, image.ModeLive)
		compareLazyPages(t, res, src.Pid, false)
		res.Snapshot.Release()
		src.Close()
	}
}

// A fork snapshot's shadow: named cowmig-shadow, a stopped child of the
// source while the snapshot lives; every page it serves is the stopped
// source's; killed at Release, its zombie is reaped by the next dump, and
// it never counts as a child the dump refuses.
func TestForkShadowLifecycle(t *testing.T) {
	needRoot(t)
	needPython(t)
	script := `import os, time
data = bytearray(os.urandom(8 << 20))
print("ready", os.getpid(), flush=True)
while True:
    time.sleep(0.01)
`
	src := testworkload.Start(t, []string{testworkload.Python, "-c", script}, nil)
	if err := syscall.Kill(src.Pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitStopped(t, src.Pid)
	dumpStrict := func() *checkpoint.Result {
		t.Helper()
		res, err := checkpoint.Dump(context.Background(), src.Pid, checkpoint.Options{Mode: image.ModeLive, COW: checkpoint.COWFork,
			Dir: t.TempDir(), Endpoint: "unix:/nonexistent", Token: token(t)})
		if err != nil {
			t.Fatalf("fork dump of a process with shadows only: %v", err)
		}
		return res
	}
	res := dumpStrict()
	sh := res.Snapshot.ShadowPid()
	if sh == 0 {
		t.Fatal("fork snapshot has no shadow")
	}
	st, err := procfs.ReadStatus(sh, sh)
	if err != nil {
		t.Fatal(err)
	}
	if st.Name != "cowmig-shadow" || st.PPid != src.Pid || !strings.HasPrefix(st.State, "t") {
		t.Fatalf("shadow %d: name %q ppid %d state %q, want cowmig-shadow, %d, tracing stop", sh, st.Name, st.PPid, st.State, src.Pid)
	}
	compareLazyPages(t, res, src.Pid, true)
	// A second snapshot while the first's shadow lives: not a child.
	res2 := dumpStrict()
	res.Snapshot.Release()
	st, err = procfs.ReadStatus(sh, sh)
	if err != nil || !strings.HasPrefix(st.State, "Z") {
		t.Fatalf("released shadow %d: %v, state %+v, want a zombie awaiting the source", sh, err, st)
	}
	if err := res.Snapshot.ReadPages(context.Background(), 1, res.Image.Processes[0].Vmas[0].Start, make([]byte, image.PageSize)); !errors.Is(err, checkpoint.ErrReleased) {
		t.Fatalf("read after release: %v, want ErrReleased", err)
	}
	res2.Snapshot.Release()
	res3 := dumpStrict() // reaps both zombies
	defer res3.Snapshot.Release()
	for _, pid := range []int{sh, res2.Snapshot.ShadowPid()} {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			t.Fatalf("zombie shadow %d not reaped by the next dump", pid)
		}
	}
	if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", src.Pid)); !strings.Contains(string(b), "TracerPid:\t0") {
		t.Fatalf("source left traced:\n%s", b)
	}
}

// A shadow killed by someone else: reads fail, and a clone that needs its
// pages is killed, never run on zero-filled pages.
func TestForkShadowKilledKillsClone(t *testing.T) {
	needRoot(t)
	bin := testworkload.BuildC(t)
	src := testworkload.Start(t, []string{bin, "-mem", "32", "-threads", "2"}, nil)
	res, dir := dumpCOW(t, src.Pid, image.ModeLive, checkpoint.COWFork)
	rs, _ := restoreOpts(t, checkpoint.RestoreOptions{Dir: dir, Fetcher: &snapFetcher{s: res.Snapshot}, NoPrefetch: true})
	if err := syscall.Kill(res.Snapshot.ShadowPid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := rs.Serve(ctx); err == nil || !strings.Contains(err.Error(), "shadow") {
		t.Fatalf("pager error %v, want the shadow's death", err)
	}
	select {
	case <-res.Snapshot.Lost():
	case <-ctx.Done():
		t.Fatal("Lost not closed after the shadow died")
	}
	if err := res.Snapshot.Err(); !errors.Is(err, checkpoint.ErrSnapshotLost) {
		t.Fatalf("snapshot error %v, want ErrSnapshotLost", err)
	}
	rs.Wait()
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", rs.Pid)); err == nil && !strings.Contains(string(b), ") Z") {
		t.Fatalf("clone %d still exists after its shadow died", rs.Pid)
	}
	src.Verify(t)
}
