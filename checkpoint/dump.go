package checkpoint

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/checkpoint/inject"
	"github.com/cowmig/cowmig/checkpoint/procfs"
)

// Errors kinds of the engine.
var (
	ErrUnsupported = errors.New("unsupported process state")
	ErrNoProcess   = errors.New("no such process")
	ErrPermission  = errors.New("permission denied")
	ErrBadImage    = image.ErrBadImage
)

// Options configure a dump.
type Options struct {
	Mode image.Mode
	// COW is how a live or full snapshot keeps the pages the process
	// overwrites after the snapshot instant; "" means COWUffd.
	COW COW
	// Dir is the image directory; it is created if missing.
	Dir string
	// Endpoint and Token are written into a live image: where the page
	// server that serves the returned Snapshot will listen.
	Endpoint string
	Token    []byte
	// EndpointTLS records that the page server speaks TLS.
	EndpointTLS bool
	// PipeSize is the size of one pin pipe; 0 means fs.pipe-max-size
	// capped at 4 MiB.
	PipeSize int
	// LeaveChildren dumps the process without the children it has at the
	// snapshot instant (the clone will not have them). Without it a
	// process with children is refused: process trees are not supported.
	LeaveChildren bool
	// WindowWait bounds the wait, before the freeze, for the COW window
	// of an earlier snapshot of the process to close (its uffd holds the
	// mappings); 0 means 30 s.
	WindowWait time.Duration
}

// Result describes a finished dump.
type Result struct {
	Image  *image.Image
	Freeze time.Duration
	// Phases are the durations of the freeze's steps, in order.
	Phases []Phase
	// Snapshot keeps the COW window of a live or full dump; nil for stop.
	// A full dump's Snapshot is already drained and released.
	Snapshot *Snapshot
}

// Dump checkpoints process pid into o.Dir. It returns once the image is
// written and the process runs again. In live mode the returned Snapshot
// serves the lazy pages; the caller must Release it.
func Dump(ctx context.Context, pid int, o Options) (*Result, error) {
	if o.Mode == "" {
		o.Mode = image.ModeLive
	}
	if !o.Mode.Valid() {
		return nil, fmt.Errorf("dump: unknown mode %q", o.Mode)
	}
	if o.COW == "" {
		o.COW = COWUffd
	}
	if !o.COW.Valid() {
		return nil, fmt.Errorf("dump: unknown copy-on-write method %q (want uffd or fork)", o.COW)
	}
	if o.Mode == image.ModeLive && (o.Endpoint == "" || len(o.Token) != 32) {
		return nil, fmt.Errorf("dump: live mode needs a page-server endpoint and a 32-byte token")
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
		return nil, fmt.Errorf("dump pid %d: %w", pid, ErrNoProcess)
	}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create image dir: %w", err)
	}
	pages, err := os.OpenFile(filepath.Join(o.Dir, image.PagesFile), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create pages file: %w", err)
	}
	defer pages.Close()

	d := &dumper{pid: pid, o: o, pages: pages}
	// Read before the freeze: see frozenMaps.
	if d.preMaps, err = waitNoUffd(pid, o.WindowWait); err != nil {
		return nil, err
	}
	if o.Mode != image.ModeStop && o.COW == COWUffd {
		d.pipeSize = pipeSize(o.PipeSize)
		d.preparePipes()
		defer d.closePool()
	}
	start := time.Now()
	d.lastMark = start
	tr, err := inject.Seize(pid, inject.Options{SuspendSeccomp: true})
	if err != nil {
		if errors.Is(err, unix.ESRCH) || errors.Is(err, inject.ErrTraceeGone) {
			return nil, fmt.Errorf("seize pid %d: %w: %v", pid, ErrNoProcess, err)
		}
		if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
			return nil, fmt.Errorf("seize pid %d: %w: %v", pid, ErrPermission, err)
		}
		return nil, fmt.Errorf("seize: %w", err)
	}
	d.tr = tr
	d.mark("seize")
	snap, err := d.frozen()
	detachErr := tr.Detach()
	d.mark("detach")
	freeze := time.Since(start)
	if err != nil || detachErr != nil {
		if snap != nil {
			snap.Release()
		}
		return nil, errors.Join(err, detachErr)
	}
	d.img.Stats.FreezeNs = freeze.Nanoseconds()
	res := &Result{Image: d.img, Freeze: freeze, Phases: d.phases}
	if snap != nil {
		if o.Mode == image.ModeLive && snap.shadow == nil {
			snap.startDrain() // a shadow needs no drain: see shadow.go
		}
		if o.Mode == image.ModeFull {
			if err := snap.drainAll(ctx); err != nil {
				snap.Release()
				return nil, fmt.Errorf("drain snapshot into image: %w", err)
			}
			snap.Release()
			snap = nil
		}
	}
	if err := image.Write(o.Dir, d.img); err != nil {
		if snap != nil {
			snap.Release()
		}
		return nil, err
	}
	res.Snapshot = snap
	return res, nil
}

