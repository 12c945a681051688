package inject

// Raw ptrace requests that golang.org/x/sys/unix does not wrap (or wraps
// without the register set we need). Every function here must be called on
// the tracer thread of the tracee (see tracer.go).

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ptraceRaw issues one ptrace request and retries on EINTR: the tracer
// thread is a Go thread and receives the runtime's preemption signals.
func ptraceRaw(req int, tid int, addr, data uintptr) error {
	for {
		_, _, e := unix.Syscall6(unix.SYS_PTRACE, uintptr(req), uintptr(tid), addr, data, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return e
		}
		return nil
	}
}

// ptraceRet is ptraceRaw for requests whose return value matters
// (PTRACE_PEEKSIGINFO).
func ptraceRet(req int, tid int, addr, data uintptr) (uintptr, error) {
	for {
		r, _, e := unix.Syscall6(unix.SYS_PTRACE, uintptr(req), uintptr(tid), addr, data, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, e
		}
		return r, nil
	}
}

func ptraceGetRegs(tid int, r *unix.PtraceRegs) error {
	return ptraceRaw(unix.PTRACE_GETREGS, tid, 0, uintptr(unsafe.Pointer(r)))
}

func ptraceSetRegs(tid int, r *unix.PtraceRegs) error {
	return ptraceRaw(unix.PTRACE_SETREGS, tid, 0, uintptr(unsafe.Pointer(r)))
}

// ptraceGetRegSet reads register set nt into b and returns how many bytes
// the kernel filled in (it shrinks iov_len to the set's real size).
func ptraceGetRegSet(tid int, nt int, b []byte) (int, error) {
	if len(b) == 0 {
		return 0, unix.EINVAL
	}
	iov := unix.Iovec{Base: &b[0]}
	iov.SetLen(len(b))
	if err := ptraceRaw(unix.PTRACE_GETREGSET, tid, uintptr(nt), uintptr(unsafe.Pointer(&iov))); err != nil {
		return 0, err
	}
	return int(iov.Len), nil
}

func ptraceSetRegSet(tid int, nt int, b []byte) error {
	if len(b) == 0 {
		return unix.EINVAL
	}
	iov := unix.Iovec{Base: &b[0]}
	iov.SetLen(len(b))
	return ptraceRaw(unix.PTRACE_SETREGSET, tid, uintptr(nt), uintptr(unsafe.Pointer(&iov)))
}

// ptraceGetRegsSet reads NT_PRSTATUS (struct user_regs_struct) through
// PTRACE_GETREGSET.
func ptraceGetRegsSet(tid int, r *unix.PtraceRegs) error {
	b := unsafe.Slice((*byte)(unsafe.Pointer(r)), unsafe.Sizeof(*r))
	n, err := ptraceGetRegSet(tid, unix.NT_PRSTATUS, b)
	if err != nil {
		return err
	}
	if n != len(b) {
		return unix.EIO
	}
	return nil
}

// The kernel's sigset for PTRACE_{GET,SET}SIGMASK is 8 bytes on x86_64, and
// addr must be exactly that size (kernel/ptrace.c).
func ptraceGetSigMask(tid int) (uint64, error) {
	var m uint64
	err := ptraceRaw(unix.PTRACE_GETSIGMASK, tid, 8, uintptr(unsafe.Pointer(&m)))
	return m, err
}

func ptraceSetSigMask(tid int, m uint64) error {
	return ptraceRaw(unix.PTRACE_SETSIGMASK, tid, 8, uintptr(unsafe.Pointer(&m)))
}

func ptraceGetEventMsg(tid int) (uint64, error) {
	var m uint64
	err := ptraceRaw(unix.PTRACE_GETEVENTMSG, tid, 0, uintptr(unsafe.Pointer(&m)))
	return m, err
}

// rseqConfig is struct ptrace_rseq_configuration (include/uapi/linux/ptrace.h).
type rseqConfig struct {
	Addr  uint64
	Len   uint32
	Sig   uint32
	Flags uint32
	_     uint32
}

func ptraceGetRseq(tid int) (rseqConfig, error) {
	var c rseqConfig
	err := ptraceRaw(unix.PTRACE_GET_RSEQ_CONFIGURATION, tid, unsafe.Sizeof(c), uintptr(unsafe.Pointer(&c)))
	return c, err
}

// peekSiginfoArgs is struct ptrace_peeksiginfo_args.
type peekSiginfoArgs struct {
	Off   uint64
	Flags uint32
	Nr    int32
}

// Siginfo must match the kernel's struct siginfo.
var _ [128 - unsafe.Sizeof(Siginfo{})]byte
var _ [unsafe.Sizeof(Siginfo{}) - 128]byte

// ptracePeekSiginfo copies up to len(out) queued siginfos starting at off
// and returns how many it copied. It does not dequeue them.
func ptracePeekSiginfo(tid int, off uint64, shared bool, out []Siginfo) (int, error) {
	if len(out) == 0 {
		return 0, nil
	}
	a := peekSiginfoArgs{Off: off, Nr: int32(len(out))}
	if shared {
		a.Flags = unix.PTRACE_PEEKSIGINFO_SHARED
	}
	n, err := ptraceRet(unix.PTRACE_PEEKSIGINFO, tid, uintptr(unsafe.Pointer(&a)), uintptr(unsafe.Pointer(&out[0])))
	return int(n), err
}

// wait4 waits for one state change of tid with __WALL (tid may be a
// non-leader thread) and retries on EINTR.
func wait4(tid int, flags int) (unix.WaitStatus, error) {
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(tid, &ws, flags|unix.WALL, nil)
		if err == unix.EINTR {
			continue
		}
		return ws, err
	}
}

// waitExitedNoReap waits until tid has exited without reaping it (WNOWAIT),
// for a child whose real parent is this process and which the caller still
// wants to wait for.
func waitExitedNoReap(tid int) error {
	var si unix.Siginfo
	for {
		err := unix.Waitid(unix.P_PID, tid, &si, unix.WEXITED|unix.WNOWAIT|unix.WALL, nil)
		if err == unix.EINTR {
			continue
		}
		return err
	}
}

// cloneArgs is struct clone_args (CLONE_ARGS_SIZE_VER2, 88 bytes).
type cloneArgs struct {
	Flags      uint64
	Pidfd      uint64
	ChildTid   uint64
	ParentTid  uint64
	ExitSignal uint64
	Stack      uint64
	StackSize  uint64
	TLS        uint64
	SetTid     uint64
	SetTidSize uint64
	Cgroup     uint64
}

func (c *cloneArgs) bytes() []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(c)), unsafe.Sizeof(*c))
}
