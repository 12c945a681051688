package uffd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime/debug"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// Test helpers. Registered memory is only ever touched by these plain Go
// loops, never by runtime routines (memmove, memequal) that cannot be
// preempted while blocked in a userfault.

//go:noinline
func sumBytes(b []byte) uint64 {
	var s uint64
	for i := 0; i < len(b); i++ {
		s += uint64(b[i])
	}
	return s
}

//go:noinline
func writeBytes(b []byte, seed byte) {
	for i := 0; i < len(b); i++ {
		b[i] = seed + byte(i%251)
	}
}

// firstDiff compares registered memory with want byte by byte and returns
// the first differing offset, or -1.
//
//go:noinline
func firstDiff(mem, want []byte) int {
	for i := 0; i < len(want); i++ {
		if mem[i] != want[i] {
			return i
		}
	}
	return -1
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	writeBytes(b, seed)
	return b
}

// present reads the pagemap present bit of the page at addr (no fault).
func present(t testing.TB, addr uint64) bool {
	t.Helper()
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		t.Fatalf("open pagemap: %v", err)
	}
	defer f.Close()
	var e [8]byte
	if _, err := f.ReadAt(e[:], int64(addr/PageSize*8)); err != nil {
		t.Fatalf("read pagemap: %v", err)
	}
	return binary.LittleEndian.Uint64(e[:])&(1<<63) != 0
}

func openAPI(t testing.TB, flags int, want Feature) *FD {
	t.Helper()
	u, err := Open(flags)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { u.Close() })
	if _, err := u.API(want); err != nil {
		t.Fatalf("API(%v): %v", want, err)
	}
	return u
}

// drain returns the messages buffered in c. A thread blocked in a fault
// that catches a signal (Go preempts with SIGURG) retries the access and
// may raise the same fault twice, so tests accept repeats.
func drain(c chan Msg) []Msg {
	var out []Msg
	for {
		select {
		case m := <-c:
			out = append(out, m)
		default:
			return out
		}
	}
}

// funcHandler adapts functions to Handler.
type funcHandler struct {
	fault func(u *FD, m Msg) error
	event func(u *FD, m Msg) error
}

func (h funcHandler) Fault(u *FD, m Msg) error { return h.fault(u, m) }
func (h funcHandler) Event(u *FD, m Msg) error {
	if h.event == nil {
		return fmt.Errorf("unexpected event %v", m)
	}
	return h.event(u, m)
}

// runLoop runs a Loop over fds with h until the test ends; a Run error
// fails the test.
func runLoop(t *testing.T, h Handler, fds ...*FD) *Loop {
	t.Helper()
	inProcessFaults(t)
	l, err := NewLoop(h)
	if err != nil {
		t.Fatalf("NewLoop: %v", err)
	}
	for _, u := range fds {
		if err := l.Add(u); err != nil {
			t.Fatalf("Add: %v", err)
		}
	}
	errc := make(chan error, 1)
	go func() { errc <- l.Run() }()
	t.Cleanup(func() {
		l.Stop()
		if err := <-errc; err != nil {
			t.Errorf("Loop.Run: %v", err)
		}
		if err := l.Close(); err != nil {
			t.Errorf("Loop.Close: %v", err)
		}
	})
	return l
}

func TestProbe(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	f, err := Probe()
	if err != nil {
		t.Fatalf("Probe: %v", err)
	}
	t.Logf("kernel features %#x: %v", uint64(f), f)
	for _, want := range []Feature{FeatureWPAsync, FeatureMove, FeatureWPUnpopulated, FeaturePoison,
		FeaturePagefaultFlagWP, FeatureEventRemove, FeatureEventUnmap, FeatureEventRemap, FeatureEventFork} {
		if f&want == 0 {
			t.Errorf("Probe() = %v, lacks %v (kernel 6.18 offers it)", f, want)
		}
	}
}

