package inject

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"
)

// Call is one system call of Syscalls.
type Call struct {
	Nr   uintptr
	Args [6]uintptr
}

// callSize is the bytes of one Call in the tracee's table: nr, six
// arguments, then the return value the loop stores.
const callSize = 64

// CallTableSize is the bytes Syscalls needs at table for n calls.
func CallTableSize(n int) uint64 { return uint64(n) * callSize }

// callLoop runs the calls of a table in the tracee: rbx points to the
// table, r12 holds the count; each entry's return value is stored after
// its arguments; int3 hands the thread back to the tracer. Assembled with
// GNU as from:
//
//	loop:	test %r12,%r12; jz done
//		mov (%rbx),%rax; mov 8(%rbx),%rdi; mov 16(%rbx),%rsi; mov 24(%rbx),%rdx
//		mov 32(%rbx),%r10; mov 40(%rbx),%r8; mov 48(%rbx),%r9
//		syscall
//		mov %rax,56(%rbx); add $64,%rbx; dec %r12; jmp loop
//	done:	int3
var callLoop = []byte{
	0x4d, 0x85, 0xe4, 0x74, 0x2a, 0x48, 0x8b, 0x03, 0x48, 0x8b, 0x7b, 0x08,
	0x48, 0x8b, 0x73, 0x10, 0x48, 0x8b, 0x53, 0x18, 0x4c, 0x8b, 0x53, 0x20,
	0x4c, 0x8b, 0x43, 0x28, 0x4c, 0x8b, 0x4b, 0x30, 0x0f, 0x05, 0x48, 0x89,
	0x43, 0x38, 0x48, 0x83, 0xc3, 0x40, 0x49, 0xff, 0xcc, 0xeb, 0xd1, 0xcc,
}

// codePage is the size of the executable page after the scratch area
// that holds callLoop.
const codePage = 4096

// Syscalls runs calls in thread tid (0: the leader), in order, and returns
// their raw return values; an errno is not an error here, the caller
// checks each value. The table of calls goes into the tracee at table
// (CallTableSize bytes, in the scratch mapping). The calls run in one
// resume of the thread, by a loop of ours in an executable page next to
// the scratch mapping: a ptrace round trip per call costs more than most
// calls. Tracees injected with syscall stops (Options.SyscallStops) run
// the calls one by one instead. Clone calls are refused.
func (b *Batch) Syscalls(tid int, table uint64, calls []Call) ([]uint64, error) {
	if b.p == nil {
		return nil, ErrClosed
	}
	return b.p.syscalls(tid, table, calls)
}

// Syscalls is Batch.Syscalls.
func (p *Process) Syscalls(tid int, table uint64, calls []Call) ([]uint64, error) {
	var out []uint64
	err := p.do(func() error {
		var err error
		out, err = p.syscalls(tid, table, calls)
		return err
	})
	return out, err
}

// syscalls is Syscalls on the tracer goroutine.
func (p *Process) syscalls(tid int, table uint64, calls []Call) ([]uint64, error) {
	for _, c := range calls {
		switch c.Nr {
		case unix.SYS_CLONE, unix.SYS_FORK, unix.SYS_VFORK, unix.SYS_CLONE3:
			return nil, fmt.Errorf("inject calls: clone %d: %w", c.Nr, unix.EINVAL)
		}
	}
	th, err := p.thread(tid)
	if err != nil {
		return nil, err
	}
	out := make([]uint64, len(calls))
	if p.opts.SyscallStops || len(calls) < 2 {
		// The loop ends in int3, which forces a SIGTRAP; with syscall
		// stops the tracee may ignore SIGTRAP, which forcing resets.
		for i, c := range calls {
			ret, err := p.inject(th, c.Nr, c.Args, nil)
			if err != nil {
				return nil, err
			}
			out[i] = ret
		}
		return out, nil
	}
	code, err := p.codeAddr()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, len(calls)*callSize)
	for i, c := range calls {
		e := buf[i*callSize:]
		binary.LittleEndian.PutUint64(e, uint64(c.Nr))
		for j, a := range c.Args {
			binary.LittleEndian.PutUint64(e[8+8*j:], uint64(a))
		}
	}
	if err := p.WriteMem(table, buf); err != nil {
		return nil, fmt.Errorf("inject calls: write table: %w", err)
	}
	if err := p.blockSignals(th); err != nil {
		return nil, err
	}
	r := th.saved
	r.Rip, r.Rbx, r.R12 = code, table, uint64(len(calls))
	r.Orig_rax = ^uint64(0)
	if err := p.runToTrap(th, &r, code+uint64(len(callLoop))); err != nil {
		return nil, fmt.Errorf("inject %d calls in thread %d: %w", len(calls), th.tid, err)
	}
	if err := p.ReadMem(table, buf); err != nil {
		return nil, fmt.Errorf("inject calls: read results: %w", err)
	}
	for i := range out {
		out[i] = binary.LittleEndian.Uint64(buf[i*callSize+56:])
	}
	return out, nil
}

// runToTrap runs th from r until the int3 before end, and checks that it
// stopped there.
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) runToTrap(th *thread, r *unix.PtraceRegs, end uint64) error {
	if err := ptraceSetRegs(th.tid, r); err != nil {
		return goneErr(th, fmt.Errorf("set regs: %w", err))
	}
	th.regsSet = true
	sig := 0
	for tries := 0; tries < maxStepRetries; tries++ {
		ws, err := resumeWait(th, unix.PTRACE_CONT, sig)
		if err != nil {
			return err
		}
		sig = 0
		if !ws.Stopped() {
			continue
		}
		th.parked = true
		ev, s := stopEvent(ws), ws.StopSignal()
		switch {
		case ev == unix.PTRACE_EVENT_STOP:
			// An interrupt or group stop: resume where it is.
		case ev != 0:
			return fmt.Errorf("unexpected ptrace event %d", ev)
		case s == unix.SIGSTOP:
			sig = int(unix.SIGSTOP)
		case s == unix.SIGTRAP:
			var q unix.PtraceRegs
			if err := ptraceGetRegs(th.tid, &q); err != nil {
				return goneErr(th, fmt.Errorf("get regs: %w", err))
			}
			if q.Rip != end {
				return fmt.Errorf("trap at %#x, not %#x", q.Rip, end)
			}
			return nil
		default:
			return fmt.Errorf("signal %d in the call loop", s)
		}
	}
	return fmt.Errorf("no trap after %d stops", maxStepRetries)
}

// codeAddr returns the executable page after the scratch area, holding
// callLoop, and makes it on first use.
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) codeAddr() (uint64, error) {
	base, err := p.scratchAddr()
	if err != nil {
		return 0, err
	}
	code := base + ScratchSize
	if p.codeReady {
		return code, nil
	}
	if err := p.WriteMem(code, callLoop); err != nil {
		return 0, fmt.Errorf("write call loop: %w", err)
	}
	th, err := p.anyThread()
	if err != nil {
		return 0, err
	}
	if _, err := p.syscall(th, unix.SYS_MPROTECT, [6]uintptr{uintptr(code), codePage, unix.PROT_READ | unix.PROT_EXEC}); err != nil {
		return 0, fmt.Errorf("make call loop executable: %w", err)
	}
	p.codeReady = true
	return code, nil
}
