package inject

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

const (
	// maxStepRetries bounds the stops reported before the injected
	// instruction runs (pending interrupt, group stop, stray SIGTRAP).
	maxStepRetries = 16
	// maxRestarts bounds the re-runs of an injected syscall that returned
	// -ERESTART*: the kernel would have restarted it too.
	maxRestarts = 16
	// ScratchSize is the size of the scratch mapping.
	ScratchSize = 1 << 20
	// ScratchUserSize is the part of the scratch mapping, from its start,
	// that belongs to the caller. The rest (16 KiB) is used by InstallFds,
	// NewUffd, CloneThread and CloneProcess as temporary space.
	ScratchUserSize = ScratchSize - 16<<10

	// Kernel-internal errnos a syscall returns when it must be restarted
	// (include/linux/errno.h). Userspace sees them only in a stopped thread.
	errRestartSys         = 512
	errRestartNoIntr      = 513
	errRestartNoHand      = 514
	errRestartRestartBlck = 516
)

// Syscall runs syscall nr with up to six arguments in thread tid (0: the
// leader) and returns its raw return value. A return value in
// [-4095, -1] is also returned as an error wrapping the unix.Errno. The
// thread's registers are put back to the saved ones at Detach, and the
// thread never runs its own code in between.
//
// While a thread is being injected into, its signal mask blocks every
// signal (except SIGTRAP when single-stepping); use SigMask/SetSigMask, not
// an injected rt_sigprocmask, to read or set the mask the thread will have
// after Detach. With Options.TraceClone, clone, fork, vfork and clone3 are
// refused: use CloneThread and CloneProcess.
func (p *Process) Syscall(tid int, nr uintptr, args ...uintptr) (uintptr, error) {
	var ret uintptr
	err := p.do(func() error {
		var err error
		ret, err = p.syscallTid(tid, nr, args)
		return err
	})
	return ret, err
}

// Batch runs f on the tracer thread, with b to inject syscalls and access
// memory. A request to the tracer thread costs two hand-offs between OS
// threads, more than an injected syscall itself on a small machine; a loop
// of injections inside one Batch does not pay them each time. f must use b,
// not p's methods: those wait for the tracer thread, which is running f.
// b is valid only until f returns.
func (p *Process) Batch(f func(b *Batch) error) error {
	return p.do(func() error {
		b := &Batch{p: p}
		defer func() { b.p = nil }()
		return f(b)
	})
}

// Batch gives access to a Process from inside Process.Batch.
type Batch struct {
	p *Process
}

// Syscall is Process.Syscall.
func (b *Batch) Syscall(tid int, nr uintptr, args ...uintptr) (uintptr, error) {
	if b.p == nil {
		return 0, ErrClosed
	}
	return b.p.syscallTid(tid, nr, args)
}

// Scratch is Process.Scratch.
func (b *Batch) Scratch() (uint64, error) {
	if b.p == nil {
		return 0, ErrClosed
	}
	return b.p.scratchAddr()
}

// ReadMem is Process.ReadMem.
func (b *Batch) ReadMem(addr uint64, buf []byte) error {
	if b.p == nil {
		return ErrClosed
	}
	return b.p.ReadMem(addr, buf)
}

// WriteMem is Process.WriteMem.
func (b *Batch) WriteMem(addr uint64, buf []byte) error {
	if b.p == nil {
		return ErrClosed
	}
	return b.p.WriteMem(addr, buf)
}

// syscallTid is Syscall on the tracer goroutine.
func (p *Process) syscallTid(tid int, nr uintptr, args []uintptr) (uintptr, error) {
	if len(args) > 6 {
		return 0, fmt.Errorf("inject syscall %d: %d arguments: %w", nr, len(args), unix.EINVAL)
	}
	if p.opts.TraceClone {
		switch nr {
		case unix.SYS_CLONE, unix.SYS_FORK, unix.SYS_VFORK, unix.SYS_CLONE3:
			return 0, fmt.Errorf("inject syscall %d with TraceClone (use CloneThread/CloneProcess): %w", nr, unix.EINVAL)
		}
	}
	th, err := p.thread(tid)
	if err != nil {
		return 0, err
	}
	var a [6]uintptr
	copy(a[:], args)
	return p.syscall(th, nr, a)
}

