package inject

import (
	"fmt"
	"io"

	"golang.org/x/sys/unix"
)

// maxXStateSize is the buffer used to learn the size of NT_X86_XSTATE (the
// kernel shrinks iov_len to the real size, a few KiB with AVX-512/AMX).
const maxXStateSize = 64 << 10

// RseqConfig is a thread's rseq registration
// (PTRACE_GET_RSEQ_CONFIGURATION). Addr 0: none.
type RseqConfig struct {
	Addr       uint64
	Len, Flags uint32
	Sig        uint32
}

// Siginfo is one queued signal as the kernel reports it (struct siginfo,
// 128 bytes): its first three fields, then the signal-specific union.
type Siginfo struct {
	Signo, Errno, Code int32
	_                  int32
	Rest               [112]byte
}

// ReadMem reads len(buf) bytes of the tracee's memory at addr through
// /proc/pid/mem. It does not need the tracee stopped and does not use the
// tracer thread.
func (p *Process) ReadMem(addr uint64, buf []byte) error {
	if len(buf) == 0 {
		return nil
	}
	if int64(addr) < 0 || int64(addr+uint64(len(buf))) < 0 {
		return fmt.Errorf("read mem %#x+%#x: %w", addr, len(buf), unix.EINVAL)
	}
	n, err := p.mem.ReadAt(buf, int64(addr))
	if err != nil {
		if err == io.EOF {
			err = unix.EIO
		}
		return fmt.Errorf("read mem %#x+%#x (got %#x): %w", addr, len(buf), n, p.closedErr(err))
	}
	return nil
}

// WriteMem writes buf into the tracee's memory at addr through
// /proc/pid/mem, which (FOLL_FORCE) also writes read-only private mappings.
func (p *Process) WriteMem(addr uint64, buf []byte) error {
	if len(buf) == 0 {
		return nil
	}
	if int64(addr) < 0 || int64(addr+uint64(len(buf))) < 0 {
		return fmt.Errorf("write mem %#x+%#x: %w", addr, len(buf), unix.EINVAL)
	}
	n, err := p.mem.WriteAt(buf, int64(addr))
	if err != nil {
		return fmt.Errorf("write mem %#x+%#x (wrote %#x): %w", addr, len(buf), n, p.closedErr(err))
	}
	return nil
}

// closedErr adds ErrClosed to an error on p's files once p is closed.
func (p *Process) closedErr(err error) error {
	if p.released.Load() {
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return err
}

// SetSavedRegs sets the registers Detach puts back on thread tid (restore
// uses it to give each thread its final state). Injected syscalls start from
// these registers too, with rip, rax, orig_rax and the argument registers
// replaced.
func (p *Process) SetSavedRegs(tid int, r unix.PtraceRegs) error {
	return p.do(func() error {
		th, err := p.thread(tid)
		if err != nil {
			return err
		}
		th.saved = r
		th.regsSet = true
		return nil
	})
}

// xstate reads th's extended FPU state (PTRACE_GETREGSET NT_X86_XSTATE).
// Injected syscalls do not change it.
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) xstate(th *thread) ([]byte, error) {
	size := p.xstateSize
	if size == 0 {
		size = maxXStateSize
	}
	b := make([]byte, size)
	n, err := ptraceGetRegSet(th.tid, unix.NT_X86_XSTATE, b)
	if err != nil {
		return nil, goneErr(th, fmt.Errorf("get xstate of %d: %w", th.tid, err))
	}
	p.xstateSize = n
	return b[:n], nil
}

// SetXState sets thread tid's extended FPU state (PTRACE_SETREGSET
// NT_X86_XSTATE) now.
func (p *Process) SetXState(tid int, b []byte) error {
	return p.do(func() error {
		th, err := p.thread(tid)
		if err != nil {
			return err
		}
		if err := ptraceSetRegSet(th.tid, unix.NT_X86_XSTATE, b); err != nil {
			return goneErr(th, fmt.Errorf("set xstate of %d: %w", th.tid, err))
		}
		return nil
	})
}

// SetSigMask sets the signal mask Detach puts on thread tid
// (PTRACE_SETSIGMASK at Detach).
func (p *Process) SetSigMask(tid int, m uint64) error {
	return p.do(func() error {
		th, err := p.thread(tid)
		if err != nil {
			return err
		}
		th.mask, th.maskSet = m, true
		return nil
	})
}

// rseq reads th's rseq registration.
func rseq(th *thread) (RseqConfig, error) {
	k, err := ptraceGetRseq(th.tid)
	if err != nil {
		return RseqConfig{}, goneErr(th, fmt.Errorf("get rseq of %d: %w", th.tid, err))
	}
	return RseqConfig{Addr: k.Addr, Len: k.Len, Flags: k.Flags, Sig: k.Sig}, nil
}

// pending reads the signals queued for th (shared: the process-wide
// queue) without dequeuing them (PTRACE_PEEKSIGINFO).
func pending(th *thread, shared bool) ([]Siginfo, error) {
	var out []Siginfo
	var buf [32]Siginfo
	for {
		n, err := ptracePeekSiginfo(th.tid, uint64(len(out)), shared, buf[:])
		if err != nil {
			return nil, goneErr(th, fmt.Errorf("peek siginfo of %d: %w", th.tid, err))
		}
		out = append(out, buf[:n]...)
		if n < len(buf) {
			return out, nil
		}
	}
}

// ThreadState is what a dump records of one stopped thread.
type ThreadState struct {
	Tid     int
	Regs    unix.PtraceRegs // what Detach puts back: as found, unless SetSavedRegs changed them
	XState  []byte
	SigMask uint64 // what Detach puts back: as found (for a thread in ppoll or sigsuspend its normal mask, not the temporary one), unless SetSigMask changed it
	Rseq    RseqConfig
	Pending []Siginfo // the thread's own queue
}

// ThreadStates returns the state of every attached thread, leader first,
// and the process-wide queue of pending signals, in one request to the
// tracer thread: a request costs two hand-offs between OS threads, more
// than the ptrace calls it makes here.
func (p *Process) ThreadStates() ([]ThreadState, []Siginfo, error) {
	var out []ThreadState
	var shared []Siginfo
	err := p.do(func() error {
		for _, th := range p.threads {
			if th.gone {
				continue
			}
			ts := ThreadState{Tid: th.tid, Regs: th.saved, SigMask: th.mask}
			var err error
			if ts.XState, err = p.xstate(th); err != nil {
				return err
			}
			if ts.Rseq, err = rseq(th); err != nil {
				return err
			}
			if ts.Pending, err = pending(th, false); err != nil {
				return err
			}
			out = append(out, ts)
		}
		th, err := p.anyThread()
		if err != nil {
			return err
		}
		shared, err = pending(th, true)
		return err
	})
	return out, shared, err
}
