package inject

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSeizeDetachThreads seizes a process with 4 spinning threads, one
// thread blocked in read() and one in clock_nanosleep, injects getpid and
// gettid into every thread, detaches, and checks that the process has the
// same fds and maps, that the interrupted read and nanosleep were restarted
// (not failed with EINTR), and that every thread runs again.
func TestSeizeDetachThreads(t *testing.T) {
	for _, mode := range []struct {
		name string
		opts Options
	}{
		{"singlestep", Options{}},
		{"syscallstops", Options{SyscallStops: true}},
		{"seccomp+clone", Options{SuspendSeccomp: true, TraceClone: true}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			needTarget(t)
			checkFdLeak(t)
			tg := startTarget(t, "threads", nil)
			waitFor(t, "reader blocked in read", func() bool { return inSyscall(tg.pid, tg.tid, unix.SYS_READ) })
			before := takeSnapshot(t, tg.pid)

			for round := 0; round < 2; round++ {
				p := seizeT(t, tg.pid, mode.opts)
				tids := p.Threads()
				if len(tids) != 6 || tids[0] != tg.pid || !slices.Contains(tids, tg.tid) {
					t.Fatalf("threads %v: want 6, leader %d first, reader %d", tids, tg.pid, tg.tid)
				}
				st, _ := stateOf(t, p, tg.tid)
				r := st.Regs
				if r.Orig_rax != unix.SYS_READ || int64(r.Rax) != -errRestartSys {
					t.Errorf("reader regs: orig_rax %d rax %d, want read interrupted with -ERESTARTSYS", r.Orig_rax, int64(r.Rax))
				}
				ls, _ := stateOf(t, p, 0)
				lr := ls.Regs
				t.Logf("leader orig_rax %d rax %d", int64(lr.Orig_rax), int64(lr.Rax))
				for _, tid := range tids {
					s0, _ := stateOf(t, p, tid)
					r0 := s0.Regs
					pid, err := p.Syscall(tid, unix.SYS_GETPID)
					if err != nil || int(pid) != tg.pid {
						t.Errorf("getpid in %d = %d, %v; want %d", tid, pid, err, tg.pid)
					}
					got, err := p.Syscall(tid, unix.SYS_GETTID)
					if err != nil || int(got) != tid {
						t.Errorf("gettid in %d = %d, %v", tid, got, err)
					}
					if s1, _ := stateOf(t, p, tid); s1.Regs != r0 {
						t.Errorf("saved regs of %d changed by injection", tid)
					}
				}
				if err := p.Detach(); err != nil {
					t.Fatalf("detach: %v", err)
				}
				if _, err := p.Syscall(0, unix.SYS_GETPID); !errors.Is(err, ErrClosed) {
					t.Errorf("syscall after detach: %v, want ErrClosed", err)
				}
				before.unchanged(t, tg.pid)
				if got := tg.ask(t, "check"); got != "running" {
					t.Fatalf("after detach the target said %q, want running", got)
				}
				waitFor(t, "reader blocked in read again", func() bool { return inSyscall(tg.pid, tg.tid, unix.SYS_READ) })
			}
			if got := tg.ask(t, "quit"); got != "bye" {
				t.Fatalf("target said %q, want bye", got)
			}
			if err := tg.cmd.Wait(); err != nil {
				t.Fatalf("target exit: %v", err)
			}
		})
	}
}

