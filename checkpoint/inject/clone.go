package inject

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

const (
	// cloneOff is where the clone helpers put struct clone_args in the
	// helpers' part of the scratch mapping, and setTidOff the set_tid array.
	cloneOff  = 2048
	setTidOff = cloneOff + 128

	threadFlags = unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND |
		unix.CLONE_THREAD | unix.CLONE_SYSVSEM
)

// CloneThread creates a thread in p by injecting clone3 into thread in (0:
// the leader) with CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|
// CLONE_SYSVSEM and set_tid = {tid} (tid 0: any; a chosen tid needs
// CAP_CHECKPOINT_RESTORE in the tracee). The new thread is auto-attached
// (Options.TraceClone is required) and stays stopped until Detach; its saved
// registers and signal mask are copies of in's, to be replaced with
// SetSavedRegs and SetSigMask. It never runs its own code before Detach.
func (p *Process) CloneThread(in int, tid int) error {
	return p.do(func() error { return p.cloneThread(in, tid) })
}

// CloneProcess creates a child of p by injecting clone3 (flags 0,
// exit_signal SIGCHLD, set_tid = {pid}; pid 0: any) into p's leader, and
// returns it as a Process, attached (Options.TraceClone is required) and
// stopped, served by p's tracer thread. The child's saved registers and
// signal mask are copies of the leader's; its scratch mapping is the copy of
// p's it inherited. pid is the id in p's pid namespace; the child's Pid()
// is the id in ours.
func (p *Process) CloneProcess(pid int) (*Process, error) {
	var c *Process
	err := p.do(func() error {
		if !p.opts.TraceClone {
			return fmt.Errorf("clone process: Options.TraceClone not set: %w", unix.EINVAL)
		}
		var err error
		c, err = p.cloneProcess(pid, 0, uint64(unix.SIGCHLD), unix.PTRACE_EVENT_FORK)
		return err
	})
	return c, err
}

// shadowFlags share the fd table with the shadow for the clone only: a
// copy would take a reference to every open file. Shadow then unshares it
// empty (close_range with CLOSE_RANGE_UNSHARE), so that the shadow holds
// no file: a shared table would keep the process's files open after the
// process exits (no EOF to a peer, ports and locks held). fs info is
// copied, not shared: a shared fs_struct makes setns(2) fail and exec of
// a setuid binary lose its privileges in the process.
const shadowFlags = unix.CLONE_FILES

