package inject

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

const (
	// maxFdsPerMsg is how many fds one SCM_RIGHTS message carries (the
	// kernel's limit, SCM_MAX_FD, is 253).
	maxFdsPerMsg = 250
	// userfaultfdIocNew is USERFAULTFD_IOC_NEW, _IO(0xAA, 0x00)
	// (include/uapi/linux/userfaultfd.h).
	userfaultfdIocNew = 0xAA00

	// Layout of the helpers' part of the scratch mapping (see
	// ScratchUserSize) for InstallFds: the socketpair's two fds at svOff;
	// the injected recvmsg's struct msghdr (56 bytes) at msgOff, followed
	// by its struct iovec (16), one data byte, and the control buffer
	// (16-aligned, at most CmsgSpace(4*maxFdsPerMsg) = 1016 bytes).
	svOff      = 0
	msgOff     = 64
	msghdrSize = 56
	iovOff     = msgOff + msghdrSize
	dataOff    = iovOff + 16
	ctlOff     = msgOff + 80
)

// GetFd returns a duplicate of the tracee's fd (pidfd_getfd; no injection,
// the tracee need not be stopped). The returned file is close-on-exec.
func (p *Process) GetFd(fd int) (*os.File, error) {
	rc, err := p.pidfd.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("get fd %d of %d: %w", fd, p.pid, p.closedErr(err))
	}
	nfd, gerr := -1, error(nil)
	if err := rc.Control(func(pfd uintptr) {
		nfd, gerr = unix.PidfdGetfd(int(pfd), fd, 0)
	}); err != nil {
		return nil, fmt.Errorf("get fd %d of %d: %w", fd, p.pid, p.closedErr(err))
	}
	if gerr != nil {
		if gerr == unix.ESRCH {
			gerr = fmt.Errorf("%w: %w", ErrTraceeGone, gerr)
		}
		return nil, fmt.Errorf("pidfd_getfd %d of %d: %w", fd, p.pid, gerr)
	}
	return os.NewFile(uintptr(nfd), fmt.Sprintf("pid%d:fd%d", p.pid, fd)), nil
}

// InstallFds puts duplicates of files into the tracee and returns their fd
// numbers there (close-on-exec). It injects a socketpair, takes one end out
// with pidfd_getfd, sends the files over it with SCM_RIGHTS and injects
// recvmsg on the other end; the socketpair is closed in the tracee on every
// path, and on error no new fd is left in the tracee. It uses the helpers'
// part of the scratch mapping (see ScratchUserSize).
func (p *Process) InstallFds(files []*os.File) ([]int, error) {
	var out []int
	err := p.do(func() error {
		var err error
		out, err = p.installFds(files)
		return err
	})
	return out, err
}

// NewUffd returns a userfaultfd that acts on the tracee's address space:
// created inside the tracee, then taken out with pidfd_getfd. It injects
// userfaultfd(flags); if the tracee may not (EPERM, EACCES, ENOSYS: no
// CAP_SYS_PTRACE with vm.unprivileged_userfaultfd=0, or seccomp), it
// installs an fd of /dev/userfaultfd in the tracee and injects
// ioctl(USERFAULTFD_IOC_NEW, flags). Every fd it made in the tracee is
// closed again on every path.
func (p *Process) NewUffd(flags int) (*os.File, error) {
	var f *os.File
	err := p.do(func() error {
		var err error
		f, err = p.newUffd(flags)
		return err
	})
	return f, err
}

// closeRemote injects close(fd) in th.
//
// Preconditions: runs on the tracer goroutine.
func (p *Process) closeRemote(th *thread, fd int) error {
	if _, err := p.syscall(th, unix.SYS_CLOSE, [6]uintptr{uintptr(fd)}); err != nil {
		return fmt.Errorf("close fd %d in %d: %w", fd, p.pid, err)
	}
	return nil
}

// installFds is InstallFds on the tracer goroutine.
func (p *Process) installFds(files []*os.File) (_ []int, err error) {
	if len(files) == 0 {
		return nil, nil
	}
	th, err := p.anyThread()
	if err != nil {
		return nil, err
	}
	base, err := p.scratchAddr()
	if err != nil {
		return nil, err
	}
	base += ScratchUserSize
	if _, err := p.syscall(th, unix.SYS_SOCKETPAIR, [6]uintptr{unix.AF_UNIX,
		unix.SOCK_SEQPACKET | unix.SOCK_CLOEXEC, 0, uintptr(base + svOff)}); err != nil {
		return nil, fmt.Errorf("install fds: %w", err)
	}
	var svb [8]byte
	if err := p.ReadMem(base+svOff, svb[:]); err != nil {
		return nil, fmt.Errorf("install fds: read socketpair: %w (its fds are left in the tracee)", err)
	}
	sv := [2]int{int(int32(binary.LittleEndian.Uint32(svb[0:]))), int(int32(binary.LittleEndian.Uint32(svb[4:])))}
	defer func() {
		err = errors.Join(err, p.closeRemote(th, sv[0]), p.closeRemote(th, sv[1]))
	}()
	ours, err := p.GetFd(sv[1])
	if err != nil {
		return nil, fmt.Errorf("install fds: %w", err)
	}
	defer ours.Close()

	var installed []int
	defer func() {
		if err != nil {
			for _, fd := range installed {
				err = errors.Join(err, p.closeRemote(th, fd))
			}
			installed = nil
		}
	}()
	for len(files) > 0 {
		chunk := files[:min(len(files), maxFdsPerMsg)]
		files = files[len(chunk):]
		fds, err := p.passChunk(th, base, sv[0], ours, chunk)
		installed = append(installed, fds...)
		if err != nil {
			return nil, fmt.Errorf("install fds: %w", err)
		}
	}
	return installed, nil
}