// SetSyscallInsn sets the address of the `syscall` instruction used for
// injection (e.g. after the caller moved the vDSO). It is checked before its
// first use: injection fails with ErrNoSyscallInsn unless the address holds
// 0f 05 in an executable mapping. It must stay mapped while it is used.
func (p *Process) SetSyscallInsn(addr uint64) {
	_ = p.do(func() error {
		p.insn, p.insnChecked = addr, false
		return nil
	})
}

// FindSyscallInsn scans the tracee's [vdso] for a `syscall` instruction,
// uses it from now on and returns its address.
func (p *Process) FindSyscallInsn() (uint64, error) {
	var addr uint64
	err := p.do(func() error {
		var err error
		addr, err = p.findVdsoInsn()
		if err == nil {
			p.insn, p.insnChecked = addr, true
		}
		return err
	})
	return addr, err
}

// Scratch returns the address of the scratch mapping, an anonymous
// read-write mapping of ScratchSize bytes that the first call creates in the
// tracee (with an injected mmap) and Detach unmaps. Callers put syscall
// arguments there.
func (p *Process) Scratch() (uint64, error) {
	var addr uint64
	err := p.do(func() error {
		var err error
		addr, err = p.scratchAddr()
		return err
	})
	return addr, err
}

// ScratchRange returns the scratch mapping's range, if it exists, so that a
// dump can leave it out.
func (p *Process) ScratchRange() (start, end uint64, ok bool) {
	_ = p.do(func() error {
		if p.scratch != 0 {
			start, end, ok = p.scratch, p.scratch+p.scratchLen, true
		}
		return nil
	})
	return start, end, ok
}

// SetScratchHint makes the scratch mapping be created at addr
// (MAP_FIXED_NOREPLACE). It has no effect once the mapping exists.
func (p *Process) SetScratchHint(addr uint64) {
	_ = p.do(func() error {
		p.scratchHint = addr
		return nil
	})
}

// WriteScratch copies b into the scratch mapping at offset off.
func (p *Process) WriteScratch(off uint64, b []byte) error {
	base, err := p.Scratch()
	if err != nil {
		return err
	}
	if off+uint64(len(b)) > ScratchSize || off+uint64(len(b)) < off {
		return fmt.Errorf("write scratch %#x+%#x: %w", off, len(b), unix.EINVAL)
	}
	return p.WriteMem(base+off, b)
}

// ReadScratch copies len(b) bytes from the scratch mapping at offset off.
func (p *Process) ReadScratch(off uint64, b []byte) error {
	base, err := p.Scratch()
	if err != nil {
		return err
	}
	if off+uint64(len(b)) > ScratchSize || off+uint64(len(b)) < off {
		return fmt.Errorf("read scratch %#x+%#x: %w", off, len(b), unix.EINVAL)
	}
	return p.ReadMem(base+off, b)
}

// syscall injects nr and turns an errno return into an error.
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) syscall(th *thread, nr uintptr, a [6]uintptr) (uintptr, error) {
	if nr == unix.SYS_RT_SIGACTION && a[0] == uintptr(unix.SIGTRAP) && a[1] != 0 {
		// The tracee may be about to ignore SIGTRAP, which single-stepping
		// would undo.
		p.opts.SyscallStops = true
	}
	ret, err := p.inject(th, nr, a, nil)
	if err != nil {
		return 0, err
	}
	if e := int64(ret); e < 0 && e >= -4095 {
		return uintptr(ret), fmt.Errorf("inject syscall %d: %w", nr, unix.Errno(-e))
	}
	return uintptr(ret), nil
}

