// Package inject attaches to a running process with ptrace, runs system
// calls inside it, moves file descriptors in and out of it, reads and writes
// its registers and memory, and leaves it exactly as it found it.
//
// # Lifecycle
//
// Seize attaches to every thread (PTRACE_SEIZE, PTRACE_INTERRUPT) and saves
// each thread's registers and signal mask. Syscall and the helpers built on
// it (Scratch, InstallFds, NewUffd, CloneThread, CloneProcess) change the
// tracee; Detach is the only way out: it unmaps the scratch mapping, puts
// back every thread's saved registers and signal mask, and detaches. Kill is
// the other exit, for a tracee that must not run again.
//
// # Threading
//
// The kernel accepts ptrace requests only from the tracer thread. Each
// Process is served by a tracer (tracer.go): one goroutine locked to one OS
// thread that performs every ptrace and waitpid call. Exported methods send
// a closure to it and wait. Children created by CloneProcess share their
// parent's tracer, because the kernel makes the parent's tracer thread their
// tracer. Fields marked "tracer-owned" are read and written only on that
// goroutine, so they need no lock. ReadMem, WriteMem and GetFd do not use
// ptrace and run on the caller's goroutine. Each request costs two hand-offs
// between OS threads; Batch runs a sequence of injections in one.
//
// No thread of the calling process may wait(2) for a tracee it is the parent
// of while the tracee is attached (os/exec's Cmd.Wait, a reaper calling
// wait4(-1)): when the tracer and the real parent are one process, the
// kernel reports ptrace stops to any waiter, even without WUNTRACED
// (kernel/exit.c:wait_consider_task), and the stop this package waits for is
// consumed.
//
// # How a syscall is injected
//
// The thread's registers are set to the syscall (rip at a `syscall`
// instruction already present in the tracee, rax = number, orig_rax = -1 so
// that the kernel's restart logic leaves it alone) and the thread is stepped
// over that one instruction: by PTRACE_SINGLESTEP (one stop, the default), or
// by two PTRACE_SYSCALL stops when single-stepping would change the tracee
// (a single-step trap is a forced SIGTRAP, and the kernel resets an ignored
// SIGTRAP to SIG_DFL when it forces one: kernel/signal.c:force_sig_info_to_task).
// During injection every signal the kernel lets us block is blocked in the
// thread (except SIGTRAP in single-step mode, for the same reason), so no
// handler runs and no signal is consumed; the thread's own mask is put back
// at Detach. A stop that the kernel reports before the instruction ran (a
// PTRACE_INTERRUPT left pending by Seize, a group stop) is retried.
//
// At Detach every thread must be stopped inside get_signal (a "parked"
// thread), because that is where the kernel restarts a syscall that
// PTRACE_INTERRUPT interrupted (rax = -ERESTARTSYS and friends, orig_rax =
// the syscall) and puts back a temporary signal mask (ppoll, sigsuspend):
// arch/x86/kernel/signal.c:arch_do_signal_or_restart. Interrupt stops and
// single-step traps are inside get_signal; a PTRACE_SYSCALL exit stop and a
// clone event stop are not, so such a thread is parked again
// (PTRACE_INTERRUPT + PTRACE_CONT) before its saved registers are put back
// and it is detached.
package inject

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Errors returned by this package, for errors.Is.
var (
	// ErrTraceeGone: the process or thread no longer exists (ESRCH, or it
	// exited or was killed while attached).
	ErrTraceeGone = errors.New("tracee gone")
	// ErrNoSyscallInsn: no `syscall` instruction was found in the tracee
	// (neither at rip-2 of a thread nor in its [vdso]).
	ErrNoSyscallInsn = errors.New("no syscall instruction in tracee")
	// ErrNotStopped: the thread is not a ptrace-stopped thread of this
	// Process (unknown tid, or the thread is gone).
	ErrNotStopped = errors.New("thread not stopped by this tracer")
	// ErrClosed: the Process was detached or killed.
	ErrClosed = errors.New("process detached")
)