func TestAPI(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	u, err := Open(unix.O_NONBLOCK)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer u.Close()
	got, err := u.API(FeaturePagefaultFlagWP | FeatureWPAsync)
	if err != nil {
		t.Fatalf("API: %v", err)
	}
	if want := FeaturePagefaultFlagWP | FeatureWPAsync | FeatureWPUnpopulated; got != want || u.Features() != want {
		t.Errorf("API granted %v, Features() %v, want %v", got, u.Features(), want)
	}
	if _, err := u.API(0); err == nil || errors.Is(err, ErrNotSupported) {
		t.Errorf("second API handshake: err = %v, want a plain kernel refusal", err)
	}

	u2, err := Open(0)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer u2.Close()
	if _, err := u2.API(FeatureEventRemove | 1<<40); !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "1<<40") {
		t.Errorf("API with unknown feature: err = %v, want ErrNotSupported naming 1<<40", err)
	}

	var buf [4]Msg
	if n, err := u.ReadMsgs(buf[:]); n != 0 || err != nil {
		t.Errorf("ReadMsgs on idle non-blocking uffd = %d, %v; want 0, nil", n, err)
	}

	if _, err := Open(0x40000000); !errors.Is(err, unix.EINVAL) {
		t.Errorf("Open(bad flags): err = %v, want EINVAL", err)
	}
}

