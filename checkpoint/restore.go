package checkpoint

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/checkpoint/inject"
	"github.com/cowmig/cowmig/checkpoint/procfs"
	"github.com/cowmig/cowmig/uffd"
)

// ErrCloneExited is returned by Serve when the clone exited before all of
// its pages were local: the restore did not complete, but nothing failed.
var ErrCloneExited = errors.New("clone exited during the lazy phase")

// PageFetcher fetches lazy pages of a live image from its source.
type PageFetcher interface {
	// Fetch fills buf with process proc's snapshot content at addr.
	Fetch(ctx context.Context, proc uint32, addr uint64, buf []byte) error
}

// RestoreOptions configure a restore.
type RestoreOptions struct {
	Dir string
	// WorkDir receives the stub executable; default os.TempDir().
	WorkDir string
	// Stdin, Stdout and Stderr become the clone's stdio descriptors
	// (those the image records as a terminal or pipe); nil means /dev/null.
	Stdin, Stdout, Stderr *os.File
	// Fetcher serves the lazy pages of a live image.
	Fetcher PageFetcher
	// FaultBatch is the bytes fetched around a faulting page (64 KiB).
	FaultBatch int
	// FillChunk is the bytes per background fetch (1 MiB).
	FillChunk int
	// NoPrefetch disables the background fill: pages arrive only when
	// the clone touches them, and Serve returns once it has touched all.
	NoPrefetch bool
	// AllowSeccomp restores a process that ran under a seccomp filter
	// without that filter: only for callers (the shim) whose container
	// runtime installs it.
	AllowSeccomp bool
	// OnRunning, if set, is called when the clone runs and the
	// background fill starts (not with NoPrefetch).
	OnRunning func()
	// Stub, if set, is the host pid of a process already running the
	// restore stub (StubELF) as pid 1 of its own pid namespace: a
	// container's init that the container runtime created. It is morphed
	// (or the clone made out of it) instead of a stub of our own; its
	// owner reaps it, and the clone does not die with the restorer.
	Stub int
}

// Restored is a running clone.
type Restored struct {
	// Pid is the clone's host pid; NSPid its pid in its own namespace.
	Pid, NSPid int
	Image      *image.Image
	// Duration is the time from start to the clone running.
	Duration time.Duration
	// Phases are the durations of the restore's steps.
	Phases []Phase

	init    *exec.Cmd // the stub we started; nil for RestoreOptions.Stub
	stubPid int       // the stub, pid 1 of the clone's namespace
	stubFd  int       // pidfd of the stub (kills never hit a reused pid)
	// Lazy phase (live images only).
	u     *uffd.FD
	lazy  *uffd.Lazy
	loop  *uffd.Loop
	wg    sync.WaitGroup
	errc  chan error // first pager error
	pager *pager

	killOnce sync.Once
	exited   chan struct{} // closed when the stub has been reaped
	// cloneGone is closed when the clone has exited.
	cloneGone chan struct{}
	// building is set until the clone is detached (see fail).
	building atomic.Bool
	// unpin ends the goroutine whose OS thread forked the stub.
	unpin     chan struct{}
	unpinOnce sync.Once
}

// Restore recreates the image in o.Dir as a new process tree in a new pid
// namespace and returns once it runs. For a live image the caller must
// call Serve to run the pager.
func Restore(ctx context.Context, o RestoreOptions) (*Restored, error) {
	start := time.Now()
	img, err := image.Read(o.Dir)
	if err != nil {
		return nil, fmt.Errorf("read image %s: %w", o.Dir, err)
	}
	if len(img.Processes) != 1 {
		return nil, fmt.Errorf("restore %d processes: only single-process images are supported: %w", len(img.Processes), ErrUnsupported)
	}
	p := &img.Processes[0]
	if p.Creds.Seccomp == 2 && !o.AllowSeccomp {
		return nil, fmt.Errorf("process %d ran under a seccomp filter, which a host restore cannot reinstall: %w", p.Pid, ErrUnsupported)
	}
	if img.Stats.PagesLazy > 0 && o.Fetcher == nil {
		return nil, errors.New("restore live image: no page fetcher")
	}
	if err := checkVDSO(img); err != nil {
		return nil, err
	}
	pages, err := os.Open(o.Dir + "/" + image.PagesFile)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("open pages file: %w", err)
	}
	if pages != nil {
		defer pages.Close()
	}
	r := &Restored{Image: img, NSPid: p.Pid, stubFd: -1, errc: make(chan error, 1), exited: make(chan struct{}), unpin: make(chan struct{}), cloneGone: make(chan struct{})}
	r.building.Store(true)
	if o.Stub != 0 {
		if err := r.adoptStub(o.Stub); err != nil {
			return nil, err
		}
		// stubFd stays open for Kill until this process exits: closed
		// earlier, its number could name another file by then.
		go waitPidfd(r.stubFd, r.exited)
	} else {
		workDir := o.WorkDir
		if workDir == "" {
			workDir = os.TempDir()
		}
		stubDir, err := os.MkdirTemp(workDir, "cowmig-restore-")
		if err != nil {
			return nil, fmt.Errorf("create stub dir: %w", err)
		}
		defer os.RemoveAll(stubDir)
		stub, err := WriteStub(stubDir)
		if err != nil {
			return nil, err
		}
		cmd := exec.Command(stub)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = o.Stdin, o.Stdout, o.Stderr
		// Pdeathsig: while pages are lazy the clone must die with its
		// pager (DESIGN §3, monitor death); Serve disarms it once all
		// are local.
		cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWPID, Pdeathsig: unix.SIGKILL, Setsid: true}
		r.init = cmd
		if err := r.startStub(); err != nil {
			return nil, fmt.Errorf("start restore stub: %w", err)
		}
		r.stubPid = cmd.Process.Pid
		go r.reap()
	}
	if err := r.build(ctx, o, p, pages); err != nil {
		r.Kill()
		return nil, fmt.Errorf("restore pid %d: %w", p.Pid, err)
	}
	r.Duration = time.Since(start)
	go waitExit(r.Pid, r.cloneGone)
	r.startFill(ctx, o)
	return r, nil
}