// TestSyscallMmapMemory maps memory by injection, round-trips bytes through
// WriteMem/ReadMem (also into a read-only mapping), checks errno errors, and
// unmaps it again.
func TestSyscallMmapMemory(t *testing.T) {
	needTarget(t)
	checkFdLeak(t)
	tg := startTarget(t, "cmd", nil)
	before := takeSnapshot(t, tg.pid)
	p := seizeT(t, tg.pid, Options{})

	const size = 3 * 4096
	addr, err := p.Syscall(0, unix.SYS_MMAP, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS, ^uintptr(0), 0)
	if err != nil {
		t.Fatalf("mmap: %v", err)
	}
	if maps := takeSnapshot(t, tg.pid).maps; !mapsCover(maps, uint64(addr), size, "rw-p") {
		t.Fatalf("maps lack %#x+%#x rw-p:\n%s", addr, size, maps)
	}
	want := make([]byte, size)
	rand.Read(want)
	if err := p.WriteMem(uint64(addr), want); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if err := p.ReadMem(uint64(addr), got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("ReadMem differs from WriteMem")
	}
	// Read-only private mapping: /proc/pid/mem writes through (FOLL_FORCE).
	if _, err := p.Syscall(0, unix.SYS_MPROTECT, addr, size, unix.PROT_READ); err != nil {
		t.Fatal(err)
	}
	copy(want[100:], "written into a read-only page")
	if err := p.WriteMem(uint64(addr)+100, want[100:130]); err != nil {
		t.Fatalf("write read-only mapping: %v", err)
	}
	if err := p.ReadMem(uint64(addr), got); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back after write to read-only mapping: %v", err)
	}
	// The tracee's own view: inject write(pipe) of the region and compare.
	if err := p.ReadMem(0x10, got[:1]); err == nil {
		t.Error("ReadMem of an unmapped address succeeded")
	}
	if _, err := p.Syscall(0, unix.SYS_MUNMAP, addr+1, 4096); errnoOf(err) != unix.EINVAL {
		t.Errorf("munmap of an unaligned address: %v, want EINVAL", err)
	}
	if _, err := p.Syscall(0, unix.SYS_MUNMAP, addr, size); err != nil {
		t.Fatal(err)
	}
	if maps := takeSnapshot(t, tg.pid).maps; mapsCover(maps, uint64(addr), 1, "") {
		t.Fatalf("maps still have %#x after munmap:\n%s", addr, maps)
	}

	// The vDSO fallback, and bad instruction addresses (unmapped, not a
	// syscall, not executable): refused before any fault.
	insn, err := p.FindSyscallInsn()
	if err != nil {
		t.Fatal(err)
	}
	if maps := takeSnapshot(t, tg.pid).maps; !mapsCoverNamed(maps, insn, 2, "[vdso]") {
		t.Fatalf("syscall insn %#x not in [vdso]:\n%s", insn, maps)
	}
	code := make([]byte, 2)
	if err := p.ReadMem(insn, code); err != nil || code[0] != 0x0f || code[1] != 0x05 {
		t.Fatalf("bytes at %#x: %x, %v", insn, code, err)
	}
	if got, err := p.Syscall(0, unix.SYS_GETPID); err != nil || int(got) != tg.pid {
		t.Fatalf("getpid through the vdso: %d, %v", got, err)
	}
	scratch, err := p.Scratch()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WriteMem(scratch, []byte{0x0f, 0x05}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []uint64{0x1000, insn + 1, scratch} {
		p.SetSyscallInsn(bad)
		if _, err := p.Syscall(0, unix.SYS_GETPID); !errors.Is(err, ErrNoSyscallInsn) {
			t.Fatalf("syscall at %#x: %v, want ErrNoSyscallInsn", bad, err)
		}
	}
	p.SetSyscallInsn(insn)
	if got, err := p.Syscall(0, unix.SYS_GETPID); err != nil || int(got) != tg.pid {
		t.Fatalf("getpid after a fault: %d, %v", got, err)
	}
	if err := p.Detach(); err != nil {
		t.Fatal(err)
	}
	before.unchanged(t, tg.pid)
	if got := tg.ask(t, "quit"); got != "bye" {
		t.Fatalf("target said %q", got)
	}
	if err := tg.cmd.Wait(); err != nil {
		t.Fatalf("target exit: %v", err)
	}
}