// inject runs syscall nr in th and returns rax. onEvent handles the
// PTRACE_EVENT_CLONE/FORK/VFORK stops an injected clone reports.
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) inject(th *thread, nr uintptr, a [6]uintptr, onEvent func(ev int) error) (uint64, error) {
	insn, err := p.syscallInsn()
	if err != nil {
		return 0, err
	}
	if err := p.blockSignals(th); err != nil {
		return 0, err
	}
	r := th.saved
	r.Rax = uint64(nr)
	// orig_rax = -1: not in a syscall, so the kernel's restart logic
	// (arch_do_signal_or_restart) leaves these registers alone.
	r.Orig_rax = ^uint64(0)
	r.Rdi, r.Rsi, r.Rdx = uint64(a[0]), uint64(a[1]), uint64(a[2])
	r.R10, r.R8, r.R9 = uint64(a[3]), uint64(a[4]), uint64(a[5])
	r.Rip = insn
	for i := 0; ; i++ {
		ret, err := p.step(th, &r, onEvent)
		if err != nil {
			return 0, fmt.Errorf("inject syscall %d in thread %d: %w", nr, th.tid, err)
		}
		switch -int64(ret) {
		case errRestartSys, errRestartNoIntr, errRestartNoHand, errRestartRestartBlck:
			// Interrupted before it did anything; the kernel would
			// restart it, so do we.
			if i < maxRestarts {
				continue
			}
			return 0, fmt.Errorf("inject syscall %d in thread %d: still restarting after %d tries: %w", nr, th.tid, i, unix.EINTR)
		}
		return ret, nil
	}
}

// resumeWait resumes th with ptrace request req (delivering sig) and waits
// for its next report. A thread that exited or was reaped is marked gone
// and reported as ErrTraceeGone.
//
// Preconditions: runs on the tracer goroutine.
func resumeWait(th *thread, req, sig int) (unix.WaitStatus, error) {
	if err := ptraceRaw(req, th.tid, 0, uintptr(sig)); err != nil {
		return 0, goneErr(th, fmt.Errorf("resume: %w", err))
	}
	th.parked = false
	ws, err := wait4(th.tid, 0)
	if err != nil {
		if err == unix.ECHILD {
			th.gone, th.reaped = true, true
			return 0, fmt.Errorf("wait: %w: %w", ErrTraceeGone, err)
		}
		return 0, fmt.Errorf("wait: %w", err)
	}
	if ws.Exited() || ws.Signaled() {
		th.gone, th.reaped = true, true
		return 0, fmt.Errorf("thread exited (%#x): %w", uint32(ws), ErrTraceeGone)
	}
	return ws, nil
}