// build clones the process out of the stub and morphs it.
func (r *Restored) build(ctx context.Context, o RestoreOptions, p *image.Process, pages *os.File) (err error) {
	t0 := time.Now()
	initTr, err := inject.Seize(r.stubPid, inject.Options{SuspendSeccomp: true, TraceClone: true})
	if err != nil {
		return fmt.Errorf("seize stub: %w", err)
	}
	// The child inherits the stub's scratch mapping: place it in a hole
	// of both the stub's and the image's layouts before the clone.
	cur, err := procfs.Maps(r.stubPid)
	if err != nil {
		return errors.Join(fmt.Errorf("read stub maps: %w", err), initTr.Detach())
	}
	hole, err := findHole(cur, p.Vmas, holeSize)
	if err != nil {
		return errors.Join(err, initTr.Detach())
	}
	initTr.SetScratchHint(hole)
	child := initTr
	if p.Pid != 1 {
		if child, err = initTr.CloneProcess(p.Pid); err != nil {
			return errors.Join(fmt.Errorf("clone pid %d out of the stub: %w", p.Pid, err), initTr.Detach())
		}
	}
	r.Pid = child.Pid()
	// Tell the stub which child ends the namespace when it exits.
	var root [4]byte
	binary.LittleEndian.PutUint32(root[:], uint32(p.Pid))
	if err := initTr.WriteMem(stubRoot, root[:]); err != nil {
		return errors.Join(fmt.Errorf("tell the stub its child: %w", err), child.Kill(), initTr.Detach())
	}
	r.Phases = append(r.Phases, Phase{"stub", time.Since(t0)})
	m := &morph{tr: child, x: child, p: p, img: r.Image, pages: pages, o: o, r: r, hole: hole}
	err = m.run(ctx) // starts the pager once lazy memory is registered
	if err == nil {
		select {
		case perr := <-r.errc:
			err = fmt.Errorf("pager: %w", perr)
		default:
		}
	}
	if err != nil {
		// Never let a half-made clone run: kill it while it is still
		// stopped under ptrace.
		kerr := child.Kill()
		if child != initTr {
			kerr = errors.Join(kerr, initTr.Kill())
		}
		return errors.Join(err, kerr)
	}
	r.building.Store(false)
	if derr := child.Detach(); derr != nil {
		err = fmt.Errorf("detach clone: %w", derr)
	}
	if child != initTr {
		if derr := initTr.Detach(); derr != nil && err == nil {
			err = fmt.Errorf("detach stub: %w", derr)
		}
	}
	return err
}

// checkVDSO refuses an image whose vDSO layout differs from this host's
// (DESIGN §3: the three special mappings move together or not at all).
func checkVDSO(img *image.Image) error {
	mine, err := procfs.Maps(os.Getpid())
	if err != nil {
		return fmt.Errorf("read own maps: %w", err)
	}
	var cur []image.Vma
	for _, m := range mine {
		switch m.Path {
		case "[vvar]", "[vvar_vclock]", "[vdso]":
			cur = append(cur, image.Vma{Start: m.Start, End: m.End, Name: m.Path})
		}
	}
	if err := sameLayout(cur, img.VDSO); err != nil {
		return fmt.Errorf("vDSO layout of the image differs from this host's (%v): %w", err, ErrUnsupported)
	}
	return nil
}