// TestScratch creates the scratch mapping at a chosen address, checks that
// it is reported and usable, and that Detach removes it.
func TestScratch(t *testing.T) {
	needTarget(t)
	checkFdLeak(t)
	tg := startTarget(t, "cmd", nil)
	before := takeSnapshot(t, tg.pid)
	p := seizeT(t, tg.pid, Options{})
	if _, _, ok := p.ScratchRange(); ok {
		t.Fatal("scratch reported before it was made")
	}
	const hint = 0x6f0000000000
	p.SetScratchHint(hint)
	addr, err := p.Scratch()
	if err != nil {
		t.Fatal(err)
	}
	start, end, ok := p.ScratchRange()
	if addr != hint || start != hint || end != hint+ScratchSize+codePage || !ok {
		t.Fatalf("scratch %#x, range %#x-%#x %v; want %#x", addr, start, end, ok, hint)
	}
	if maps := takeSnapshot(t, tg.pid).maps; !strings.Contains(maps, fmt.Sprintf("%x-%x rw-p", start, end)) {
		t.Fatalf("maps lack scratch:\n%s", maps)
	}
	msg := []byte("scratch round trip")
	if err := p.WriteScratch(ScratchUserSize-uint64(len(msg)), msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if err := p.ReadScratch(ScratchUserSize-uint64(len(msg)), got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("read scratch: %q, %v", got, err)
	}
	// The tracee sees the same bytes: write(2) them to a pipe of ours.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	fds, err := p.InstallFds([]*os.File{pw})
	pw.Close()
	if err != nil {
		t.Fatal(err)
	}
	n, err := p.Syscall(0, unix.SYS_WRITE, uintptr(fds[0]), uintptr(addr+ScratchUserSize)-uintptr(len(msg)), uintptr(len(msg)))
	if err != nil || int(n) != len(msg) {
		t.Fatalf("write from tracee: %d, %v", n, err)
	}
	if _, err := p.Syscall(0, unix.SYS_CLOSE, uintptr(fds[0])); err != nil {
		t.Fatal(err)
	}
	got2 := make([]byte, len(msg))
	if _, err := pr.Read(got2); err != nil || !bytes.Equal(got2, msg) {
		t.Fatalf("pipe got %q, %v", got2, err)
	}
	if err := p.WriteScratch(ScratchSize-1, []byte{1, 2}); err == nil {
		t.Error("WriteScratch past the end succeeded")
	}
	if err := p.Detach(); err != nil {
		t.Fatal(err)
	}
	before.unchanged(t, tg.pid)
	waitFor(t, "tracer goroutine to end", func() bool { return !tracerRunning() })
}

// TestGetFd takes the write end of a pipe out of the target, writes through
// it, and the target reads the bytes from the read end.
func TestGetFd(t *testing.T) {
	needTarget(t)
	checkFdLeak(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	tg := startTarget(t, "cmd", func(c *exec.Cmd) { c.ExtraFiles = []*os.File{r, w} })
	r.Close()
	w.Close()
	before := takeSnapshot(t, tg.pid)
	p := seizeT(t, tg.pid, Options{})
	f, err := p.GetFd(4)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte("through-getfd")); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := p.GetFd(99); !errors.Is(err, unix.EBADF) {
		t.Errorf("GetFd of a closed fd: %v, want EBADF", err)
	}
	if err := p.Detach(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.GetFd(4); !errors.Is(err, ErrClosed) {
		t.Errorf("GetFd after detach: %v, want ErrClosed", err)
	}
	before.unchanged(t, tg.pid)
	if got := tg.ask(t, "readfd 3"); got != "data:through-getfd" {
		t.Fatalf("target read %q", got)
	}
}

// TestInstallFds gives the target fds of ours (one, then 300 in two
// messages), has it read from one by injection, and checks the numbers
// refer to our files and are close-on-exec.
func TestInstallFds(t *testing.T) {
	needTarget(t)
	checkFdLeak(t)
	tg := startTarget(t, "cmd", nil)
	before := takeSnapshot(t, tg.pid)
	p := seizeT(t, tg.pid, Options{})
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	payload := []byte("payload through an installed fd")
	if _, err := pw.Write(payload); err != nil {
		t.Fatal(err)
	}
	fds, err := p.InstallFds([]*os.File{pr})
	if err != nil {
		t.Fatal(err)
	}
	if len(fds) != 1 {
		t.Fatalf("got %d fds", len(fds))
	}
	ourLink, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", pr.Fd()))
	if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", tg.pid, fds[0])); l != ourLink {
		t.Errorf("target fd %d is %q, want %q", fds[0], l, ourLink)
	}
	if fl := statusField(t, fmt.Sprintf("/proc/%d/fdinfo/%d", tg.pid, fds[0]), "flags"); !isCloexec(fl) {
		t.Errorf("installed fd flags %s: not close-on-exec", fl)
	}
	scratch, err := p.Scratch()
	if err != nil {
		t.Fatal(err)
	}
	n, err := p.Syscall(0, unix.SYS_READ, uintptr(fds[0]), uintptr(scratch), 200)
	if err != nil || int(n) != len(payload) {
		t.Fatalf("injected read: %d, %v", n, err)
	}
	got := make([]byte, n)
	if err := p.ReadScratch(0, got); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("tracee read %q, %v", got, err)
	}
	if _, err := p.Syscall(0, unix.SYS_CLOSE, uintptr(fds[0])); err != nil {
		t.Fatal(err)
	}

	many := make([]*os.File, 300)
	for i := range many {
		many[i] = pw
	}
	mfds, err := p.InstallFds(many)
	if err != nil {
		t.Fatal(err)
	}
	if len(mfds) != 300 {
		t.Fatalf("installed %d of 300", len(mfds))
	}
	wLink, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", pw.Fd()))
	seen := map[int]bool{}
	for _, fd := range mfds {
		if seen[fd] {
			t.Fatalf("fd %d installed twice", fd)
		}
		seen[fd] = true
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", tg.pid, fd)); l != wLink {
			t.Fatalf("target fd %d is %q, want %q", fd, l, wLink)
		}
	}
	for _, fd := range mfds {
		if _, err := p.Syscall(0, unix.SYS_CLOSE, uintptr(fd)); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Detach(); err != nil {
		t.Fatal(err)
	}
	before.unchanged(t, tg.pid)
}