// Shadow forks p's leader into a copy-on-write shadow of its memory: a
// child made by clone3 (exit_signal 0, so the parent gets no SIGCHLD and
// wait(2) without __WALL never sees it) that never runs a single
// instruction of its own and holds no open file. It is returned attached
// and stopped, served by p's tracer thread, which stays alive until the
// shadow is killed. The shadow carries PTRACE_O_EXITKILL from birth: if
// the tracer thread dies, the kernel kills it rather than let it run the
// process's code. Its memory reads with ReadMem as p's did at the fork,
// whatever p does afterwards (not with process_vm_readv: that pins pages,
// and pinning a page the shadow shares with p makes the kernel copy it
// into the shadow first). Kill it with Kill. Its name (comm) is set to
// name (at most 15 bytes), so that it can be told apart in ps and in
// /proc. Killed, it stays a zombie child of p until p waits for it with
// __WCLONE or __WALL, or exits; a shadow that fails half-made is reaped
// at once (p is stopped).
//
// Options.TraceClone is not needed: the clone events are switched on in
// the leader for the one call.
func (p *Process) Shadow(name string) (*Process, error) {
	if len(name) == 0 || len(name) > 15 {
		return nil, fmt.Errorf("shadow: name %q: want 1 to 15 bytes: %w", name, unix.EINVAL)
	}
	var c *Process
	err := p.do(func() error {
		th, err := p.thread(0)
		if err != nil {
			return err
		}
		opts := p.opts.ptraceOptions(true)
		if err := ptraceRaw(unix.PTRACE_SETOPTIONS, th.tid, 0, uintptr(opts|unix.PTRACE_O_TRACECLONE|unix.PTRACE_O_EXITKILL)); err != nil {
			return goneErr(th, fmt.Errorf("shadow: set options: %w", err))
		}
		c, err = p.cloneProcess(0, shadowFlags, 0, unix.PTRACE_EVENT_CLONE)
		if rerr := ptraceRaw(unix.PTRACE_SETOPTIONS, th.tid, 0, uintptr(opts)); rerr != nil {
			rerr = goneErr(th, fmt.Errorf("shadow: reset options: %w", rerr))
			if c != nil {
				rerr = errors.Join(rerr, p.discardShadow(c))
				c = nil
			}
			return errors.Join(err, rerr)
		}
		if err != nil {
			return fmt.Errorf("shadow: %w", err)
		}
		if err := c.shadowSetup(name); err != nil {
			err = errors.Join(fmt.Errorf("shadow: %w", err), p.discardShadow(c))
			c = nil
			return err
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return c, nil
}

// shadowSetup gives a new shadow its own, empty fd table
// (close_range(0, ~0, CLOSE_RANGE_UNSHARE): the kernel copies no fd into
// it) and its name (prctl(PR_SET_NAME), the name written to its scratch
// mapping), by syscalls injected into it.
//
// Preconditions: runs on the tracer goroutine.
func (c *Process) shadowSetup(name string) error {
	th, err := c.thread(0)
	if err != nil {
		return err
	}
	ret, err := c.inject(th, unix.SYS_CLOSE_RANGE, [6]uintptr{0, ^uintptr(0) >> 32, unix.CLOSE_RANGE_UNSHARE}, nil)
	if err == nil && ret != 0 {
		err = unix.Errno(-int64(ret))
	}
	if err != nil {
		return fmt.Errorf("drop fds: close_range: %w", err)
	}
	base, err := c.scratchAddr()
	if err != nil {
		return err
	}
	if err := c.WriteMem(base, append([]byte(name), 0)); err != nil {
		return fmt.Errorf("set name: %w", err)
	}
	ret, err = c.inject(th, unix.SYS_PRCTL, [6]uintptr{unix.PR_SET_NAME, uintptr(base)}, nil)
	if err == nil && ret != 0 {
		err = unix.Errno(-int64(ret))
	}
	if err != nil {
		return fmt.Errorf("set name: prctl: %w", err)
	}
	return nil
}

// discardShadow kills a shadow that failed half-made and reaps it twice:
// as its tracer, then, by a wait4 injected into p's stopped leader, as
// its parent (exit signal 0: no wait of p's own would see it, and an
// unnamed zombie child would make every later dump refuse p as a tree).
//
// Preconditions: runs on the tracer goroutine; p is stopped.
func (p *Process) discardShadow(c *Process) error {
	err := c.killLocked()
	th, terr := p.thread(0)
	if terr != nil {
		return errors.Join(err, terr)
	}
	ret, werr := p.inject(th, unix.SYS_WAIT4, [6]uintptr{uintptr(c.nsPid), 0, unix.WNOHANG | unix.WALL}, nil)
	if werr == nil && int64(ret) < 0 {
		werr = unix.Errno(-int64(ret))
	}
	if werr != nil {
		err = errors.Join(err, fmt.Errorf("reap shadow %d in its parent: %w", c.pid, werr))
	}
	return err
}

// cloneThread is CloneThread on the tracer goroutine.
func (p *Process) cloneThread(in, tid int) error {
	if !p.opts.TraceClone {
		return fmt.Errorf("clone thread: Options.TraceClone not set: %w", unix.EINVAL)
	}
	th, err := p.thread(in)
	if err != nil {
		return err
	}
	newTid, ret, err := p.clone3(th, threadFlags, 0, tid, unix.PTRACE_EVENT_CLONE)
	if newTid == 0 {
		return fmt.Errorf("clone thread %d in %d: %w", tid, th.tid, err)
	}
	nt := &thread{tid: newTid, saved: th.saved, mask: th.mask, maskSet: true, injMask: th.injMask, regsSet: true}
	if err == nil {
		err = p.waitInterruptStop(nt)
	}
	if err == nil && (ret <= 0 || (tid != 0 && int(ret) != tid)) {
		err = fmt.Errorf("clone3 returned %d, want %d", ret, tid)
	}
	if err != nil {
		return errors.Join(fmt.Errorf("clone thread %d in %d: %w", tid, th.tid, err), p.discardThread(nt))
	}
	p.threads = append(p.threads, nt)
	return nil
}

// cloneProcess injects clone3 with flags (no CLONE_VM or CLONE_THREAD)
// and exitSignal into p's leader, which reports the ptrace event want, and
// returns the child (pid: its id in p's namespace; 0: any).
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) cloneProcess(pid int, flags, exitSignal uint64, want int) (_ *Process, err error) {
	th, err := p.thread(0)
	if err != nil {
		return nil, err
	}
	newPid, ret, err := p.clone3(th, flags, exitSignal, pid, want)
	if newPid == 0 {
		return nil, fmt.Errorf("clone process %d: %w", pid, err)
	}
	c := &Process{pid: newPid, nsPid: int(ret), t: p.t, opts: p.opts, insn: p.insn, insnChecked: p.insnChecked,
		scratch: p.scratch, scratchLen: p.scratchLen, scratchHint: p.scratchHint, codeReady: p.codeReady, xstateSize: p.xstateSize}
	nt := &thread{tid: newPid, saved: th.saved, mask: th.mask, maskSet: true, injMask: th.injMask, regsSet: true}
	c.threads = []*thread{nt}
	if err == nil {
		err = c.waitInterruptStop(nt)
	}
	if err == nil && (ret <= 0 || (pid != 0 && int(ret) != pid)) {
		err = fmt.Errorf("clone3 returned %d, want %d", ret, pid)
	}
	if err == nil {
		err = c.openFiles()
	}
	if err != nil {
		// Kill the half-made child; its parent gets its exit signal.
		kerr := unix.Kill(newPid, unix.SIGKILL)
		if kerr == nil && !nt.gone {
			_, kerr = wait4(newPid, 0)
		}
		if exitSignal == 0 && int64(ret) > 0 {
			// No signal: reap it in the stopped parent (discardShadow).
			if r, werr := p.inject(th, unix.SYS_WAIT4, [6]uintptr{uintptr(ret), 0, unix.WNOHANG | unix.WALL}, nil); werr != nil || int64(r) < 0 {
				kerr = errors.Join(kerr, fmt.Errorf("reap child %d in its parent: %d %w", newPid, int64(r), werr))
			}
		}
		if c.mem != nil {
			kerr = errors.Join(kerr, c.mem.Close())
		}
		if c.pidfd != nil {
			kerr = errors.Join(kerr, c.pidfd.Close())
		}
		return nil, errors.Join(fmt.Errorf("clone process %d: %w", pid, err), kerr)
	}
	p.t.users++
	return c, nil
}

// openFiles opens the pidfd and /proc/pid/mem of a Process made by
// cloneProcess.
func (c *Process) openFiles() error {
	pfd, err := unix.PidfdOpen(c.pid, 0)
	if err != nil {
		return fmt.Errorf("pidfd_open %d: %w", c.pid, err)
	}
	c.pidfd = os.NewFile(uintptr(pfd), "pidfd:"+strconv.Itoa(c.pid))
	c.mem, err = os.OpenFile(fmt.Sprintf("/proc/%d/mem", c.pid), os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open mem of %d: %w", c.pid, err)
	}
	return nil
}

// clone3 injects clone3 with flags, exit signal and set_tid {tid} (none if
// tid is 0) into th, expecting the PTRACE_EVENT want. It returns the new
// task's id in our pid namespace (0 if no task was made) and clone3's
// return value (its id in the tracee's namespace).
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) clone3(th *thread, flags, exitSignal uint64, tid int, want int) (newTid int, ret uint64, err error) {
	base, err := p.scratchAddr()
	if err != nil {
		return 0, 0, err
	}
	base += ScratchUserSize
	args := cloneArgs{Flags: flags, ExitSignal: exitSignal}
	if tid != 0 {
		args.SetTid, args.SetTidSize = base+setTidOff, 1
		var b [4]byte
		binary.LittleEndian.PutUint32(b[:], uint32(tid))
		if err := p.WriteMem(base+setTidOff, b[:]); err != nil {
			return 0, 0, err
		}
	}
	ab := args.bytes()
	if err := p.WriteMem(base+cloneOff, ab); err != nil {
		return 0, 0, err
	}
	onEvent := func(ev int) error {
		if ev != want {
			return fmt.Errorf("ptrace event %d, want %d", ev, want)
		}
		msg, err := ptraceGetEventMsg(th.tid)
		if err != nil {
			return goneErr(th, fmt.Errorf("get event msg: %w", err))
		}
		newTid = int(msg)
		return nil
	}
	ret, err = p.inject(th, unix.SYS_CLONE3, [6]uintptr{uintptr(base + cloneOff), uintptr(len(ab))}, onEvent)
	if err == nil {
		if e := int64(ret); e < 0 && e >= -4095 {
			err = fmt.Errorf("inject syscall %d: %w", unix.SYS_CLONE3, unix.Errno(-e))
		} else if newTid == 0 {
			err = fmt.Errorf("clone3 returned %d without a clone event", ret)
		}
	}
	return newTid, ret, err
}

// discardThread makes a thread created by a failed CloneThread exit
// (exit(0), not exit_group) without running any of the tracee's code.
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) discardThread(nt *thread) error {
	if nt.gone {
		return nil
	}
	if !nt.parked {
		if err := p.waitInterruptStop(nt); err != nil {
			if errors.Is(err, ErrTraceeGone) {
				return nil
			}
			return fmt.Errorf("discard thread %d: %w", nt.tid, err)
		}
	}
	r := nt.saved
	r.Rip, r.Rax, r.Orig_rax, r.Rdi = p.insn, unix.SYS_EXIT, ^uint64(0), 0
	if err := ptraceSetRegs(nt.tid, &r); err != nil {
		return goneErr(nt, fmt.Errorf("discard thread %d: %w", nt.tid, err))
	}
	if err := ptraceRaw(unix.PTRACE_CONT, nt.tid, 0, 0); err != nil {
		return goneErr(nt, fmt.Errorf("discard thread %d: %w", nt.tid, err))
	}
	for {
		ws, err := wait4(nt.tid, 0)
		if err != nil || ws.Exited() || ws.Signaled() {
			nt.gone, nt.reaped = true, true
			return nil
		}
		_ = ptraceRaw(unix.PTRACE_CONT, nt.tid, 0, 0)
	}
}