func sameLayout(a, b []image.Vma) error {
	if len(a) != len(b) {
		return fmt.Errorf("%d special mappings here, %d in the image", len(a), len(b))
	}
	for i := range a {
		if a[i].Len() != b[i].Len() || a[i].Start-a[0].Start != b[i].Start-b[0].Start {
			return fmt.Errorf("mapping %d: %#x bytes at +%#x here, %#x at +%#x in the image",
				i, a[i].Len(), a[i].Start-a[0].Start, b[i].Len(), b[i].Start-b[0].Start)
		}
	}
	return nil
}

// startPager runs the MISSING fault loop; the morph needs it as soon as
// lazy memory is registered.
func (r *Restored) startPager() {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		if err := r.loop.Run(); err != nil {
			r.fail(fmt.Errorf("fault loop: %w", err))
		}
	}()
}

// startFill runs the background fill. It starts once the clone runs, so
// that it does not compete with the morph for the CPU.
func (r *Restored) startFill(ctx context.Context, o RestoreOptions) {
	if r.lazy == nil || o.NoPrefetch {
		return
	}
	if o.OnRunning != nil {
		o.OnRunning()
	}
	r.wg.Add(1)
	chunk := o.FillChunk
	if chunk == 0 {
		chunk = 1 << 20
	}
	go func() {
		defer r.wg.Done()
		if err := r.lazy.Fill(ctx, chunk, nil); err != nil {
			r.fail(fmt.Errorf("background fill: %w", err))
		}
	}()
}

// fail records the first pager error and kills the clone: it must never
// run on pages the pager could not provide.
func (r *Restored) fail(err error) {
	if errors.Is(err, uffd.ErrGone) {
		return // the clone exited
	}
	select {
	case r.errc <- err:
	default:
	}
	if r.building.Load() {
		// The clone is stopped under ptrace, maybe in an injected
		// syscall that faulted: a SIGKILL now would leave the tracer
		// waiting for a thread-group leader that cannot be reaped
		// before its siblings. Closing the uffd wakes the fault; build
		// sees the error and kills the clone before it runs.
		r.u.Close()
		return
	}
	r.Kill()
}

// Serve waits until every lazy page is local, then ends the lazy phase:
// the ranges are unregistered, the uffd closed and the clone no longer
// dies with its pager. On a pager error the clone is killed and the error
// returned. For an image without lazy pages it returns at once.
func (r *Restored) Serve(ctx context.Context) error {
	if r.lazy == nil {
		return r.disarm()
	}
	var err error
	gone := false
	select {
	case <-r.lazy.Done():
	case err = <-r.errc:
	case <-r.cloneGone:
		gone = true // exited during the lazy phase: nothing left to serve
	case <-ctx.Done():
		err = ctx.Err()
		r.Kill()
	}
	if gone {
		err = ErrCloneExited
	} else if err == nil {
		// Children forked during the lazy phase are served by the same
		// loop, so fill them before stopping it.
		err = r.pager.fillChildren(ctx)
	}
	r.loop.Stop()
	r.wg.Wait()
	r.loop.Close()
	if err == nil {
		select {
		case err = <-r.errc:
		default:
		}
	}
	// Every snapshot page is local now; what stays registered must read
	// as zero, which is what closing the uffd gives.
	r.pager.closeChildren()
	r.u.Close()
	switch {
	case gone:
		return ErrCloneExited
	case err != nil:
		r.Kill()
		return err
	}
	return r.disarm()
}

// UffdFd is the number, in this process, of the clone's userfaultfd
// while pages are lazy (-1 without lazy pages or once it is closed). A
// supervisor that takes a copy (pidfd_getfd) keeps the clone's faults
// blocked, not zero-filled, should this process die; it must close its
// copy when this process exits.
func (r *Restored) UffdFd() int {
	if r.u == nil {
		return -1
	}
	return r.u.Fd()
}

// Remaining is the bytes of lazy pages not yet local.
func (r *Restored) Remaining() uint64 {
	if r.lazy == nil {
		return 0
	}
	return r.lazy.Remaining()
}

// disarm clears the stub's parent-death signal so the clone outlives its
// restorer.
func (r *Restored) disarm() error {
	if r.init == nil {
		// An adopted stub never had a parent-death signal of ours.
		r.release()
		return nil
	}
	tr, err := inject.Seize(r.stubPid, inject.Options{SuspendSeccomp: true})
	if err != nil {
		return fmt.Errorf("seize stub to disarm: %w", err)
	}
	_, err = tr.Syscall(0, unix.SYS_PRCTL, unix.PR_SET_PDEATHSIG, 0)
	err = errors.Join(err, tr.Detach())
	if err == nil {
		r.release()
	}
	return err
}