// step executes the `syscall` instruction at r.Rip in th once, with r, and
// returns rax after it.
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) step(th *thread, r *unix.PtraceRegs, onEvent func(ev int) error) (uint64, error) {
	insn := r.Rip
	req := unix.PTRACE_SINGLESTEP
	if p.opts.SyscallStops {
		req = unix.PTRACE_SYSCALL
	}
	setRegs, entered, sig := true, false, 0
	for tries := 0; tries < maxStepRetries; tries++ {
		if setRegs {
			if err := ptraceSetRegs(th.tid, r); err != nil {
				return 0, goneErr(th, fmt.Errorf("set regs: %w", err))
			}
			th.regsSet, setRegs = true, false
		}
		ws, err := resumeWait(th, req, sig)
		if err != nil {
			return 0, err
		}
		sig = 0
		if !ws.Stopped() {
			continue
		}
		ev, s := stopEvent(ws), ws.StopSignal()
		switch {
		case ev == unix.PTRACE_EVENT_STOP:
			// An interrupt or group stop reported before the instruction
			// ran (the retry case): step again.
			th.parked = true
			setRegs = !entered
		case ev == unix.PTRACE_EVENT_CLONE || ev == unix.PTRACE_EVENT_FORK || ev == unix.PTRACE_EVENT_VFORK:
			if onEvent == nil {
				return 0, fmt.Errorf("unexpected clone event %d", ev)
			}
			if err := onEvent(ev); err != nil {
				return 0, err
			}
		case ev != 0:
			return 0, fmt.Errorf("unexpected ptrace event %d", ev)
		case s == unix.SIGTRAP|0x80:
			// Syscall-entry then syscall-exit stop (PTRACE_O_TRACESYSGOOD).
			if !entered {
				entered = true
				continue
			}
			return p.rax(th)
		case s == unix.SIGTRAP && req == unix.PTRACE_SINGLESTEP:
			th.parked = true
			var q unix.PtraceRegs
			if err := ptraceGetRegs(th.tid, &q); err != nil {
				return 0, goneErr(th, fmt.Errorf("get regs: %w", err))
			}
			switch q.Rip {
			case insn + 2:
				return q.Rax, nil
			case insn:
				// A SIGTRAP sent by someone else, reported before the
				// instruction ran. It is consumed; step again.
				setRegs = true
			default:
				return 0, fmt.Errorf("single-step ended at %#x, not %#x", q.Rip, insn+2)
			}
		case s == unix.SIGSTOP:
			// SIGSTOP cannot be blocked. Pass it on: the thread enters the
			// group stop, reports PTRACE_EVENT_STOP, and we step again.
			th.parked = true
			sig, setRegs = int(unix.SIGSTOP), !entered
		default:
			// A signal caused by the instruction itself (e.g. SIGSEGV: the
			// address is not executable). It is discarded at Detach.
			th.parked = true
			return 0, fmt.Errorf("signal %d at syscall instruction %#x", s, insn)
		}
	}
	return 0, fmt.Errorf("no syscall after %d stops", maxStepRetries)
}

// rax reads rax of a thread stopped at a syscall-exit stop.
func (p *Process) rax(th *thread) (uint64, error) {
	var q unix.PtraceRegs
	if err := ptraceGetRegs(th.tid, &q); err != nil {
		return 0, goneErr(th, fmt.Errorf("get regs: %w", err))
	}
	return q.Rax, nil
}

// injectionMask is the signal mask a thread has while injected into: every
// blockable signal, except SIGTRAP when single-stepping (forcing a blocked
// SIGTRAP would reset its handler, see the package doc).
func (p *Process) injectionMask() uint64 {
	m := ^uint64(0) &^ (sigBit(unix.SIGKILL) | sigBit(unix.SIGSTOP))
	if !p.opts.SyscallStops {
		m &^= sigBit(unix.SIGTRAP)
	}
	return m
}

// blockSignals puts the injection mask on th, once.
func (p *Process) blockSignals(th *thread) error {
	want := p.injectionMask()
	if th.maskSet && th.injMask == want {
		return nil
	}
	if err := ptraceSetSigMask(th.tid, want); err != nil {
		return goneErr(th, fmt.Errorf("block signals in thread %d: %w", th.tid, err))
	}
	th.maskSet, th.injMask = true, want
	return nil
}

// syscallInsn returns the address of a `syscall` instruction: the one set
// by SetSyscallInsn or found before, else one at rip-2 of a thread (a thread
// stopped in a syscall), else one in the [vdso]. An address is checked once,
// before its first use: a fault on the instruction fetch would force a
// SIGSEGV on the tracee, which resets a blocked signal's handler
// (kernel/signal.c:force_sig_info_to_task).
func (p *Process) syscallInsn() (uint64, error) {
	if p.insn != 0 {
		if !p.insnChecked {
			if err := p.checkInsn(p.insn); err != nil {
				return 0, err
			}
			p.insnChecked = true
		}
		return p.insn, nil
	}
	var b [2]byte
	for _, th := range p.threads {
		rip := th.saved.Rip
		// rip-2 on the same page as rip, which is mapped executable.
		if th.gone || rip&0xfff < 2 {
			continue
		}
		if err := p.ReadMem(rip-2, b[:]); err == nil && b == [2]byte{0x0f, 0x05} {
			p.insn, p.insnChecked = rip-2, true
			return p.insn, nil
		}
	}
	addr, err := p.findVdsoInsn()
	if err != nil {
		return 0, err
	}
	p.insn, p.insnChecked = addr, true
	return addr, nil
}

