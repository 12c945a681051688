package checkpoint

import (
	"fmt"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/checkpoint/procfs"
)

// fds records every open file descriptor, or refuses the dump naming the
// first one it cannot restore.
func (d *dumper) fds(p *image.Process) error {
	fds, err := procfs.Fds(d.pid)
	if err != nil {
		return fmt.Errorf("read fds: %w", err)
	}
	for _, f := range fds {
		fd := image.Fd{Num: f.Num, Flags: int(f.Flags) &^ unix.O_CLOEXEC, CloExec: f.Flags&unix.O_CLOEXEC != 0, Pos: f.Pos}
		switch f.Kind() {
		case procfs.FdFile, procfs.FdDir, procfs.FdCharDev:
			if strings.HasSuffix(f.Target, " (deleted)") {
				return unsupported(d.pid, f.Num, "deleted file "+f.Target)
			}
			if f.Kind() == procfs.FdCharDev && f.Num > 2 && !allowedDevice(f.Target) {
				return unsupported(d.pid, f.Num, "character device "+f.Target)
			}
			if f.Kind() == procfs.FdCharDev && f.Num <= 2 && !allowedDevice(f.Target) {
				fd.Kind = image.FdStdio // a terminal on stdio
				break
			}
			fd.Kind, fd.Path = image.FdFile, f.Target
		case procfs.FdFIFO:
			if f.Num <= 2 {
				fd.Kind = image.FdStdio // like an anonymous pipe on stdio
				break
			}
			fd.Kind, fd.Path = image.FdFIFO, f.Target
		case procfs.FdPipe:
			if f.Num <= 2 {
				fd.Kind = image.FdStdio
				break
			}
			fd.Kind, fd.PipeID = image.FdPipe, f.Ino
			fd.PipeRd = f.Flags&unix.O_ACCMODE == unix.O_RDONLY
			if of, err := d.tr.GetFd(f.Num); err == nil {
				if sz, err := unix.FcntlInt(of.Fd(), unix.F_GETPIPE_SZ, 0); err == nil {
					fd.PipeSz = sz
				}
				of.Close()
			}
		case procfs.FdSocket:
			s, err := d.socket(f)
			if err != nil {
				return err
			}
			fd.Kind, fd.Sock = image.FdSocket, s
		default:
			return unsupported(d.pid, f.Num, "file kind "+f.Target)
		}
		p.Fds = append(p.Fds, fd)
	}
	return nil
}

func allowedDevice(path string) bool {
	switch path {
	case "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/full":
		return true
	}
	return false
}

// socket records one socket, read through a copy of the target's fd.
func (d *dumper) socket(f procfs.Fd) (*image.Socket, error) {
	of, err := d.tr.GetFd(f.Num)
	if err != nil {
		return nil, fmt.Errorf("pid %d fd %d: take socket: %w", d.pid, f.Num, err)
	}
	defer of.Close()
	fd := int(of.Fd())
	s := &image.Socket{}
	if s.Family, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN); err != nil {
		return nil, fmt.Errorf("pid %d fd %d: socket domain: %w", d.pid, f.Num, err)
	}
	s.Type, _ = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	s.Protocol, _ = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	switch s.Family {
	case unix.AF_INET, unix.AF_INET6, unix.AF_UNIX:
	default:
		return nil, unsupported(d.pid, f.Num, fmt.Sprintf("socket family %d", s.Family))
	}
	if s.Type != unix.SOCK_STREAM && s.Type != unix.SOCK_DGRAM && s.Type != unix.SOCK_SEQPACKET {
		return nil, unsupported(d.pid, f.Num, fmt.Sprintf("socket type %d", s.Type))
	}
	if v, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); v != 0 {
		s.Listening = true
	}
	s.ReuseAddr = getBool(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR)
	s.ReusePort = getBool(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT)
	s.KeepAlive = getBool(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE)
	s.SndBuf, _ = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
	s.RcvBuf, _ = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
	if s.Family != unix.AF_UNIX && s.Type == unix.SOCK_STREAM {
		s.NoDelay = getBool(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY)
	}
	if s.Family == unix.AF_INET6 {
		s.V6Only = getBool(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY)
	}
	if _, err := unix.Getpeername(fd); err == nil {
		s.Connected = true
	}
	sa, err := unix.Getsockname(fd)
	if err == nil {
		s.Addr, s.AddrStr = encodeSockaddr(sa)
	}
	if s.Listening {
		s.Backlog = unix.SOMAXCONN
		if ino, ok := socketInode(f.Target); ok && s.Family != unix.AF_UNIX {
			if n, err := procfs.ListenBacklog(d.pid, ino); err == nil && n > 0 {
				s.Backlog = n
			}
		}
	}
	if s.Family == unix.AF_UNIX && s.Connected && s.Type != unix.SOCK_DGRAM {
		// A connected unix stream is restored closed, like a TCP one.
		s.Addr, s.AddrStr = nil, ""
	}
	return s, nil
}

func getBool(fd, level, opt int) bool {
	v, err := unix.GetsockoptInt(fd, level, opt)
	return err == nil && v != 0
}

func socketInode(target string) (uint64, bool) {
	var ino uint64
	if _, err := fmt.Sscanf(target, "socket:[%d]", &ino); err != nil {
		return 0, false
	}
	return ino, true
}

// encodeSockaddr turns a bound address into the raw sockaddr the restore
// passes to bind(2), plus a readable form.
func encodeSockaddr(sa unix.Sockaddr) ([]byte, string) {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		b := make([]byte, 16)
		b[0], b[1] = unix.AF_INET, 0
		b[2], b[3] = byte(a.Port>>8), byte(a.Port)
		copy(b[4:8], a.Addr[:])
		return b, fmt.Sprintf("%d.%d.%d.%d:%d", a.Addr[0], a.Addr[1], a.Addr[2], a.Addr[3], a.Port)
	case *unix.SockaddrInet6:
		b := make([]byte, 28)
		b[0], b[1] = unix.AF_INET6, 0
		b[2], b[3] = byte(a.Port>>8), byte(a.Port)
		copy(b[8:24], a.Addr[:])
		b[24], b[25], b[26], b[27] = byte(a.ZoneId), byte(a.ZoneId>>8), byte(a.ZoneId>>16), byte(a.ZoneId>>24)
		return b, fmt.Sprintf("[%x]:%d", a.Addr, a.Port)
	case *unix.SockaddrUnix:
		if a.Name == "" {
			return nil, ""
		}
		name := []byte(a.Name)
		if name[0] == '@' {
			name[0] = 0 // abstract
		}
		b := make([]byte, 2+len(name))
		b[0], b[1] = unix.AF_UNIX, 0
		copy(b[2:], name)
		return b, a.Name
	}
	return nil, ""
}