func TestOpenDevAndAdopt(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	// The /dev/userfaultfd route Open falls back to.
	fd, err := openDev(unix.O_CLOEXEC)
	if err != nil {
		t.Fatalf("openDev: %v", err)
	}
	u, err := FromRaw(fd)
	if err != nil {
		unix.Close(fd)
		t.Fatalf("FromRaw: %v", err)
	}
	defer u.Close()
	if _, err := u.API(0); err != nil {
		t.Fatalf("API on /dev/userfaultfd uffd: %v", err)
	}

	// FromFile duplicates: the adopted FD works on the same uffd after
	// the file is closed.
	dup, err := unix.FcntlInt(uintptr(u.Fd()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("dup: %v", err)
	}
	f := os.NewFile(uintptr(dup), "uffd")
	a, err := FromFile(f)
	f.Close()
	if err != nil {
		t.Fatalf("FromFile: %v", err)
	}
	defer a.Close()
	mem := mmapAnon(t, 2)
	if _, err := a.Register(addrOf(mem), 2*PageSize, ModeMissing); err != nil {
		t.Fatalf("Register through adopted FD: %v", err)
	}
	if n, err := a.ZeroPage(addrOf(mem), 2*PageSize, false); n != 2*PageSize || err != nil {
		t.Fatalf("ZeroPage through adopted FD = %d, %v", n, err)
	}
	if err := u.Unregister(addrOf(mem), 2*PageSize); err != nil {
		t.Fatalf("Unregister through original FD: %v", err)
	}

	// Not a uffd.
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatalf("pipe: %v", err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	if _, err := FromRaw(p[0]); !errors.Is(err, unix.EINVAL) {
		t.Errorf("FromRaw(pipe): err = %v, want EINVAL", err)
	}

	// Disown hands the number over; the FD is dead afterwards.
	raw := a.Disown()
	if a.Fd() != -1 || raw < 0 {
		t.Errorf("after Disown: Fd() = %d, Disown() = %d", a.Fd(), raw)
	}
	if _, err := a.Register(addrOf(mem), PageSize, ModeMissing); !errors.Is(err, ErrClosed) {
		t.Errorf("Register after Disown: err = %v, want ErrClosed", err)
	}
	if err := unix.Close(raw); err != nil {
		t.Errorf("close disowned fd: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Errorf("Close after Disown: %v", err)
	}
}

func TestRegisterUnregister(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	u := openAPI(t, unix.O_NONBLOCK, FeatureMove)
	mem := mmapAnon(t, 8)
	base := addrOf(mem)

	if _, err := u.Register(base+1, PageSize, ModeMissing); !errors.Is(err, unix.EINVAL) {
		t.Errorf("Register unaligned: err = %v, want EINVAL", err)
	}
	ioctls, err := u.Register(base, 8*PageSize, ModeMissing)
	if err != nil {
		t.Fatalf("Register: %v", err)
	}
	if want := IoctlCopy | IoctlZeroPage | IoctlWake | IoctlMove; ioctls&want != want {
		t.Errorf("Register ioctls = %#x, want at least %#x", ioctls, want)
	}

	faults := make(chan Msg, 8)
	loopc := make(chan *Loop, 1)
	loopc <- runLoop(t, funcHandler{fault: func(u *FD, m Msg) error {
		loop := <-loopc
		defer func() { loopc <- loop }()
		if err := loop.Close(); !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("Close inside Run: err = %v, want EBUSY", err)
		}
		faults <- m
		if _, err := u.ZeroPage(alignDown(m.Address), PageSize, false); !errors.Is(err, ErrExist) {
			return err
		}
		return u.Wake(alignDown(m.Address), PageSize) // a repeated fault
	}}, u)

	if s := sumBytes(mem[:PageSize]); s != 0 {
		t.Errorf("page 0 after fault sums to %d, want 0", s)
	}
	got := drain(faults)
	if len(got) == 0 {
		t.Fatalf("no fault after reading page 0")
	}
	for _, m := range got {
		if m.Kind != MsgPagefault || m.Address != base || m.IsWrite() || m.IsWP() {
			t.Errorf("fault = %v, want a read pagefault at %#x", m, base)
		}
	}
	if err := u.Unregister(base, 8*PageSize); err != nil {
		t.Fatalf("Unregister: %v", err)
	}
	writeBytes(mem[PageSize:2*PageSize], 3)
	if s := sumBytes(mem[PageSize : 2*PageSize]); s != sumBytes(pattern(PageSize, 3)) {
		t.Errorf("page 1 after unregister sums to %d", s)
	}
	if len(faults) != 0 {
		t.Errorf("%d faults after Unregister, want 0", len(faults))
	}
}

func TestCopyZeroPageMove(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	u := openAPI(t, unix.O_NONBLOCK, FeatureMove)
	mem := mmapAnon(t, 16)
	base := addrOf(mem)
	if _, err := u.Register(base, 16*PageSize, ModeMissing); err != nil {
		t.Fatalf("Register: %v", err)
	}

	src := pattern(4*PageSize, 7)
	if n, err := u.Copy(base, src, 0); n != 4*PageSize || err != nil {
		t.Fatalf("Copy 4 pages = %d, %v", n, err)
	}
	if !bytes.Equal(mem[:4*PageSize], src) {
		t.Errorf("content after Copy differs")
	}

	// Partial copy: page 6 is populated, so a copy of pages 4-7 stops there.
	if n, err := u.ZeroPage(base+6*PageSize, PageSize, false); n != PageSize || err != nil {
		t.Fatalf("ZeroPage page 6 = %d, %v", n, err)
	}
	n, err := u.Copy(base+4*PageSize, src, 0)
	if n != 2*PageSize || !errors.Is(err, ErrExist) || !errors.Is(err, unix.EEXIST) {
		t.Fatalf("Copy over populated page = %d, %v; want %d, ErrExist", n, err, 2*PageSize)
	}
	if !bytes.Equal(mem[4*PageSize:6*PageSize], src[:2*PageSize]) {
		t.Errorf("pages 4-5 differ after partial Copy")
	}
	if sumBytes(mem[6*PageSize:7*PageSize]) != 0 {
		t.Errorf("page 6 was overwritten")
	}
	if present(t, base+7*PageSize) {
		t.Errorf("page 7 populated although the copy stopped at page 6")
	}
	if n, err := u.Copy(base, src[:PageSize], 0); n != 0 || !errors.Is(err, ErrExist) {
		t.Errorf("Copy onto populated page = %d, %v; want 0, ErrExist", n, err)
	}

	if n, err := u.ZeroPage(base+8*PageSize, 2*PageSize, false); n != 2*PageSize || err != nil {
		t.Fatalf("ZeroPage = %d, %v", n, err)
	}
	if sumBytes(mem[8*PageSize:10*PageSize]) != 0 || !present(t, base+9*PageSize) {
		t.Errorf("ZeroPage range not zero or not present")
	}

	// Move 4 populated pages of an unregistered mapping into pages 10-13.
	other := mmapAnon(t, 4)
	writeBytes(other, 42)
	want := pattern(4*PageSize, 42)
	if n, err := u.Move(base+10*PageSize, addrOf(other), 4*PageSize, 0); n != 4*PageSize || err != nil {
		t.Fatalf("Move = %d, %v", n, err)
	}
	if !bytes.Equal(mem[10*PageSize:14*PageSize], want) {
		t.Errorf("content after Move differs")
	}
	if present(t, addrOf(other)) || sumBytes(other) != 0 {
		t.Errorf("Move left the source populated")
	}
	writeBytes(other[:PageSize], 1)
	if _, err := u.Move(base, addrOf(other), PageSize, 0); !errors.Is(err, ErrExist) {
		t.Errorf("Move onto populated page: err = %v, want ErrExist", err)
	}
	if err := u.Wake(base, 16*PageSize); err != nil {
		t.Errorf("Wake: %v", err)
	}
	if _, err := u.Copy(addrOf(other), src[:PageSize], 0); !errors.Is(err, ErrUnmapped) {
		t.Errorf("Copy into unregistered memory: err = %v, want ErrUnmapped", err)
	}
}

func TestPoison(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	u := openAPI(t, unix.O_NONBLOCK, FeaturePoison)
	mem := mmapAnon(t, 2)
	if _, err := u.Register(addrOf(mem), 2*PageSize, ModeMissing); err != nil {
		t.Fatalf("Register: %v", err)
	}
	if n, err := u.Poison(addrOf(mem), PageSize, false); n != PageSize || err != nil {
		t.Fatalf("Poison = %d, %v", n, err)
	}
	faulted := func() (hit bool) {
		defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
		defer func() { hit = recover() != nil }()
		_ = sumBytes(mem[:1])
		return false
	}()
	if !faulted {
		t.Errorf("reading a poisoned page did not fault")
	}
}

func TestWriteProtect(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	u := openAPI(t, unix.O_NONBLOCK, FeaturePagefaultFlagWP|FeatureThreadID)
	mem := mmapAnon(t, 8)
	base := addrOf(mem)
	writeBytes(mem, 9)
	orig := pattern(8*PageSize, 9)
	if _, err := u.Register(base, 8*PageSize, ModeWP); err != nil {
		t.Fatalf("Register WP: %v", err)
	}
	if err := u.Protect(base, 8*PageSize); err != nil {
		t.Fatalf("Protect: %v", err)
	}

	faults := make(chan Msg, 8)
	// The handler sees the current writer's channel; the kernel orders
	// the store before the fault, but the race detector cannot know.
	var writerDone atomic.Pointer[chan struct{}]
	runLoop(t, funcHandler{fault: func(u *FD, m Msg) error {
		page := alignDown(m.Address)
		select {
		case <-*writerDone.Load():
			return fmt.Errorf("writer finished before its WP fault at %#x was handled", page)
		default:
		}
		off := page - base
		if d := firstDiff(mem[off:off+PageSize], orig[off:off+PageSize]); d >= 0 {
			return fmt.Errorf("page %#x changed at +%d before unprotect", page, d)
		}
		faults <- m
		return u.Unprotect(page, PageSize)
	}}, u)

	for _, pg := range []uint64{3, 5} {
		done := make(chan struct{})
		writerDone.Store(&done)
		go func() {
			mem[pg*PageSize+100] = 0xEE
			close(done)
		}()
		<-done
		got := drain(faults)
		if len(got) == 0 {
			t.Fatalf("page %d: no fault recorded", pg)
		}
		for _, m := range got {
			if m.Kind != MsgPagefault || !m.IsWP() || !m.IsWrite() || m.Address != base+pg*PageSize || m.Ptid == 0 {
				t.Errorf("page %d: fault = %+v, want a WP write fault at %#x with a thread id", pg, m, base+pg*PageSize)
			}
		}
		if mem[pg*PageSize+100] != 0xEE {
			t.Errorf("page %d: write lost", pg)
		}
	}
	// Unprotected pages take writes without faults; reads never fault.
	writeBytes(mem[3*PageSize:4*PageSize], 1)
	_ = sumBytes(mem)
	if len(faults) != 0 {
		t.Errorf("%d faults for an unprotected write or a read", len(faults))
	}
}

func TestWPUnpopulated(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	u := openAPI(t, unix.O_NONBLOCK, FeaturePagefaultFlagWP|FeatureWPUnpopulated)
	mem := mmapAnon(t, 4)
	base := addrOf(mem)
	if _, err := u.Register(base, 4*PageSize, ModeWP); err != nil {
		t.Fatalf("Register WP: %v", err)
	}
	if err := u.Protect(base, 4*PageSize); err != nil {
		t.Fatalf("Protect: %v", err)
	}
	faults := make(chan Msg, 4)
	runLoop(t, funcHandler{fault: func(u *FD, m Msg) error {
		faults <- m
		return u.Unprotect(alignDown(m.Address), PageSize)
	}}, u)
	writeBytes(mem[2*PageSize:3*PageSize], 5)
	got := drain(faults)
	if len(got) == 0 {
		t.Fatalf("no fault for a write to an unpopulated protected page")
	}
	for _, m := range got {
		if !m.IsWP() || m.Address != base+2*PageSize {
			t.Errorf("fault = %v, want WP at %#x", m, base+2*PageSize)
		}
	}
}

func TestLoopLifecycle(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	h := funcHandler{fault: func(*FD, Msg) error { return nil }}
	l, err := NewLoop(h)
	if err != nil {
		t.Fatalf("NewLoop: %v", err)
	}
	l.Stop()
	if err := l.Run(); err != nil {
		t.Errorf("Run after Stop: %v", err)
	}
	if err := l.Run(); err != nil {
		t.Errorf("second Run after Stop: %v", err)
	}

	// A uffd without API handshake polls as EPOLLERR: Run must fail, not spin.
	raw, err := Open(unix.O_NONBLOCK)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer raw.Close()
	l2, err := NewLoop(h)
	if err != nil {
		t.Fatalf("NewLoop: %v", err)
	}
	if err := l2.Add(raw); err != nil {
		t.Fatalf("Add: %v", err)
	}
	if err := l2.Add(raw); !errors.Is(err, unix.EEXIST) {
		t.Errorf("second Add: err = %v, want EEXIST", err)
	}
	if err := l2.Run(); !errors.Is(err, unix.EIO) {
		t.Errorf("Run with uninitialized uffd: err = %v, want EIO", err)
	}
	if err := l2.Remove(raw); err != nil {
		t.Errorf("Remove: %v", err)
	}
	if err := l2.Remove(raw); !errors.Is(err, unix.ENOENT) {
		t.Errorf("second Remove: err = %v, want ENOENT", err)
	}
	for _, lp := range []*Loop{l, l2} {
		if err := lp.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		lp.Stop() // no-op after Close
		if err := lp.Run(); !errors.Is(err, ErrClosed) {
			t.Errorf("Run after Close: err = %v, want ErrClosed", err)
		}
		if err := lp.Add(raw); !errors.Is(err, ErrClosed) {
			t.Errorf("Add after Close: err = %v, want ErrClosed", err)
		}
	}
}

// TestRemoteMM drives a uffd created by another process, fetched with
// pidfd_getfd, as the checkpoint engine does; then the process exits and
// the uffd reports ErrGone.
func TestRemoteMM(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=1")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start child: %v", err)
	}
	defer func() {
		stdin.Close()
		cmd.Wait()
	}()
	out := bufio.NewScanner(stdout)
	if !out.Scan() {
		t.Fatalf("child said nothing: %v", out.Err())
	}
	var childFD int
	var addr uint64
	if _, err := fmt.Sscanf(out.Text(), "%d %d", &childFD, &addr); err != nil {
		t.Fatalf("parse child line %q: %v", out.Text(), err)
	}

	pidfd, err := unix.PidfdOpen(cmd.Process.Pid, 0)
	if err != nil {
		t.Fatalf("pidfd_open: %v", err)
	}
	defer unix.Close(pidfd)
	got, err := unix.PidfdGetfd(pidfd, childFD, 0)
	if err != nil {
		t.Fatalf("pidfd_getfd: %v", err)
	}
	f := os.NewFile(uintptr(got), "child-uffd")
	u, err := FromFile(f)
	f.Close()
	if err != nil {
		t.Fatalf("FromFile: %v", err)
	}
	defer u.Close()
	if _, err := u.API(0); err != nil {
		t.Fatalf("API: %v", err)
	}
	if _, err := u.Register(addr, 16*PageSize, ModeMissing); err != nil {
		t.Fatalf("Register in child: %v", err)
	}
	src := pattern(4*PageSize, 77)
	if n, err := u.Copy(addr, src, 0); n != 4*PageSize || err != nil {
		t.Fatalf("Copy into child = %d, %v", n, err)
	}

	// The content landed in the child's memory, not ours.
	buf := make([]byte, 4*PageSize)
	if _, err := unix.ProcessVMReadv(cmd.Process.Pid, []unix.Iovec{{Base: &buf[0], Len: uint64(len(buf))}},
		[]unix.RemoteIovec{{Base: uintptr(addr), Len: len(buf)}}, 0); err != nil {
		t.Fatalf("process_vm_readv: %v", err)
	}
	if !bytes.Equal(buf, src) {
		t.Errorf("child memory differs from the copy")
	}
	if _, err := fmt.Fprintln(stdin, "sum"); err != nil {
		t.Fatal(err)
	}
	if !out.Scan() {
		t.Fatalf("child gave no sum: %v", out.Err())
	}
	if sum, err := strconv.ParseUint(out.Text(), 10, 64); err != nil || sum != sumBytes(src) {
		t.Errorf("child sums its pages to %q, want %d", out.Text(), sumBytes(src))
	}

	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child exit: %v", err)
	}
	if _, err := u.Copy(addr+4*PageSize, src[:PageSize], 0); !errors.Is(err, ErrGone) {
		t.Errorf("Copy after the child exited: err = %v, want ErrGone", err)
	}
}