// Options select the ptrace options used by Seize.
type Options struct {
	// SuspendSeccomp sets PTRACE_O_SUSPEND_SECCOMP, so that injected
	// syscalls bypass the tracee's seccomp filters. The tracer needs
	// CAP_SYS_ADMIN and must not be under seccomp itself.
	SuspendSeccomp bool
	// TraceClone sets PTRACE_O_TRACECLONE|TRACEFORK|TRACEVFORK, needed by
	// CloneThread and CloneProcess (restore).
	TraceClone bool
	// ExitKill sets PTRACE_O_EXITKILL: if the tracer dies while attached,
	// the kernel kills the tracee instead of detaching it in whatever state
	// an injection left it.
	ExitKill bool
	// SyscallStops injects with two PTRACE_SYSCALL stops instead of
	// PTRACE_SINGLESTEP. It is chosen automatically when the tracee ignores
	// SIGTRAP, or when an injected rt_sigaction changes SIGTRAP.
	SyscallStops bool
}

func (o Options) ptraceOptions(withClone bool) int {
	opts := unix.PTRACE_O_TRACESYSGOOD
	if o.SuspendSeccomp {
		opts |= unix.PTRACE_O_SUSPEND_SECCOMP
	}
	if o.ExitKill {
		opts |= unix.PTRACE_O_EXITKILL
	}
	if withClone && o.TraceClone {
		opts |= unix.PTRACE_O_TRACECLONE | unix.PTRACE_O_TRACEFORK | unix.PTRACE_O_TRACEVFORK
	}
	return opts
}

// thread is one ptrace-stopped thread. Tracer-owned.
type thread struct {
	tid int
	// saved are the registers Detach puts back: as found, unless
	// SetSavedRegs changed them.
	saved unix.PtraceRegs
	// mask is the signal mask Detach puts back: as found, unless
	// SetSigMask changed it.
	mask uint64
	// maskSet: the thread's blocked mask may differ from mask; injMask is
	// the injection mask put on it (0: none, see blockSignals).
	maskSet bool
	injMask uint64
	// regsSet: the thread's registers may differ from saved.
	regsSet bool
	// parked: the thread is stopped inside get_signal (see package doc).
	parked bool
	// gone: the thread is no longer usable: it died, or was detached
	// (detached). reaped: wait4 collected its exit, which releases a dead
	// tracee's ptrace link (until then it stays a zombie traced by us).
	gone, detached, reaped bool
}

// Process is a ptrace-attached, stopped process.
type Process struct {
	pid int
	// nsPid is a child's pid in its parent's namespace, from clone3 (0:
	// a seized process).
	nsPid int
	t     *tracer
	// mem is /proc/pid/mem, pidfd a pidfd of pid; both are closed by
	// Detach and Kill. os.File makes concurrent use with Close safe.
	mem   *os.File
	pidfd *os.File
	// released is set (before mem and pidfd are closed) when p is closed,
	// so that ReadMem, WriteMem and GetFd can report ErrClosed.
	released atomic.Bool

	// Tracer-owned.
	opts    Options
	threads []*thread // leader first
	closed  bool
	// insn is the address of a `syscall` instruction (0: not found yet);
	// insnChecked: it was verified (see syscallInsn).
	insn        uint64
	insnChecked bool
	// scratch is the injected scratch mapping [scratch, scratch+scratchLen)
	// (0: none); scratchHint the address to create it at (0: anywhere).
	scratch, scratchLen, scratchHint uint64
	// codeReady is set once the page after the scratch area holds the
	// call loop and is executable.
	codeReady bool
	// xstateSize is the size of NT_X86_XSTATE (0: not queried yet).
	xstateSize int
}

// Seize attaches to every thread of pid, interrupts each and waits until all
// are in a ptrace stop, then saves their registers and signal masks. Threads
// created while seizing are found by re-reading /proc/pid/task until the set
// is stable. On error it detaches whatever it attached.
func Seize(pid int, o Options) (*Process, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("seize %d: %w", pid, unix.EINVAL)
	}
	t := newTracer()
	var p *Process
	err := t.run(func() error {
		var err error
		p, err = seize(t, pid, o)
		if err == nil {
			t.users++
		}
		return err
	})
	if err != nil {
		t.wait()
		return nil, err
	}
	return p, nil
}