func isCloexec(octalFlags string) bool {
	v, err := strconv.ParseUint(octalFlags, 8, 64)
	return err == nil && v&unix.O_CLOEXEC != 0
}

// TestNewUffd makes a userfaultfd for targets that may not make one
// themselves (unprivileged; seccomp), checks what it is, and that it acts on
// the target's address space: UFFDIO_COPY into a range mapped only there
// shows up in the target's memory.
func TestNewUffd(t *testing.T) {
	for _, c := range []struct {
		name   string
		mode   string
		opts   Options
		wantOK bool
	}{
		{"unprivileged", "cmd", Options{SuspendSeccomp: true}, true},
		{"unprivileged-no-suspend", "cmd", Options{}, true},
		{"seccomp-suspended", "seccomp", Options{SuspendSeccomp: true}, true},
		{"seccomp-not-suspended", "seccomp", Options{}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			needTarget(t)
			checkFdLeak(t)
			tg := startTarget(t, c.mode, unprivileged)
			if uid := statusField(t, fmt.Sprintf("/proc/%d/status", tg.pid), "Uid"); !strings.HasPrefix(uid, "65534") {
				t.Fatalf("target uid %s", uid)
			}
			before := takeSnapshot(t, tg.pid)
			p := seizeT(t, tg.pid, c.opts)
			if _, err := p.Syscall(0, unix.SYS_USERFAULTFD, unix.O_CLOEXEC); errnoOf(err) != unix.EPERM {
				t.Fatalf("precondition: injected userfaultfd: %v, want EPERM", err)
			}
			uffd, err := p.NewUffd(unix.O_CLOEXEC | unix.O_NONBLOCK)
			if !c.wantOK {
				if err == nil {
					uffd.Close()
					t.Fatal("NewUffd succeeded under a seccomp filter that was not suspended")
				}
				t.Logf("expected error: %v", err)
				if err := p.Detach(); err != nil {
					t.Fatal(err)
				}
				before.unchanged(t, tg.pid)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer uffd.Close()
			link, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", uffd.Fd()))
			if link != "anon_inode:[userfaultfd]" {
				t.Fatalf("uffd is %q", link)
			}
			info, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", uffd.Fd()))
			if err != nil || !bytes.Contains(info, []byte("pending:")) || !bytes.Contains(info, []byte("API:")) {
				t.Fatalf("fdinfo %q, %v", info, err)
			}
			checkUffdActsOnTarget(t, p, uffd)
			uffd.Close()
			if err := p.Detach(); err != nil {
				t.Fatal(err)
			}
			before.unchanged(t, tg.pid)
			if got := tg.ask(t, "quit"); got != "bye" {
				t.Fatalf("target said %q", got)
			}
		})
	}
}