// passChunk sends files over ours and injects the recvmsg that receives
// them on the tracee's socket sv0, using the helper area at base. It
// returns the fds received, also on error, so the caller can close them.
func (p *Process) passChunk(th *thread, base uint64, sv0 int, ours *os.File, files []*os.File) ([]int, error) {
	dups, err := dupFiles(files)
	defer func() {
		for _, fd := range dups {
			unix.Close(fd)
		}
	}()
	if err != nil {
		return nil, err
	}
	rc, err := ours.SyscallConn()
	if err != nil {
		return nil, err
	}
	var sendErr error
	if err := rc.Control(func(fd uintptr) {
		sendErr = unix.Sendmsg(int(fd), []byte{0}, unix.UnixRights(dups...), nil, unix.MSG_NOSIGNAL|unix.MSG_DONTWAIT)
	}); err != nil {
		return nil, err
	}
	if sendErr != nil {
		return nil, fmt.Errorf("sendmsg: %w", sendErr)
	}

	ctlLen := unix.CmsgSpace(4 * len(files))
	le := binary.LittleEndian
	hdr := make([]byte, ctlOff-msgOff)
	le.PutUint64(hdr[16:], base+iovOff)             // msg_iov
	le.PutUint64(hdr[24:], 1)                       // msg_iovlen
	le.PutUint64(hdr[32:], base+ctlOff)             // msg_control
	le.PutUint64(hdr[40:], uint64(ctlLen))          // msg_controllen
	le.PutUint64(hdr[iovOff-msgOff:], base+dataOff) // iov_base
	le.PutUint64(hdr[iovOff-msgOff+8:], 1)          // iov_len
	if err := p.WriteMem(base+msgOff, hdr); err != nil {
		return nil, err
	}
	n, err := p.syscall(th, unix.SYS_RECVMSG, [6]uintptr{uintptr(sv0), uintptr(base + msgOff),
		unix.MSG_CMSG_CLOEXEC | unix.MSG_DONTWAIT})
	if err != nil {
		return nil, err
	}
	back := make([]byte, ctlOff-msgOff+ctlLen)
	if err := p.ReadMem(base+msgOff, back); err != nil {
		return nil, err
	}
	gotCtl := int(le.Uint64(back[40:]))
	flags := int32(le.Uint32(back[48:]))
	var fds []int
	if gotCtl > 0 && gotCtl <= ctlLen {
		msgs, err := unix.ParseSocketControlMessage(back[ctlOff-msgOff : ctlOff-msgOff+gotCtl])
		if err != nil {
			return nil, fmt.Errorf("parse cmsg: %w", err)
		}
		for _, m := range msgs {
			r, err := unix.ParseUnixRights(&m)
			if err != nil {
				return fds, fmt.Errorf("parse cmsg: %w", err)
			}
			fds = append(fds, r...)
		}
	}
	if n != 1 || flags&unix.MSG_CTRUNC != 0 || len(fds) != len(files) {
		return fds, fmt.Errorf("recvmsg in tracee: %d bytes, flags %#x, %d of %d fds (fd limit?): %w",
			n, flags, len(fds), len(files), unix.EMFILE)
	}
	return fds, nil
}

// dupFiles duplicates the fds of files, so that the files may be closed
// concurrently without the numbers being reused under us.
func dupFiles(files []*os.File) ([]int, error) {
	fds := make([]int, 0, len(files))
	for _, f := range files {
		rc, err := f.SyscallConn()
		if err != nil {
			return fds, fmt.Errorf("fd of %s: %w", f.Name(), err)
		}
		var derr error
		if err := rc.Control(func(fd uintptr) {
			var nfd int
			nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
			if derr == nil {
				fds = append(fds, nfd)
			}
		}); err != nil {
			return fds, fmt.Errorf("fd of %s: %w", f.Name(), err)
		}
		if derr != nil {
			return fds, fmt.Errorf("dup fd of %s: %w", f.Name(), derr)
		}
	}
	return fds, nil
}

// newUffd is NewUffd on the tracer goroutine.
func (p *Process) newUffd(flags int) (_ *os.File, err error) {
	th, err := p.anyThread()
	if err != nil {
		return nil, err
	}
	ret, err := p.syscall(th, unix.SYS_USERFAULTFD, [6]uintptr{uintptr(flags)})
	if err != nil {
		if !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EACCES) && !errors.Is(err, unix.ENOSYS) {
			return nil, fmt.Errorf("new uffd: %w", err)
		}
		ret, err = p.uffdFromDev(th, flags)
		if err != nil {
			return nil, fmt.Errorf("new uffd: %w", err)
		}
	}
	tfd := int(ret)
	defer func() { err = errors.Join(err, p.closeRemote(th, tfd)) }()
	f, err := p.GetFd(tfd)
	if err != nil {
		return nil, fmt.Errorf("new uffd: %w", err)
	}
	return f, nil
}

// uffdFromDev makes a userfaultfd in the tracee from an fd of
// /dev/userfaultfd that we open and install there, and returns its number
// in the tracee.
func (p *Process) uffdFromDev(th *thread, flags int) (_ uintptr, err error) {
	dev, err := os.OpenFile("/dev/userfaultfd", os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer dev.Close()
	fds, err := p.installFds([]*os.File{dev})
	if err != nil {
		return 0, fmt.Errorf("/dev/userfaultfd: %w", err)
	}
	defer func() { err = errors.Join(err, p.closeRemote(th, fds[0])) }()
	ret, err := p.syscall(th, unix.SYS_IOCTL, [6]uintptr{uintptr(fds[0]), userfaultfdIocNew, uintptr(flags)})
	if err != nil {
		return 0, fmt.Errorf("/dev/userfaultfd: %w", err)
	}
	return ret, nil
}