// TestLoopDefersErrAgain: a Fault that returns ErrAgain is retried by the
// Loop although no further message arrives.
func TestLoopDefersErrAgain(t *testing.T) {
	requireRoot(t)
	checkFDs(t)
	u := openAPI(t, unix.O_NONBLOCK, 0)
	mem := mmapAnon(t, 1)
	if _, err := u.Register(addrOf(mem), PageSize, ModeMissing); err != nil {
		t.Fatalf("Register: %v", err)
	}
	calls := make(chan Msg, 16)
	first := true // touched by the Loop goroutine only
	runLoop(t, funcHandler{fault: func(u *FD, m Msg) error {
		calls <- m
		if first {
			first = false
			return fmt.Errorf("pretend copy: %w", ErrAgain)
		}
		if _, err := u.Copy(alignDown(m.Address), pattern(PageSize, 5), 0); !errors.Is(err, ErrExist) {
			return err
		}
		return u.Wake(alignDown(m.Address), PageSize)
	}}, u)
	if d := firstDiff(mem, pattern(PageSize, 5)); d >= 0 {
		t.Errorf("page differs at +%d", d)
	}
	got := drain(calls)
	if len(got) < 2 {
		t.Fatalf("Fault called %d times, want the deferred call retried", len(got))
	}
	for _, m := range got[1:] {
		if m != got[0] {
			t.Errorf("retried message %v differs from the deferred %v", m, got[0])
		}
	}
}