// checkUffdActsOnTarget maps a page range in the target only, registers it
// with uffd, fills a page with UFFDIO_COPY and reads it back from the
// target.
func checkUffdActsOnTarget(t *testing.T, p *Process, uffd *os.File) {
	t.Helper()
	const addr, size = 0x6e0000000000, 4 * 4096
	if _, err := p.Syscall(0, unix.SYS_MMAP, addr, size, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_FIXED_NOREPLACE, ^uintptr(0), 0); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if _, err := p.Syscall(0, unix.SYS_MUNMAP, addr, size); err != nil {
			t.Error(err)
		}
	}()
	if mappedHere(addr) {
		t.Fatalf("%#x is mapped in the test process too", addr)
	}
	if err := uffdAPI(uffd); err != nil {
		t.Fatal(err)
	}
	if err := uffdRegister(uffd, addr, size); err != nil {
		t.Fatalf("UFFDIO_REGISTER on a target-only range: %v", err)
	}
	page := make([]byte, 4096)
	rand.Read(page)
	if err := uffdCopy(uffd, addr+4096, page); err != nil {
		t.Fatalf("UFFDIO_COPY: %v", err)
	}
	got := make([]byte, 4096)
	if err := p.ReadMem(addr+4096, got); err != nil || !bytes.Equal(got, page) {
		t.Fatalf("target memory after UFFDIO_COPY differs (%v)", err)
	}
}

// TestSeizeNonexistent: an error wrapping ErrTraceeGone, no fd and no
// goroutine left behind.
func TestSeizeNonexistent(t *testing.T) {
	needTarget(t)
	checkFdLeak(t)
	cmd := exec.Command(targetBin, "quitnow")
	cmd.Stdin = strings.NewReader("quit\n")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	_, err := Seize(cmd.Process.Pid, Options{})
	if !errors.Is(err, ErrTraceeGone) || !errors.Is(err, unix.ESRCH) {
		t.Fatalf("seize of an exited pid: %v, want ErrTraceeGone and ESRCH", err)
	}
	if _, err := Seize(-1, Options{}); err == nil {
		t.Fatal("seize -1 succeeded")
	}
	waitFor(t, "tracer goroutine to end", func() bool { return !tracerRunning() })
	// A thread id is not a process.
	tg := startTarget(t, "threads", nil)
	if _, err := Seize(tg.tid, Options{}); err == nil {
		t.Fatal("seize of a non-leader thread succeeded")
	}
	// Seizing a traced process fails and leaves the first tracer intact.
	p := seizeT(t, tg.pid, Options{})
	if _, err := Seize(tg.pid, Options{}); !errors.Is(err, unix.EPERM) {
		t.Fatalf("second seize: %v, want EPERM", err)
	}
	if got, err := p.Syscall(0, unix.SYS_GETPID); err != nil || int(got) != tg.pid {
		t.Fatalf("first tracer after a failed second seize: %d, %v", got, err)
	}
}

