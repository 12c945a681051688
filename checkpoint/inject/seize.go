package inject

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"
)

const (
	// maxSeizeRounds bounds the re-reads of /proc/pid/task. Once every known
	// thread is stopped no new thread can appear, so a round only adds the
	// threads created by threads that were still running in the previous
	// one.
	maxSeizeRounds = 100
	// maxStopSignals bounds the signal-delivery stops passed on while
	// waiting for an interrupt stop. With JOBCTL_TRAP_STOP pending,
	// get_signal traps before dequeuing the next signal, so at most one is
	// expected.
	maxStopSignals = 64
)

// seize is Seize on the tracer goroutine.
func seize(t *tracer, pid int, o Options) (_ *Process, err error) {
	st, err := readStatus(pid)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
			return nil, fmt.Errorf("seize %d: %w: %w", pid, ErrTraceeGone, unix.ESRCH)
		}
		return nil, fmt.Errorf("seize %d: %w", pid, err)
	}
	if st.tgid != pid {
		return nil, fmt.Errorf("seize %d: thread of process %d, not a process: %w", pid, st.tgid, unix.EINVAL)
	}
	p := &Process{pid: pid, t: t, opts: o}
	if st.sigIgn&sigBit(unix.SIGTRAP) != 0 {
		// Single-stepping would reset the ignored SIGTRAP to SIG_DFL.
		p.opts.SyscallStops = true
	}
	pfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if err == unix.ESRCH {
			return nil, fmt.Errorf("seize %d: pidfd_open: %w: %w", pid, ErrTraceeGone, err)
		}
		return nil, fmt.Errorf("seize %d: pidfd_open: %w", pid, err)
	}
	p.pidfd = os.NewFile(uintptr(pfd), "pidfd:"+strconv.Itoa(pid))
	p.mem, err = os.OpenFile(fmt.Sprintf("/proc/%d/mem", pid), os.O_RDWR, 0)
	if err != nil {
		_ = p.pidfd.Close()
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("seize %d: open mem: %w: %w", pid, ErrTraceeGone, err)
		}
		return nil, fmt.Errorf("seize %d: open mem: %w", pid, err)
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, p.abortSeize())
		}
	}()
	if err := p.attachAll(); err != nil {
		return nil, err
	}
	leader := p.threads[0]
	if leader.tid != pid || leader.gone {
		return nil, fmt.Errorf("seize %d: leader not attached: %w", pid, ErrTraceeGone)
	}
	live := p.threads[:0]
	for _, th := range p.threads {
		if !th.gone {
			live = append(live, th)
		}
	}
	p.threads = live
	for _, th := range p.threads {
		if o.TraceClone {
			if err := ptraceRaw(unix.PTRACE_SETOPTIONS, th.tid, 0, uintptr(o.ptraceOptions(true))); err != nil {
				return nil, goneErr(th, fmt.Errorf("seize %d: set options of %d: %w", pid, th.tid, err))
			}
		}
		if err := ptraceGetRegsSet(th.tid, &th.saved); err != nil {
			return nil, goneErr(th, fmt.Errorf("seize %d: get regs of %d: %w", pid, th.tid, err))
		}
		if th.mask, err = ptraceGetSigMask(th.tid); err != nil {
			return nil, goneErr(th, fmt.Errorf("seize %d: get sigmask of %d: %w", pid, th.tid, err))
		}
	}
	return p, nil
}

