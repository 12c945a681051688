package transport

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"
	"syscall"
)

// TokenSize is the length of a snapshot token from NewToken (256 bits).
const TokenSize = 32

// minTokenSize is the shortest token NewServer accepts.
const minTokenSize = 16

// socketMode is the permission of a unix socket made by Listen: only the
// owner (the shim, root) may connect; the token is the second fence.
const socketMode = 0o600

// NewToken returns TokenSize random bytes for a snapshot token.
func NewToken() ([]byte, error) {
	t := make([]byte, TokenSize)
	if _, err := rand.Read(t); err != nil {
		return nil, fmt.Errorf("read random token: %w", err)
	}
	return t, nil
}

// ParseAddr splits a page-server address into a net network and address:
// "unix:/path" and "/path" are unix sockets, "tcp:host:port" is TCP.
func ParseAddr(addr string) (network, address string, err error) {
	switch {
	case strings.HasPrefix(addr, "unix:"):
		network, address = "unix", strings.TrimPrefix(addr, "unix:")
		if address == "" {
			return "", "", fmt.Errorf("parse address %q: empty path: %w", addr, ErrBadAddress)
		}
	case strings.HasPrefix(addr, "/"):
		network, address = "unix", addr
	case strings.HasPrefix(addr, "tcp:"):
		network, address = "tcp", strings.TrimPrefix(addr, "tcp:")
		if _, _, err := net.SplitHostPort(address); err != nil {
			return "", "", fmt.Errorf("parse address %q: %w (%w)", addr, ErrBadAddress, err)
		}
	default:
		return "", "", fmt.Errorf("parse address %q: want unix:/path, /path or tcp:host:port: %w", addr, ErrBadAddress)
	}
	return network, address, nil
}

// Listen opens a listener for a page server at addr (see ParseAddr). A unix
// socket is created with mode 0600; a stale socket file at its path (one that
// nobody accepts on) is removed first, while a live one or any other kind of
// file is an error.
func Listen(addr string) (net.Listener, error) {
	network, address, err := ParseAddr(addr)
	if err != nil {
		return nil, err
	}
	if network == "tcp" {
		l, err := net.Listen(network, address)
		if err != nil {
			return nil, fmt.Errorf("listen tcp %s: %w", address, err)
		}
		return l, nil
	}
	if err := removeStaleSocket(address); err != nil {
		return nil, err
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		// Linux gives the socket file the mode of the socket's inode (minus
		// umask) at bind time (net/unix/af_unix.c:unix_bind), so a chmod
		// before bind leaves no window in which others could connect.
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = syscall.Fchmod(int(fd), socketMode) }); err != nil {
			return err
		}
		return serr
	}}
	l, err := lc.Listen(context.Background(), network, address)
	if err != nil {
		return nil, fmt.Errorf("listen unix %s: %w", address, err)
	}
	// The Fchmod above already did it; chmod again in case a kernel behaves
	// otherwise, so the mode is 0600 whatever happened.
	if err := os.Chmod(address, socketMode); err != nil {
		l.Close()
		return nil, fmt.Errorf("chmod socket %s: %w", address, err)
	}
	return l, nil
}

// removeStaleSocket removes a unix socket file at path if no one listens on
// it, so a restarted server can take the path over.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stat socket %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("listen unix %s: path exists and is not a socket: %w", path, ErrBadAddress)
	}
	c, err := net.Dial("unix", path)
	if err == nil {
		c.Close()
		return fmt.Errorf("listen unix %s: a server is already listening: %w", path, ErrBadAddress)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("probe socket %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

// dial connects to addr; on TCP with tlsCfg set it also completes the TLS
// handshake, so a certificate problem surfaces here and not on first use.
func dial(ctx context.Context, addr string, tlsCfg *tls.Config) (net.Conn, error) {
	network, address, err := ParseAddr(addr)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("dial %s %s: %w", network, address, err)
	}
	if network != "tcp" || tlsCfg == nil {
		return conn, nil
	}
	cfg := tlsCfg.Clone()
	if cfg.ServerName == "" && !cfg.InsecureSkipVerify {
		host, _, _ := net.SplitHostPort(address)
		cfg.ServerName = host
	}
	tc := tls.Client(conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", address, err)
	}
	return tc, nil
}