// Phase is one timed step of a dump.
type Phase struct {
	Name string
	D    time.Duration
}

// dumper holds one dump in progress. It is used by one goroutine.
type dumper struct {
	pid   int
	o     Options
	tr    *inject.Process
	img   *image.Image
	pages *os.File
	// pagesOff is the next free offset in pages.img.
	pagesOff uint64
	phases   []Phase
	lastMark time.Time
	// pipeSize is the bytes of one pin pipe, from the system's limit read
	// before the freeze.
	pipeSize int
	// copyBuf is copyNow's buffer.
	copyBuf []byte
	// preMaps are the mappings with VmFlags read before the freeze.
	preMaps []procfs.Mapping
	// pool holds pin pipes made before the freeze, sized from preMaps.
	pool []pipePair
}

// waitNoUffd reads pid's mappings until none is registered with a
// userfaultfd, for at most wait (0: 30 s). A mapping can be registered with
// one uffd only: the earlier snapshot's, until its page server has drained
// its COW window. The wait happens before the freeze: the process runs.
func waitNoUffd(pid int, wait time.Duration) ([]procfs.Mapping, error) {
	if wait == 0 {
		wait = 30 * time.Second
	}
	deadline := time.Now().Add(wait)
	for {
		maps, err := procfs.Maps(pid)
		if err != nil {
			return nil, nil // frozenMaps reads them again
		}
		busy := -1
		for i, m := range maps {
			if m.HasFlag("uw") || m.HasFlag("um") || m.HasFlag("ui") {
				busy = i
				break
			}
		}
		if busy < 0 {
			return maps, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("dump pid %d: mapping %#x-%#x is registered with a userfaultfd: an earlier snapshot's copy-on-write window still open after %v, or the process uses userfaultfd itself: %w",
				pid, maps[busy].Start, maps[busy].End, wait, ErrUnsupported)
		}
		time.Sleep(20 * time.Millisecond) // nothing to wait on: the uffd is another process's
	}
}

// mark ends the current phase.
func (d *dumper) mark(name string) {
	now := time.Now()
	d.phases = append(d.phases, Phase{name, now.Sub(d.lastMark)})
	d.lastMark = now
}

// frozen runs while every thread is stopped: it records the state and
// takes the memory snapshot. The caller detaches afterwards on every path.
func (d *dumper) frozen() (*Snapshot, error) {
	id := make([]byte, 8)
	rand.Read(id)
	d.img = &image.Image{
		Version:    image.FormatVersion,
		Mode:       d.o.Mode,
		SnapshotID: hex.EncodeToString(id),
		CreatedNs:  time.Now().UnixNano(),
		Arch:       "x86_64",
	}
	if d.o.Mode == image.ModeLive {
		d.img.Endpoint, d.img.EndpointTLS = d.o.Endpoint, d.o.EndpointTLS
		d.img.Token = d.o.Token
	}
	if d.o.Mode != image.ModeStop {
		d.img.Stats.COW = string(d.o.COW)
	}
	p, err := d.process()
	if err != nil {
		return nil, err
	}
	snap, err := d.memory(p)
	if err != nil {
		return nil, err
	}
	d.img.Processes = append(d.img.Processes, *p)
	return snap, nil
}

