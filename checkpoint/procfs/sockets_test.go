package procfs

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// inodeOf is the socket inode of a Go connection or listener, read through
// ReadFd so the fd and socket tables are checked against each other.
func inodeOf(t *testing.T, c syscall.Conn) uint64 {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd Fd
	var rerr error
	if err := rc.Control(func(n uintptr) { fd, rerr = ReadFd(os.Getpid(), int(n)) }); err != nil {
		t.Fatal(err)
	}
	if rerr != nil {
		t.Fatal(rerr)
	}
	if fd.Kind() != FdSocket || fd.Target != fmt.Sprintf("socket:[%d]", fd.Ino) {
		t.Fatalf("not a socket fd: %+v", fd)
	}
	return fd.Ino
}

func TestInetSocketsSelf(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cl, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	sv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer sv.Close()
	// 100 unread bytes on the server side; poll until they arrived.
	if _, err := cl.Write(make([]byte, 100)); err != nil {
		t.Fatal(err)
	}
	rc, _ := sv.(*net.TCPConn).SyscallConn()
	var perr error
	rc.Control(func(fd uintptr) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		_, perr = unix.Poll(pfd, 5000)
	})
	if perr != nil {
		t.Fatal(perr)
	}
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()

	socks, err := InetSockets(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	lnAddr := ln.Addr().(*net.TCPAddr).AddrPort()
	clAddr := cl.LocalAddr().(*net.TCPAddr).AddrPort()
	check := func(name string, ino uint64, want InetSocket) {
		t.Helper()
		got, ok := socks[ino]
		want.Inode = ino
		if !ok || got.Inode != want.Inode || got.Proto != want.Proto || got.Local != want.Local ||
			got.Remote != want.Remote || got.State != want.State || got.UID != uint32(os.Geteuid()) ||
			(want.RxQueue != 0 && got.RxQueue != want.RxQueue) {
			t.Errorf("%s: got %+v (found %v), want %+v", name, got, ok, want)
		}
	}
	zero4 := netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
	check("listener", inodeOf(t, ln.(*net.TCPListener)), InetSocket{Proto: "tcp", Local: lnAddr, Remote: zero4, State: TCPListen})
	check("client", inodeOf(t, cl.(*net.TCPConn)), InetSocket{Proto: "tcp", Local: clAddr, Remote: lnAddr, State: TCPEstablished})
	check("server", inodeOf(t, sv.(*net.TCPConn)), InetSocket{Proto: "tcp", Local: lnAddr, Remote: clAddr, State: TCPEstablished, RxQueue: 100})
	check("udp", inodeOf(t, pc.(*net.UDPConn)), InetSocket{Proto: "udp", Local: pc.LocalAddr().(*net.UDPAddr).AddrPort(), Remote: zero4, State: TCPClose})

	ln6, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Logf("no IPv6 loopback (%v); skipping tcp6", err)
		return
	}
	defer ln6.Close()
	socks, err = InetSockets(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	check("tcp6 listener", inodeOf(t, ln6.(*net.TCPListener)), InetSocket{Proto: "tcp6", Local: ln6.Addr().(*net.TCPAddr).AddrPort(),
		Remote: netip.AddrPortFrom(netip.IPv6Unspecified(), 0), State: TCPListen})
}

func TestUnixSocketsSelf(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "my sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	abstract := "@cowmig-procfs-" + strconv.Itoa(os.Getpid())
	aln, err := net.Listen("unix", abstract)
	if err != nil {
		t.Fatal(err)
	}
	defer aln.Close()
	dg, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(dir, "dg"), Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer dg.Close()
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pair[0])
	defer unix.Close(pair[1])
	pairFd, err := ReadFd(os.Getpid(), pair[0])
	if err != nil {
		t.Fatal(err)
	}

	socks, err := UnixSockets(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		ino  uint64
		want UnixSocket
	}{
		{"path listener", inodeOf(t, ln.(*net.UnixListener)), UnixSocket{Type: unix.SOCK_STREAM, State: 1, Listening: true, Path: path}},
		{"abstract listener", inodeOf(t, aln.(*net.UnixListener)), UnixSocket{Type: unix.SOCK_STREAM, State: 1, Listening: true, Path: abstract}},
		{"datagram", inodeOf(t, dg), UnixSocket{Type: unix.SOCK_DGRAM, State: 1, Path: filepath.Join(dir, "dg")}},
		{"seqpacket pair", pairFd.Ino, UnixSocket{Type: unix.SOCK_SEQPACKET, State: 3}},
	} {
		c.want.Inode = c.ino
		if got := socks[c.ino]; got != c.want {
			t.Errorf("%s: got %+v, want %+v", c.name, got, c.want)
		}
	}
}