// Pid returns the process id (as seen from the tracer's pid namespace).
func (p *Process) Pid() int { return p.pid }

// Threads returns the ids of the attached threads, leader first. It returns
// nil once the Process is closed.
func (p *Process) Threads() []int {
	var tids []int
	_ = p.do(func() error {
		for _, th := range p.threads {
			if !th.gone {
				tids = append(tids, th.tid)
			}
		}
		return nil
	})
	return tids
}

// Detach unmaps the scratch mapping (if one was created), puts every
// thread's saved registers and signal mask back, and detaches from every
// thread. The Process is closed afterwards, even when Detach fails. If the
// tracee is gone it returns an error wrapping ErrTraceeGone.
func (p *Process) Detach() error {
	var last bool
	err := p.do(func() error {
		err := p.detachLocked()
		last = p.t.users == 0
		return err
	})
	if last {
		p.t.wait()
	}
	return err
}

// Kill sends SIGKILL to the process and waits until every attached thread
// has exited, so no ptrace state is left. If the caller is the process's
// parent, the process is left as a zombie for the caller to wait for.
func (p *Process) Kill() error {
	var last bool
	err := p.do(func() error {
		err := p.killLocked()
		last = p.t.users == 0
		return err
	})
	if last {
		p.t.wait()
	}
	return err
}

// do runs f on the tracer thread, or returns ErrClosed if p is closed.
func (p *Process) do(f func() error) error {
	return p.t.run(func() error {
		if p.closed {
			return ErrClosed
		}
		return f()
	})
}

// thread returns the stopped thread tid (0: the leader).
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) thread(tid int) (*thread, error) {
	if tid == 0 {
		tid = p.pid
	}
	for _, th := range p.threads {
		if th.tid == tid {
			if th.gone {
				return nil, fmt.Errorf("thread %d: %w", tid, ErrTraceeGone)
			}
			return th, nil
		}
	}
	return nil, fmt.Errorf("thread %d of %d: %w", tid, p.pid, ErrNotStopped)
}

// anyThread returns the leader if it is alive, else any live thread.
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) anyThread() (*thread, error) {
	for _, th := range p.threads {
		if !th.gone {
			return th, nil
		}
	}
	return nil, fmt.Errorf("process %d: %w", p.pid, ErrTraceeGone)
}

// goneErr turns ESRCH (the tracee was killed under us) into ErrTraceeGone
// and marks th gone; other errors pass through.
func goneErr(th *thread, err error) error {
	if errors.Is(err, unix.ESRCH) {
		th.gone = true
		return fmt.Errorf("%w: %w", ErrTraceeGone, err)
	}
	return err
}

// detachLocked is Detach on the tracer goroutine.
func (p *Process) detachLocked() error {
	var errs []error
	if p.scratch != 0 {
		if err := p.unmapScratch(); err != nil {
			errs = append(errs, err)
		}
	}
	killed, released := false, 0
	for _, th := range p.threads {
		if th.gone {
			killed = true
			continue
		}
		err := p.detachThread(th)
		switch {
		case err == nil:
			released++
		case errors.Is(err, ErrTraceeGone):
			// After a thread was released, the others may be killed by
			// its exit_group or execve: that is the process running on,
			// not an error.
			if released == 0 {
				killed = true
			}
		default:
			errs = append(errs, fmt.Errorf("detach thread %d: %w", th.tid, err))
		}
	}
	errs = append(errs, p.reapDead())
	if killed {
		errs = append(errs, fmt.Errorf("detach %d: %w", p.pid, ErrTraceeGone))
	}
	errs = append(errs, p.closeLocked())
	return errors.Join(errs...)
}