// checkInsn verifies that addr holds 0f 05 in an executable mapping.
func (p *Process) checkInsn(addr uint64) error {
	var b [2]byte
	if err := p.ReadMem(addr, b[:]); err != nil {
		return fmt.Errorf("syscall instruction at %#x: %w: %w", addr, ErrNoSyscallInsn, err)
	}
	if b != [2]byte{0x0f, 0x05} {
		return fmt.Errorf("syscall instruction at %#x: bytes %x: %w", addr, b, ErrNoSyscallInsn)
	}
	perms, ok, err := mappingPerms(p.pid, addr, 2)
	if err != nil {
		return fmt.Errorf("syscall instruction at %#x: %w", addr, err)
	}
	if !ok || !strings.Contains(perms, "x") {
		return fmt.Errorf("syscall instruction at %#x: not in an executable mapping (%q): %w", addr, perms, ErrNoSyscallInsn)
	}
	return nil
}

// findVdsoInsn finds a `syscall` instruction (0f 05) in the [vdso]. Only
// [vdso] is read: reading [vvar] or [vvar_vclock] raises SIGBUS.
func (p *Process) findVdsoInsn() (uint64, error) {
	start, end, ok, err := findMapping(p.pid, "[vdso]")
	if err != nil {
		return 0, fmt.Errorf("find vdso of %d: %w", p.pid, err)
	}
	if !ok {
		return 0, fmt.Errorf("process %d has no [vdso]: %w", p.pid, ErrNoSyscallInsn)
	}
	b := make([]byte, end-start)
	if err := p.ReadMem(start, b); err != nil {
		return 0, fmt.Errorf("read vdso of %d: %w", p.pid, err)
	}
	i := bytes.Index(b, []byte{0x0f, 0x05})
	if i < 0 {
		return 0, fmt.Errorf("vdso %#x-%#x of %d: %w", start, end, p.pid, ErrNoSyscallInsn)
	}
	return start + uint64(i), nil
}

// scratchAddr returns the scratch mapping, creating it on first use.
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) scratchAddr() (uint64, error) {
	if p.scratch != 0 {
		return p.scratch, nil
	}
	th, err := p.anyThread()
	if err != nil {
		return 0, err
	}
	flags := uintptr(unix.MAP_PRIVATE | unix.MAP_ANONYMOUS)
	if p.scratchHint != 0 {
		flags |= unix.MAP_FIXED_NOREPLACE
	}
	// One more page for the call loop (see Syscalls), made executable
	// when first used.
	ret, err := p.syscall(th, unix.SYS_MMAP, [6]uintptr{uintptr(p.scratchHint), ScratchSize + codePage,
		unix.PROT_READ | unix.PROT_WRITE, flags, ^uintptr(0), 0})
	if err != nil {
		return 0, fmt.Errorf("create scratch: %w", err)
	}
	if p.scratchHint != 0 && uint64(ret) != p.scratchHint {
		// A kernel without MAP_FIXED_NOREPLACE treats it as a hint.
		_, uerr := p.syscall(th, unix.SYS_MUNMAP, [6]uintptr{ret, ScratchSize + codePage})
		return 0, errors.Join(fmt.Errorf("create scratch at %#x: got %#x: %w", p.scratchHint, ret, unix.EEXIST), uerr)
	}
	p.scratch, p.scratchLen, p.codeReady = uint64(ret), ScratchSize+codePage, false
	return p.scratch, nil
}

// unmapScratch removes the scratch mapping.
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) unmapScratch() error {
	th, err := p.anyThread()
	if err != nil {
		return err
	}
	if _, err := p.syscall(th, unix.SYS_MUNMAP, [6]uintptr{uintptr(p.scratch), uintptr(p.scratchLen)}); err != nil {
		return fmt.Errorf("unmap scratch %#x: %w", p.scratch, err)
	}
	p.scratch, p.scratchLen, p.codeReady = 0, 0, false
	return nil
}