// process records everything but memory contents.
func (d *dumper) process() (*image.Process, error) {
	pid := d.pid
	st, err := procfs.ReadStatus(pid, pid)
	if err != nil {
		return nil, fmt.Errorf("read status: %w", err)
	}
	stat, err := procfs.ReadStat(pid)
	if err != nil {
		return nil, fmt.Errorf("read stat: %w", err)
	}
	kids, shadows := children(pid)
	if !d.o.LeaveChildren && len(kids) > 0 {
		return nil, fmt.Errorf("pid %d has child processes %v: process trees are not supported: %w", pid, kids, ErrUnsupported)
	}
	if err := d.reapShadows(shadows); err != nil {
		return nil, err
	}
	p := &image.Process{ID: 1, Pid: pid, PPid: stat.PPid, Pgid: stat.Pgrp, Sid: stat.Session, Comm: st.Name, Umask: st.Umask}
	if len(st.NSpid) > 1 {
		// The pid the process sees is the innermost one.
		p.Pid = st.NSpid[len(st.NSpid)-1]
	}
	if p.Exe, err = procfs.Exe(pid); err != nil {
		return nil, fmt.Errorf("read exe: %w", err)
	}
	p.Cmdline, _ = procfs.Cmdline(pid)
	if p.Cwd, err = procfs.Cwd(pid); err != nil {
		return nil, fmt.Errorf("read cwd: %w", err)
	}
	if p.Root, err = procfs.Root(pid); err != nil {
		return nil, fmt.Errorf("read root: %w", err)
	}
	p.Creds = image.Creds{
		Uid: st.Uid, Gid: st.Gid, Groups: st.Groups,
		CapInh: st.CapInh, CapPrm: st.CapPrm, CapEff: st.CapEff, CapBnd: st.CapBnd, CapAmb: st.CapAmb,
		NoNewPrivs: st.NoNewPrivs, Seccomp: st.Seccomp,
	}
	rl, err := procfs.Rlimits(pid)
	if err != nil {
		return nil, fmt.Errorf("read rlimits: %w", err)
	}
	for i, r := range rl {
		p.Rlimits = append(p.Rlimits, image.Rlimit{Resource: i, Cur: r.Cur, Max: r.Max})
	}
	d.mark("proc")
	if err := d.mm(p, stat); err != nil {
		return nil, err
	}
	if err := d.threads(p); err != nil {
		return nil, err
	}
	d.mark("threads")
	if err := d.sigactions(p, st); err != nil {
		return nil, err
	}
	d.mark("sigactions")
	if err := d.fds(p); err != nil {
		return nil, err
	}
	d.mark("fds")
	return p, nil
}

func (d *dumper) mm(p *image.Process, s *procfs.Stat) error {
	brk, err := d.tr.Syscall(0, unix.SYS_BRK, 0)
	if err != nil {
		return fmt.Errorf("read brk: %w", err)
	}
	auxv, err := procfs.Auxv(d.pid)
	if err != nil {
		return fmt.Errorf("read auxv: %w", err)
	}
	p.MM = image.MM{
		StartCode: s.StartCode, EndCode: s.EndCode, StartData: s.StartData, EndData: s.EndData,
		StartBrk: s.StartBrk, Brk: uint64(brk), StartStack: s.StartStack,
		ArgStart: s.ArgStart, ArgEnd: s.ArgEnd, EnvStart: s.EnvStart, EnvEnd: s.EnvEnd, Auxv: auxv,
	}
	return nil
}

// Linux prctl and signal constants not in x/sys.
const (
	prGetTidAddress = 40 // PR_GET_TID_ADDRESS
)