// reapDead collects the exit of every thread that died while attached, so
// that none stays a zombie traced by us. Non-leader threads go first: the
// kernel reports the leader's exit only after every other thread has been
// released (kernel/exit.c:delay_group_leader). A leader whose real parent
// is this process is only waited for, not reaped, so its parent can still
// wait for it.
func (p *Process) reapDead() error {
	var errs []error
	parentIsUs := false
	if st, err := readStatus(p.pid); err == nil {
		parentIsUs = st.ppid == os.Getpid()
	}
	for _, th := range slices.Backward(p.threads) {
		if !th.gone || th.detached || th.reaped {
			continue
		}
		if th.tid == p.pid && parentIsUs {
			if err := waitExitedNoReap(th.tid); err != nil && err != unix.ECHILD {
				errs = append(errs, fmt.Errorf("wait %d: %w", th.tid, err))
			}
			th.gone, th.reaped = true, true
			continue
		}
		for {
			ws, err := wait4(th.tid, 0)
			if err != nil {
				if err != unix.ECHILD {
					errs = append(errs, fmt.Errorf("wait %d: %w", th.tid, err))
				}
				break
			}
			if ws.Exited() || ws.Signaled() {
				break
			}
			// A stop reported before the kill took effect: let it die.
			_ = ptraceRaw(unix.PTRACE_CONT, th.tid, 0, 0)
		}
		th.gone, th.reaped = true, true
	}
	return errors.Join(errs...)
}

// detachThread parks th inside get_signal if needed, puts its signal mask
// and registers back, and detaches it.
func (p *Process) detachThread(th *thread) error {
	if !th.parked {
		// Park with the injection registers still in place (orig_rax -1:
		// nothing to restart); the saved ones go on afterwards. Parking
		// with the saved ones would not do: leaving a clone event stop,
		// the syscall's return value overwrites rax.
		if err := p.park(th); err != nil {
			return err
		}
	}
	if th.maskSet {
		if err := ptraceSetSigMask(th.tid, th.mask); err != nil {
			return goneErr(th, fmt.Errorf("set sigmask: %w", err))
		}
		th.maskSet, th.injMask = false, 0
	}
	if th.regsSet {
		if err := ptraceSetRegs(th.tid, &th.saved); err != nil {
			return goneErr(th, fmt.Errorf("set regs: %w", err))
		}
		th.regsSet = false
	}
	if err := ptraceRaw(unix.PTRACE_DETACH, th.tid, 0, 0); err != nil {
		return goneErr(th, fmt.Errorf("ptrace detach: %w", err))
	}
	th.gone, th.detached = true, true
	return nil
}

// park moves a thread that is stopped outside get_signal (a PTRACE_SYSCALL
// exit stop) to an interrupt stop inside get_signal, without running user
// code: with JOBCTL_TRAP_STOP pending, get_signal traps before it dequeues
// any signal (kernel/signal.c:get_signal).
func (p *Process) park(th *thread) error {
	if err := ptraceRaw(unix.PTRACE_INTERRUPT, th.tid, 0, 0); err != nil {
		return goneErr(th, fmt.Errorf("park: interrupt: %w", err))
	}
	if err := ptraceRaw(unix.PTRACE_CONT, th.tid, 0, 0); err != nil {
		return goneErr(th, fmt.Errorf("park: cont: %w", err))
	}
	if err := p.waitInterruptStop(th); err != nil {
		return fmt.Errorf("park: %w", err)
	}
	return nil
}

// closeLocked releases the Process's fds and tells the tracer it has one
// user less.
func (p *Process) closeLocked() error {
	if p.closed {
		return nil
	}
	p.closed = true
	p.released.Store(true)
	p.t.users--
	return errors.Join(p.mem.Close(), p.pidfd.Close())
}

// killLocked is Kill on the tracer goroutine.
func (p *Process) killLocked() error {
	var errs []error
	if err := pidfdSendSignal(p.pidfd, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
		errs = append(errs, fmt.Errorf("kill %d: %w", p.pid, err))
	}
	for _, th := range p.threads {
		if !th.detached {
			th.gone = true
		}
	}
	errs = append(errs, p.reapDead(), p.closeLocked())
	return errors.Join(errs...)
}