// TestStoppedTarget: a group-stopped process stays stopped after Detach and
// runs on SIGCONT.
func TestStoppedTarget(t *testing.T) {
	needTarget(t)
	checkFdLeak(t)
	tg := startTarget(t, "cmd", nil)
	if err := unix.Kill(tg.pid, unix.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "group stop", func() bool { return procState(tg.pid) == 'T' })
	p := seizeT(t, tg.pid, Options{})
	for i := 0; i < 3; i++ {
		if got, err := p.Syscall(0, unix.SYS_GETPID); err != nil || int(got) != tg.pid {
			t.Fatalf("getpid: %d, %v", got, err)
		}
	}
	// Queue a command: if the target ran after Detach, it would answer and
	// exit instead of settling back into its group stop.
	if _, err := tg.stdin.Write([]byte("quit\n")); err != nil {
		t.Fatal(err)
	}
	if err := p.Detach(); err != nil {
		t.Fatal(err)
	}
	// Detach re-enters the group stop through a wake-up, so the state is R
	// for a moment.
	waitFor(t, "group stop after detach", func() bool { return procState(tg.pid) == 'T' })
	select {
	case l := <-tg.lines:
		t.Fatalf("stopped target answered %q after detach", l)
	default:
	}
	if err := unix.Kill(tg.pid, unix.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if got := tg.line(t); got != "bye" {
		t.Fatalf("target said %q", got)
	}
}

// TestSigIgnTrap: injection into a process that ignores SIGTRAP keeps it
// ignored (single-stepping would reset it), with automatic and explicit
// SyscallStops, and also when SIGTRAP is ignored by an injected
// rt_sigaction.
func TestSigIgnTrap(t *testing.T) {
	needTarget(t)
	checkFdLeak(t)
	tg := startTarget(t, "sigign", nil)
	status := fmt.Sprintf("/proc/%d/status", tg.pid)
	want := statusField(t, status, "SigIgn")
	p := seizeT(t, tg.pid, Options{})
	for i := 0; i < 3; i++ {
		if _, err := p.Syscall(0, unix.SYS_GETPID); err != nil {
			t.Fatal(err)
		}
	}
	if got := statusField(t, status, "SigIgn"); got != want {
		t.Fatalf("SigIgn %s, want %s", got, want)
	}
	if err := p.Detach(); err != nil {
		t.Fatal(err)
	}
	if got := statusField(t, status, "SigIgn"); got != want {
		t.Fatalf("after detach SigIgn %s, want %s", got, want)
	}

	// Un-ignore by injection, single-step, then ignore again by injection.
	p = seizeT(t, tg.pid, Options{})
	scratch, err := p.Scratch()
	if err != nil {
		t.Fatal(err)
	}
	act := make([]byte, 32) // struct kernel_sigaction: handler, flags, restorer, mask
	if err := p.WriteMem(scratch, act); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Syscall(0, unix.SYS_RT_SIGACTION, uintptr(unix.SIGTRAP), uintptr(scratch), 0, 8); err != nil {
		t.Fatal(err)
	}
	act[0] = 1 // SIG_IGN
	if err := p.WriteMem(scratch, act); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Syscall(0, unix.SYS_RT_SIGACTION, uintptr(unix.SIGTRAP), uintptr(scratch), 0, 8); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if _, err := p.Syscall(0, unix.SYS_GETPID); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Detach(); err != nil {
		t.Fatal(err)
	}
	if got := statusField(t, status, "SigIgn"); got != want {
		t.Fatalf("after re-ignoring by injection SigIgn %s, want %s", got, want)
	}
	if got := tg.ask(t, "quit"); got != "bye" {
		t.Fatalf("target said %q", got)
	}
}

// TestThreadState reads rseq, the signal mask, xstate and pending signals,
// and checks that injection neither changes the mask nor consumes a pending
// signal.
func TestThreadState(t *testing.T) {
	needTarget(t)
	checkFdLeak(t)
	tg := startTarget(t, "init", nil) // blocks SIGCHLD
	status := fmt.Sprintf("/proc/%d/status", tg.pid)
	waitFor(t, "target in rt_sigsuspend", func() bool { return inSyscall(tg.pid, tg.pid, unix.SYS_RT_SIGSUSPEND) })
	blk := statusField(t, status, "SigBlk") // the temporary mask of sigsuspend
	p := seizeT(t, tg.pid, Options{})
	st, _ := stateOf(t, p, 0)
	rs := st.Rseq
	if rs.Addr == 0 || rs.Len < 32 || rs.Sig != 0x53053053 {
		t.Errorf("rseq %+v: want glibc's registration", rs)
	}
	if m := st.SigMask; m != sigBit(unix.SIGCHLD) {
		t.Errorf("sigmask %#x, want SIGCHLD only", m)
	}
	// Pending: a thread-directed SIGWINCH (default: ignore) and a
	// process-directed SIGCHLD (blocked).
	if err := unix.Tgkill(tg.pid, tg.pid, unix.SIGWINCH); err != nil {
		t.Fatal(err)
	}
	if err := unix.Kill(tg.pid, unix.SIGCHLD); err != nil {
		t.Fatal(err)
	}
	st, _ = stateOf(t, p, 0)
	xs := st.XState
	if len(xs) < 576 {
		t.Fatalf("xstate %d bytes", len(xs))
	}
	if err := p.SetXState(0, xs); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Syscall(0, unix.SYS_GETPID); err != nil {
		t.Fatal(err)
	}
	st, shared := stateOf(t, p, 0)
	if !bytes.Equal(xs, st.XState) {
		t.Errorf("xstate changed by injection")
	}
	own := st.Pending
	if len(own) != 1 || own[0].Signo != int32(unix.SIGWINCH) || own[0].Code != -6 /* SI_TKILL */ {
		t.Errorf("thread pending %+v, want SIGWINCH from tgkill", own)
	}
	if len(shared) != 1 || shared[0].Signo != int32(unix.SIGCHLD) {
		t.Errorf("shared pending %+v, want SIGCHLD", shared)
	}
	if err := p.Detach(); err != nil {
		t.Fatal(err)
	}
	// The restarted sigsuspend delivers the SIGCHLD (the target finds no
	// child) and the target goes back to sigsuspend, with the same
	// temporary mask.
	waitFor(t, "target back in rt_sigsuspend", func() bool { return inSyscall(tg.pid, tg.pid, unix.SYS_RT_SIGSUSPEND) })
	if got := statusField(t, status, "SigBlk"); got != blk {
		t.Errorf("SigBlk after detach %s, want %s", got, blk)
	}
	if got := statusField(t, status, "SigPnd") + statusField(t, status, "ShdPnd"); got != strings.Repeat("0", 32) {
		t.Errorf("signals still pending after detach: %s", got)
	}
}

// TestKill kills a seized multi-threaded target.
func TestKill(t *testing.T) {
	needTarget(t)
	checkFdLeak(t)
	tg := startTarget(t, "threads", nil)
	p, err := Seize(tg.pid, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Syscall(0, unix.SYS_GETPID); err != nil {
		t.Fatal(err)
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	err = tg.cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("target wait: %v, want killed by SIGKILL", err)
	}
	if err := p.Detach(); !errors.Is(err, ErrClosed) {
		t.Fatalf("detach after kill: %v, want ErrClosed", err)
	}
}

// TestTraceeKilledWhileAttached: Detach reports ErrTraceeGone and cleans up.
func TestTraceeKilledWhileAttached(t *testing.T) {
	needTarget(t)
	checkFdLeak(t)
	tg := startTarget(t, "threads", nil)
	p, err := Seize(tg.pid, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Scratch(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Kill(tg.pid, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Syscall(0, unix.SYS_GETPID); !errors.Is(err, ErrTraceeGone) {
		t.Errorf("syscall in a killed tracee: %v, want ErrTraceeGone", err)
	}
	if err := p.Detach(); !errors.Is(err, ErrTraceeGone) {
		t.Errorf("detach of a killed tracee: %v, want ErrTraceeGone", err)
	}
}

// mapsCover reports whether one line of maps covers [addr, addr+size) with
// the given permissions ("" for any).
func mapsCover(maps string, addr, size uint64, perms string) bool {
	for _, l := range strings.Split(maps, "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		lo, hi, _ := strings.Cut(f[0], "-")
		a, err1 := strconv.ParseUint(lo, 16, 64)
		b, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 == nil && err2 == nil && a <= addr && addr+size <= b && (perms == "" || f[1] == perms) {
			return true
		}
	}
	return false
}

// mapsCoverNamed is mapsCover for a mapping with the given name.
func mapsCoverNamed(maps string, addr, size uint64, name string) bool {
	for _, l := range strings.Split(maps, "\n") {
		f := strings.Fields(l)
		if len(f) == 6 && f[5] == name && mapsCover(l, addr, size, "") {
			return true
		}
	}
	return false
}

// TestSeizeChurn seizes a process whose threads keep creating threads:
// every thread that exists once Seize returns is attached and stopped.
func TestSeizeChurn(t *testing.T) {
	needTarget(t)
	checkFdLeak(t)
	tg := startTarget(t, "churn", nil) // its maps change all the time
	for i := 0; i < 20; i++ {
		p := seizeT(t, tg.pid, Options{})
		tids := p.Threads()
		all, err := listTasks(tg.pid)
		if err != nil {
			t.Fatal(err)
		}
		// A thread that was exiting while we seized is skipped; it may
		// linger in /proc for a moment as a zombie.
		var tasks []int
		for _, tid := range all {
			if !threadExited(tg.pid, tid) {
				tasks = append(tasks, tid)
			}
		}
		slices.Sort(tids)
		if !slices.Equal(tids, tasks) {
			t.Fatalf("round %d: attached %v, /proc has %v", i, tids, tasks)
		}
		for _, tid := range tids {
			if s := procState(tid); s != 't' {
				t.Errorf("round %d: thread %d state %c, want t", i, tid, s)
			}
			if got, err := p.Syscall(tid, unix.SYS_GETTID); err != nil || int(got) != tid {
				t.Fatalf("round %d: gettid in %d: %d, %v", i, tid, got, err)
			}
		}
		if err := p.Detach(); err != nil {
			t.Fatal(err)
		}
	}
	if got := tg.ask(t, "quit"); got != "bye" {
		t.Fatalf("target said %q", got)
	}
}
