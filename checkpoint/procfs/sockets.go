package procfs

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"strconv"
	"strings"
)

// TCP states as /proc/net/tcp prints them (include/net/tcp_states.h).
const (
	TCPEstablished = 1
	TCPSynSent     = 2
	TCPSynRecv     = 3
	TCPFinWait1    = 4
	TCPFinWait2    = 5
	TCPTimeWait    = 6
	TCPClose       = 7 // also every unconnected UDP socket
	TCPCloseWait   = 8
	TCPLastAck     = 9
	TCPListen      = 10
	TCPClosing     = 11
	TCPNewSynRecv  = 12
)

// unixAcceptCon is __SO_ACCEPTCON in the Flags column of /proc/net/unix: the
// socket is listening.
const unixAcceptCon = 0x10000

// InetSocket is one row of /proc/PID/net/{tcp,tcp6,udp,udp6}.
type InetSocket struct {
	Inode  uint64
	Proto  string // "tcp", "tcp6", "udp", "udp6"
	Local  netip.AddrPort
	Remote netip.AddrPort
	// State is a TCP state (TCPListen, TCPEstablished, …); UDP sockets
	// report TCPEstablished when connected and TCPClose otherwise.
	State            uint8
	TxQueue, RxQueue uint32
	UID              uint32
}

// UnixSocket is one row of /proc/PID/net/unix.
type UnixSocket struct {
	Inode uint64
	Type  int // unix.SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
	// State is the socket_state: 1 SS_UNCONNECTED, 2 SS_CONNECTING,
	// 3 SS_CONNECTED, 4 SS_DISCONNECTING.
	State     int
	Listening bool
	// Path is the bound address: "" when unbound, "@name" for the abstract
	// namespace (the kernel prints NUL bytes as '@'), else a filesystem path
	// as the binder gave it.
	Path string
}

var inetFiles = [...]string{"tcp", "tcp6", "udp", "udp6"}