// startStub forks the stub from a goroutine locked to its OS thread until
// unpin: the parent-death signal fires when the forking *thread* exits
// (prctl(2)), and the Go runtime ends threads whose locked goroutine
// returns (the injector's tracers do), so an unpinned fork could kill the
// clone at random.
func (r *Restored) startStub() error {
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		err := r.init.Start()
		started <- err
		if err != nil {
			return
		}
		<-r.unpin
	}()
	return <-started
}

func (r *Restored) release() { r.unpinOnce.Do(func() { close(r.unpin) }) }

// reap waits for the stub to exit, then reaps it. It must not wait(2)
// before: any thread's wait on a ptraced child consumes its ptrace stops
// (kernel/exit.c: ptrace_do_wait runs for every thread of the waiter), so
// an early cmd.Wait would steal the injector's stops. Polling a pidfd
// consumes nothing.
func (r *Restored) reap() {
	defer close(r.exited)
	stub := make(chan struct{})
	waitExit(r.init.Process.Pid, stub)
	r.init.Wait()
}

// waitExit closes done when process pid has exited (a pidfd becomes
// readable; this consumes nothing, unlike wait(2)).
func waitExit(pid int, done chan struct{}) {
	pfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		close(done)
		return
	}
	defer unix.Close(pfd)
	waitPidfd(pfd, done)
}

// waitPidfd closes done when the process of pidfd pfd has exited.
func waitPidfd(pfd int, done chan struct{}) {
	defer close(done)
	fds := []unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err != unix.EINTR {
			return
		}
	}
}

// Kill kills the clone and its namespace (SIGKILL to the stub, pid 1).
func (r *Restored) Kill() {
	r.killOnce.Do(func() {
		if r.init != nil {
			r.init.Process.Kill()
		} else {
			unix.PidfdSendSignal(r.stubFd, unix.SIGKILL, nil, 0)
		}
		r.release()
	})
}

// adoptStub takes pid, which must run the restore stub as pid 1 of its
// pid namespace, as the clone's stub.
func (r *Restored) adoptStub(pid int) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return fmt.Errorf("open stub pid %d: %w", pid, err)
	}
	st, err := procfs.ReadStatus(pid, pid)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("read stub pid %d status: %w", pid, err)
	}
	if len(st.NSpid) == 0 || st.NSpid[len(st.NSpid)-1] != 1 {
		unix.Close(fd)
		return fmt.Errorf("stub pid %d is not pid 1 of its namespace (NSpid %v)", pid, st.NSpid)
	}
	// runc start returns before runc init has exec'd the stub, and runc
	// (a Go binary) also maps its text at stubBase: wait until the
	// process is the stub itself, its one page and the kernel's special
	// mappings. Seized earlier, it would exec under us.
	deadline := time.Now().Add(stubExecWait)
	for {
		maps, err := procfs.Maps(pid)
		if err != nil {
			unix.Close(fd)
			return fmt.Errorf("read stub pid %d maps: %w", pid, err)
		}
		if isStub(maps) {
			break
		}
		if time.Now().After(deadline) {
			unix.Close(fd)
			return fmt.Errorf("pid %d does not run the restore stub after %v (%d mappings, first %#x-%#x %s)",
				pid, stubExecWait, len(maps), first(maps).Start, first(maps).End, first(maps).Path)
		}
		time.Sleep(time.Millisecond) // an exec has no event to wait on
	}
	r.stubPid, r.stubFd = pid, fd
	return nil
}

// stubExecWait bounds the wait for an adopted stub's exec.
const stubExecWait = 10 * time.Second

// isStub reports whether maps are the restore stub's: its one page at
// stubBase, the stack and the kernel's special mappings.
func isStub(maps []procfs.Mapping) bool {
	if len(maps) == 0 || maps[0].Start != stubBase || maps[0].End != stubBase+image.PageSize {
		return false
	}
	for _, m := range maps[1:] {
		if !m.IsSpecial() && m.Path != "[stack]" {
			return false
		}
	}
	return true
}

func first(maps []procfs.Mapping) procfs.Mapping {
	if len(maps) == 0 {
		return procfs.Mapping{}
	}
	return maps[0]
}

// Wait waits until the clone's namespace is gone. It returns the stub's
// status; the clone's own exit status is not reported.
func (r *Restored) Wait() error {
	<-r.cloneGone
	r.Kill()
	<-r.exited
	return nil
}

// sortedFds returns the image's fds ordered by number.
func sortedFds(fds []image.Fd) []image.Fd {
	out := append([]image.Fd(nil), fds...)
	sort.Slice(out, func(i, j int) bool { return out[i].Num < out[j].Num })
	return out
}