// attachAll seizes and interrupts every thread of p.pid until no new
// thread appears, and waits for each to stop. p.threads holds, leader
// first, every thread it seized (some may be gone).
func (p *Process) attachAll() error {
	opts := uintptr(p.opts.ptraceOptions(false))
	known := map[int]bool{}
	for round := 0; ; round++ {
		if round == maxSeizeRounds {
			return fmt.Errorf("seize %d: thread set still changing after %d rounds", p.pid, round)
		}
		tids, err := listTasks(p.pid)
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("seize %d: %w: %w", p.pid, ErrTraceeGone, err)
			}
			return fmt.Errorf("seize %d: %w", p.pid, err)
		}
		var fresh []*thread
		for _, tid := range tids {
			if known[tid] {
				continue
			}
			known[tid] = true
			if err := ptraceRaw(unix.PTRACE_SEIZE, tid, 0, opts); err != nil {
				if tid != p.pid && (err == unix.ESRCH || (err == unix.EPERM && threadExited(p.pid, tid))) {
					// The thread exited after we listed it (ptrace_attach
					// gives EPERM for a task with exit_state set).
					continue
				}
				if err == unix.ESRCH {
					return fmt.Errorf("seize %d: %w: %w", p.pid, ErrTraceeGone, err)
				}
				return fmt.Errorf("seize thread %d of %d: %w", tid, p.pid, err)
			}
			th := &thread{tid: tid}
			if tid == p.pid {
				p.threads = slices.Insert(p.threads, 0, th)
			} else {
				p.threads = append(p.threads, th)
			}
			fresh = append(fresh, th)
			if err := ptraceRaw(unix.PTRACE_INTERRUPT, tid, 0, 0); err != nil && err != unix.ESRCH {
				return fmt.Errorf("interrupt thread %d of %d: %w", tid, p.pid, err)
			}
		}
		if len(fresh) == 0 {
			return nil
		}
		for _, th := range fresh {
			if err := p.waitInterruptStop(th); err != nil {
				if errors.Is(err, ErrTraceeGone) && th.tid != p.pid {
					continue // a thread that exited while we seized it
				}
				return err
			}
		}
	}
}

// waitInterruptStop waits until th reports a PTRACE_EVENT_STOP (an
// interrupt or group stop). A signal-delivery stop reported first is passed
// on (PTRACE_CONT with the signal), as the kernel would have delivered it
// without us; the pending interrupt then traps before any user code runs.
func (p *Process) waitInterruptStop(th *thread) error {
	for i := 0; ; i++ {
		ws, err := wait4(th.tid, 0)
		if err != nil {
			if err == unix.ECHILD {
				th.gone, th.reaped = true, true
				return fmt.Errorf("wait thread %d: %w: %w", th.tid, ErrTraceeGone, err)
			}
			return fmt.Errorf("wait thread %d: %w", th.tid, err)
		}
		if ws.Exited() || ws.Signaled() {
			th.gone, th.reaped = true, true
			return fmt.Errorf("thread %d exited (%#x): %w", th.tid, uint32(ws), ErrTraceeGone)
		}
		if !ws.Stopped() {
			continue
		}
		if stopEvent(ws) == unix.PTRACE_EVENT_STOP {
			th.parked = true
			return nil
		}
		if i == maxStopSignals {
			return fmt.Errorf("thread %d: no interrupt stop after %d signals", th.tid, i)
		}
		sig := 0
		if stopEvent(ws) == 0 {
			sig = int(ws.StopSignal())
		}
		if err := ptraceRaw(unix.PTRACE_CONT, th.tid, 0, uintptr(sig)); err != nil {
			return goneErr(th, fmt.Errorf("pass signal %d to thread %d: %w", sig, th.tid, err))
		}
	}
}

// abortSeize detaches every thread that attachAll seized and closes p's
// fds. Nothing was changed in the tracee yet, so a plain detach suffices.
func (p *Process) abortSeize() error {
	var errs []error
	for _, th := range p.threads {
		if th.gone {
			continue
		}
		if !th.parked {
			// Seized and interrupted but not waited for yet.
			if err := p.waitInterruptStop(th); err != nil {
				if !errors.Is(err, ErrTraceeGone) {
					errs = append(errs, err)
				}
				continue
			}
		}
		if err := ptraceRaw(unix.PTRACE_DETACH, th.tid, 0, 0); err != nil && err != unix.ESRCH {
			errs = append(errs, fmt.Errorf("detach thread %d: %w", th.tid, err))
		}
		th.gone, th.detached = true, true
	}
	errs = append(errs, p.reapDead())
	p.closed = true
	p.released.Store(true)
	errs = append(errs, p.mem.Close(), p.pidfd.Close())
	return errors.Join(errs...)
}

// stopEvent returns the PTRACE_EVENT_* of a ptrace stop (0 for a
// signal-delivery or syscall stop): status>>16 (see ptrace(2)).
func stopEvent(ws unix.WaitStatus) int {
	return int(uint32(ws)>>16) & 0xff
}

func sigBit(s unix.Signal) uint64 { return 1 << (uint(s) - 1) }