// InetSockets reads every TCP and UDP socket of pid's network namespace
// (not only pid's own), keyed by inode. A protocol whose table is missing
// (IPv6 disabled) contributes nothing.
func InetSockets(pid int) (map[uint64]InetSocket, error) {
	out := make(map[uint64]InetSocket)
	for _, proto := range inetFiles {
		path := procPath(pid, "net", proto)
		b, err := os.ReadFile(path)
		if errors.Is(err, os.ErrNotExist) {
			if _, serr := os.Stat(procPath(pid)); serr != nil {
				return nil, wrap("stat "+procPath(pid), serr)
			}
			continue
		}
		if err != nil {
			return nil, wrap("read "+path, err)
		}
		if err := ParseInetSockets(proto, string(b), out); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// ParseInetSockets parses one /proc/net/{tcp,tcp6,udp,udp6} table (header
// line included) into out. Rows without an inode (TIME_WAIT, SYN_RECV) are
// skipped.
func ParseInetSockets(proto, s string, out map[uint64]InetSocket) error {
	v6 := strings.HasSuffix(proto, "6")
	first := true
	for line := range strings.Lines(s) {
		if first {
			first = false
			continue // header
		}
		line = strings.TrimSuffix(line, "\n")
		if strings.TrimSpace(line) == "" {
			continue
		}
		sk, err := parseInetLine(proto, v6, line)
		if err != nil {
			return err
		}
		// TIME_WAIT and request (SYN_RECV) sockets have no inode and
		// belong to no descriptor.
		if sk.Inode != 0 {
			out[sk.Inode] = sk
		}
	}
	return nil
}

// parseInetLine parses a row printed by get_tcp4_sock/udp4_format_sock and
// their v6 twins:
//
//	sl local rem st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode …
func parseInetLine(proto string, v6 bool, line string) (InetSocket, error) {
	f := strings.Fields(line)
	bad := func() (InetSocket, error) { return InetSocket{}, parseErr(proto+" line", line) }
	if len(f) < 10 || !strings.HasSuffix(f[0], ":") {
		return bad()
	}
	sk := InetSocket{Proto: proto}
	var ok bool
	if sk.Local, ok = parseHexAddrPort(f[1], v6); !ok {
		return bad()
	}
	if sk.Remote, ok = parseHexAddrPort(f[2], v6); !ok {
		return bad()
	}
	st, err := strconv.ParseUint(f[3], 16, 8)
	if err != nil {
		return bad()
	}
	sk.State = uint8(st)
	tx, rx, ok := strings.Cut(f[4], ":")
	if !ok {
		return bad()
	}
	t, err1 := strconv.ParseUint(tx, 16, 32)
	r, err2 := strconv.ParseUint(rx, 16, 32)
	if err1 != nil || err2 != nil {
		return bad()
	}
	sk.TxQueue, sk.RxQueue = uint32(t), uint32(r)
	uid, err := strconv.ParseUint(f[7], 10, 32)
	if err != nil {
		return bad()
	}
	sk.UID = uint32(uid)
	if sk.Inode, err = strconv.ParseUint(f[9], 10, 64); err != nil {
		return bad()
	}
	return sk, nil
}

// parseHexAddrPort decodes "0100007F:1F90". The kernel prints each 32-bit
// word of the network-order address as a host-order integer (%08X), so the
// bytes come back by storing each word in native order; the port is printed
// already converted to host order.
func parseHexAddrPort(s string, v6 bool) (netip.AddrPort, bool) {
	a, p, ok := strings.Cut(s, ":")
	want := 8
	if v6 {
		want = 32
	}
	if !ok || len(a) != want || len(p) != 4 {
		return netip.AddrPort{}, false
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, false
	}
	var b [16]byte
	for i := 0; i < want/8; i++ {
		w, err := strconv.ParseUint(a[i*8:i*8+8], 16, 32)
		if err != nil {
			return netip.AddrPort{}, false
		}
		binary.NativeEndian.PutUint32(b[i*4:], uint32(w))
	}
	var addr netip.Addr
	if v6 {
		addr = netip.AddrFrom16(b)
	} else {
		addr = netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrPortFrom(addr, uint16(port)), true
}

// UnixSockets reads every unix socket of pid's network namespace, keyed by
// inode.
func UnixSockets(pid int) (map[uint64]UnixSocket, error) {
	b, err := readFile(procPath(pid, "net", "unix"))
	if err != nil {
		return nil, err
	}
	out := make(map[uint64]UnixSocket)
	if err := ParseUnixSockets(string(b), out); err != nil {
		return nil, err
	}
	return out, nil
}

// ParseUnixSockets parses /proc/net/unix (header line included) into out.
// Rows look like (net/unix/af_unix.c unix_seq_show):
//
//	0000000000000000: 00000002 00000000 00010000 0001 01 12345 /run/x.sock
//
// The inode is right-aligned in five columns and the path follows one space
// after it, so a path may contain spaces. A path containing '\n' cannot be
// told apart from a new row; such a row fails to parse.
func ParseUnixSockets(s string, out map[uint64]UnixSocket) error {
	first := true
	for line := range strings.Lines(s) {
		if first {
			first = false
			continue
		}
		line = strings.TrimSuffix(line, "\n")
		if strings.TrimSpace(line) == "" {
			continue
		}
		sk, err := parseUnixLine(line)
		if err != nil {
			return err
		}
		out[sk.Inode] = sk
	}
	return nil
}

func parseUnixLine(line string) (UnixSocket, error) {
	bad := func() (UnixSocket, error) { return UnixSocket{}, parseErr("unix line", line) }
	// Walk the first seven space-separated columns by hand to find where
	// the path starts.
	var cols [7]string
	rest := line
	for i := range cols {
		rest = strings.TrimLeft(rest, " ")
		end := strings.IndexByte(rest, ' ')
		if end < 0 {
			end = len(rest)
		}
		cols[i], rest = rest[:end], rest[end:]
		if cols[i] == "" {
			return bad()
		}
	}
	if !strings.HasSuffix(cols[0], ":") {
		return bad()
	}
	flags, err1 := strconv.ParseUint(cols[3], 16, 32)
	typ, err2 := strconv.ParseUint(cols[4], 16, 16)
	st, err3 := strconv.ParseUint(cols[5], 16, 8)
	ino, err4 := strconv.ParseUint(cols[6], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || err4 != nil {
		return bad()
	}
	return UnixSocket{
		Inode:     ino,
		Type:      int(typ),
		State:     int(st),
		Listening: flags&unixAcceptCon != 0,
		Path:      strings.TrimPrefix(rest, " "),
	}, nil
}