func (d *dumper) threads(p *image.Process) error {
	scratch, err := d.tr.Scratch()
	if err != nil {
		return fmt.Errorf("scratch memory: %w", err)
	}
	states, shared, err := d.tr.ThreadStates()
	if err != nil {
		return fmt.Errorf("read thread state: %w", err)
	}
	tids := make([]int, 0, len(states))
	for _, ts := range states {
		tid := ts.Tid
		tids = append(tids, tid)
		if d.img.XSaveSize == 0 {
			d.img.XSaveSize = len(ts.XState)
		}
		t := image.Thread{Tid: tid, Regs: regsToImage(ts.Regs), XState: ts.XState, SigMask: ts.SigMask}
		if st, err := procfs.ReadStatus(d.pid, tid); err == nil {
			// The tid the thread sees is the innermost NSpid.
			if len(st.NSpid) > 0 {
				t.Tid = st.NSpid[len(st.NSpid)-1]
			}
			t.Comm = st.Name
		}
		if ts.Rseq.Addr != 0 {
			t.RseqAddr, t.RseqLen, t.RseqSig = ts.Rseq.Addr, ts.Rseq.Len, ts.Rseq.Sig
		}
		t.Pending = siginfos(ts.Pending)
		p.Threads = append(p.Threads, t)
	}
	// sigaltstack(NULL, &old) and prctl(PR_GET_TID_ADDRESS, &addr) run in
	// each thread itself (per-thread state), in one hand-off to the
	// tracer: this is freeze time.
	err = d.tr.Batch(func(b *inject.Batch) error {
		for i, tid := range tids {
			t := &p.Threads[i]
			if _, err := b.Syscall(tid, unix.SYS_SIGALTSTACK, 0, uintptr(scratch)); err != nil {
				return fmt.Errorf("thread %d: read sigaltstack: %w", tid, err)
			}
			if _, err := b.Syscall(tid, unix.SYS_PRCTL, prGetTidAddress, uintptr(scratch+24)); err != nil {
				return fmt.Errorf("thread %d: read tid address: %w", tid, err)
			}
			var out [32]byte
			if err := b.ReadMem(scratch, out[:]); err != nil {
				return fmt.Errorf("thread %d: read sigaltstack and tid address: %w", tid, err)
			}
			t.AltStackSP = le64(out[0:])
			t.AltStackFl = int32(le32(out[8:]))
			t.AltStackSz = le64(out[16:])
			t.TidAddress = le64(out[24:])
		}
		return nil
	})
	if err != nil {
		return err
	}
	p.SharedPending = siginfos(shared)
	return nil
}

// siginfos turns queued signals into their image form.
func siginfos(sis []inject.Siginfo) []image.Siginfo {
	var out []image.Siginfo
	for _, si := range sis {
		raw := (*[128]byte)(unsafe.Pointer(&si))[:]
		out = append(out, image.Siginfo{Signo: int(si.Signo), Raw: append([]byte(nil), raw...)})
	}
	return out
}

func (d *dumper) sigactions(p *image.Process, st *procfs.Status) error {
	scratch, err := d.tr.Scratch()
	if err != nil {
		return err
	}
	set := st.SigCgt | st.SigIgn
	return d.tr.Batch(func(b *inject.Batch) error {
		for sig := 1; sig <= 64; sig++ {
			if set&(1<<(sig-1)) == 0 || sig == int(unix.SIGKILL) || sig == int(unix.SIGSTOP) {
				continue
			}
			// rt_sigaction(sig, NULL, &old, 8): struct kernel_sigaction is
			// handler, flags, restorer, mask (4 words).
			if _, err := b.Syscall(0, unix.SYS_RT_SIGACTION, uintptr(sig), 0, uintptr(scratch), 8); err != nil {
				return fmt.Errorf("read sigaction %d: %w", sig, err)
			}
			var w [32]byte
			if err := b.ReadMem(scratch, w[:]); err != nil {
				return fmt.Errorf("read sigaction %d: %w", sig, err)
			}
			p.Sigacts = append(p.Sigacts, image.Sigaction{Signo: sig, Handler: le64(w[0:]), Flags: le64(w[8:]), Restorer: le64(w[16:]), Mask: le64(w[24:])})
		}
		return nil
	})
}

func unsupported(pid, fd int, what string) error {
	return fmt.Errorf("pid %d fd %d: %s: %w", pid, fd, what, ErrUnsupported)
}

// children lists the child processes of every thread of pid, apart from
// the shadows of earlier fork snapshots (see shadow.go), which go to
// shadows.
func children(pid int) (kids, shadows []int) {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, t := range tasks {
		b, _ := os.ReadFile(t)
		for _, f := range strings.Fields(string(b)) {
			var c int
			if _, err := fmt.Sscan(f, &c); err != nil {
				continue
			}
			if IsShadow(c) {
				shadows = append(shadows, c)
			} else {
				kids = append(kids, c)
			}
		}
	}
	return kids, shadows
}