// rawListener opens a TCP socket on the loopback with an explicit backlog
// and returns its fd and inode.
func rawListener(t *testing.T, family, backlog int) (int, uint64) {
	t.Helper()
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	var sa unix.Sockaddr = &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	if family == unix.AF_INET6 {
		sa = &unix.SockaddrInet6{Addr: [16]byte{15: 1}}
	}
	if err := unix.Bind(fd, sa); err != nil {
		if family == unix.AF_INET6 {
			t.Skipf("bind [::1]: %v", err)
		}
		t.Fatal(err)
	}
	if err := unix.Listen(fd, backlog); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	return fd, st.Ino
}

func TestListenBacklogSelf(t *testing.T) {
	_, ino7 := rawListener(t, unix.AF_INET, 7)
	got, err := ListenBacklog(os.Getpid(), ino7)
	if errors.Is(err, ErrNotSupported) {
		t.Skipf("inet_diag unavailable: %v", err)
	}
	if err != nil || got != 7 {
		t.Fatalf("ListenBacklog(backlog 7) = %d, %v", got, err)
	}
	// listen(2) clamps to net.core.somaxconn.
	b, err := os.ReadFile("/proc/sys/net/core/somaxconn")
	if err != nil {
		t.Fatal(err)
	}
	somax, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	_, inoBig := rawListener(t, unix.AF_INET, somax+1000)
	if got, err := ListenBacklog(os.Getpid(), inoBig); err != nil || got != somax {
		t.Errorf("ListenBacklog(backlog somaxconn+1000) = %d, %v; want %d", got, err, somax)
	}
	// A connected (non-listening) socket is not found.
	cfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(cfd)
	var st unix.Stat_t
	unix.Fstat(cfd, &st)
	if _, err := ListenBacklog(os.Getpid(), st.Ino); !errors.Is(err, ErrNotSupported) {
		t.Errorf("ListenBacklog(unbound socket) err = %v, want ErrNotSupported", err)
	}
	_, ino6 := rawListener(t, unix.AF_INET6, 3)
	if got, err := ListenBacklog(os.Getpid(), ino6); err != nil || got != 3 {
		t.Errorf("ListenBacklog(ipv6, backlog 3) = %d, %v", got, err)
	}
}

// TestSocketsOtherNetns reads the socket tables of a python3 process in a
// new network namespace (unshare -n): its listener is there and not in
// ours, and ListenBacklog enters the namespace to find it.
func TestSocketsOtherNetns(t *testing.T) {
	requireRoot(t)
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("unshare(1) not found")
	}
	pid, ino, port, err := pythonServer(t, unshare, "--net")
	if err != nil {
		t.Skipf("cannot run a process in a new network namespace: %v", err)
	}

	theirs, err := InetSockets(pid)
	if err != nil {
		t.Fatal(err)
	}
	sk, ok := theirs[ino]
	if !ok || sk.State != TCPListen || sk.Local.Port() != port || sk.Proto != "tcp" {
		t.Fatalf("socket %d in the child's netns: %+v (found %v)", ino, sk, ok)
	}
	ours, err := InetSockets(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := ours[ino]; ok {
		t.Errorf("socket %d of another netns shows in ours", ino)
	}
	got, err := ListenBacklog(pid, ino)
	if err != nil || got != 5 {
		t.Fatalf("ListenBacklog(other netns) = %d, %v; want 5", got, err)
	}
	// The calling goroutine's thread was not moved: our own lookups still
	// see our namespace.
	_, own := rawListener(t, unix.AF_INET, 9)
	if got, err := ListenBacklog(os.Getpid(), own); err != nil || got != 9 {
		t.Errorf("ListenBacklog(self) after another netns = %d, %v", got, err)
	}
}
