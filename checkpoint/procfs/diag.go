package procfs

// This file is self-contained: it answers one question, the backlog of a
// listening TCP socket, which /proc/net/tcp does not show. It asks the
// kernel through NETLINK_SOCK_DIAG (linux/inet_diag.h), where a listening
// socket reports sk_ack_backlog as idiag_rqueue and sk_max_ack_backlog (the
// listen(2) backlog after the somaxconn clamp) as idiag_wqueue
// (net/ipv4/tcp_diag.c tcp_diag_get_info).

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

const (
	// sizeof(struct inet_diag_req_v2): family, protocol, ext, pad (1 byte
	// each), states (u32), struct inet_diag_sockid (48 bytes).
	inetDiagReqV2Len = 56
	// sizeof(struct inet_diag_msg): family, state, timer, retrans, the
	// 48-byte sockid, then expires, rqueue, wqueue, uid, inode (u32 each).
	inetDiagMsgLen    = 72
	inetDiagMsgWqueue = 60
	inetDiagMsgInode  = 68
)

// ListenBacklog returns the listen(2) backlog of the listening TCP socket
// (IPv4 or IPv6) with inode ino in the network namespace of netnsPid. When
// that namespace is not the caller's, a netlink socket is created inside it
// from a dedicated OS thread (needs CAP_SYS_ADMIN). The error wraps
// ErrNotSupported when the kernel has no inet_diag or no listening socket
// with that inode exists.
func ListenBacklog(netnsPid int, ino uint64) (int, error) {
	fd, err := diagSocketIn(netnsPid)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	for i, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		backlog, found, err := diagFindListener(fd, family, uint32(i+1), ino)
		if err != nil {
			return 0, err
		}
		if found {
			return backlog, nil
		}
	}
	return 0, fmt.Errorf("find listening tcp socket inode %d in netns of pid %d: %w", ino, netnsPid, ErrNotSupported)
}

// diagSocketIn opens a NETLINK_SOCK_DIAG socket in pid's network namespace.
// A socket stays in the namespace it was created in, so only its creation
// needs to happen there.
func diagSocketIn(pid int) (int, error) {
	same, err := sameNetns(pid)
	if err != nil {
		return -1, err
	}
	if same {
		return diagSocket()
	}
	type result struct {
		fd  int
		err error
	}
	done := make(chan result, 1)
	// The goroutine ends by itself after one socket(2) and is waited for on
	// done. If switching back fails it returns still locked, and the
	// runtime then destroys the thread instead of reusing it in the wrong
	// namespace.
	go func() {
		runtime.LockOSThread()
		fd, restored, err := diagSocketSetns(pid)
		if restored {
			runtime.UnlockOSThread()
		}
		done <- result{fd, err}
	}()
	r := <-done
	return r.fd, r.err
}

// diagSocketSetns runs on a locked thread: enter pid's netns, create the
// socket, return to the thread's original netns. restored reports that the
// thread is back where it started.
func diagSocketSetns(pid int) (fd int, restored bool, err error) {
	const self = "/proc/thread-self/ns/net"
	orig, err := unix.Open(self, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, true, wrap("open "+self, err)
	}
	defer unix.Close(orig)
	path := procPath(pid, "ns", "net")
	target, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, true, wrap("open "+path, err)
	}
	defer unix.Close(target)
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		return -1, true, fmt.Errorf("setns %s: %w", path, err)
	}
	fd, sockErr := diagSocket()
	if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
		if sockErr == nil {
			unix.Close(fd)
		}
		return -1, false, fmt.Errorf("setns back to %s: %w", self, err)
	}
	return fd, true, sockErr
}

func diagSocket() (int, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		if errors.Is(err, unix.EPROTONOSUPPORT) {
			return -1, fmt.Errorf("socket netlink sock_diag: %w: %w", ErrNotSupported, err)
		}
		return -1, fmt.Errorf("socket netlink sock_diag: %w", err)
	}
	// The kernel answers a dump synchronously; the timeout only bounds a
	// kernel that never does.
	tv := unix.Timeval{Sec: 5}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("setsockopt SO_RCVTIMEO: %w", err)
	}
	return fd, nil
}

// sameNetns compares the caller's network namespace with pid's.
func sameNetns(pid int) (bool, error) {
	var a, b unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &a); err != nil {
		return false, fmt.Errorf("stat own netns: %w", err)
	}
	path := procPath(pid, "ns", "net")
	if err := unix.Stat(path, &b); err != nil {
		return false, wrap("stat "+path, err)
	}
	return a.Dev == b.Dev && a.Ino == b.Ino, nil
}

// diagFindListener dumps the listening TCP sockets of one address family
// and looks for inode ino.
func diagFindListener(fd int, family uint8, seq uint32, ino uint64) (backlog int, found bool, err error) {
	req := make([]byte, unix.NLMSG_HDRLEN+inetDiagReqV2Len)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(req[8:], seq)
	body := req[unix.NLMSG_HDRLEN:]
	body[0] = family
	body[1] = unix.IPPROTO_TCP
	ne.PutUint32(body[4:], 1<<TCPListen) // idiag_states
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, false, fmt.Errorf("send inet_diag dump family %d: %w", family, err)
	}
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return 0, false, fmt.Errorf("receive inet_diag dump family %d: %w", family, err)
		}
		msgs, err := splitNetlink(buf[:n])
		if err != nil {
			return 0, false, err
		}
		for _, m := range msgs {
			if m.seq != seq {
				continue
			}
			switch m.typ {
			case unix.NLMSG_DONE:
				return backlog, found, nil
			case unix.NLMSG_ERROR:
				if len(m.data) < 4 {
					return 0, false, fmt.Errorf("inet_diag error reply: %w", ErrParse)
				}
				errno := unix.Errno(-int32(ne.Uint32(m.data)))
				if errno == unix.ENOENT {
					// No inet_diag handler for this family (module absent).
					return 0, false, fmt.Errorf("inet_diag dump family %d: %w: %w", family, ErrNotSupported, errno)
				}
				return 0, false, fmt.Errorf("inet_diag dump family %d: %w", family, errno)
			case unix.SOCK_DIAG_BY_FAMILY:
				if len(m.data) < inetDiagMsgLen {
					return 0, false, fmt.Errorf("inet_diag message of %d bytes: %w", len(m.data), ErrParse)
				}
				if uint64(ne.Uint32(m.data[inetDiagMsgInode:])) == ino && !found {
					backlog, found = int(ne.Uint32(m.data[inetDiagMsgWqueue:])), true
				}
			}
		}
	}
}

type netlinkMsg struct {
	typ  uint16
	seq  uint32
	data []byte
}

// splitNetlink cuts one datagram into its netlink messages (struct nlmsghdr
// followed by NLMSG_ALIGN'ed payloads).
func splitNetlink(b []byte) ([]netlinkMsg, error) {
	var out []netlinkMsg
	ne := binary.NativeEndian
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(ne.Uint32(b[0:]))
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return nil, fmt.Errorf("netlink message length %d of %d bytes: %w", l, len(b), ErrParse)
		}
		out = append(out, netlinkMsg{typ: ne.Uint16(b[4:]), seq: ne.Uint32(b[8:]), data: b[unix.NLMSG_HDRLEN:l]})
		l = (l + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1)
		if l > len(b) {
			break
		}
		b = b[l:]
	}
	return out, nil
}
