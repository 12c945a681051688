package shim

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/shim/shimapi"
	"github.com/cowmig/cowmig/transport"
)

// ConfigEnv names the environment variable that overrides the config
// file's path.
const ConfigEnv = shimapi.ConfigEnv

// DefaultConfigPath is read when ConfigEnv is unset; a missing file means
// the defaults.
const DefaultConfigPath = "/etc/cowmig/config.toml"

// Config is the shim's own configuration: containerd passes no runtime
// options to a non-runc runtime from ctr or nerdctl (DESIGN §4).
type Config struct {
	// Listen is the page-server address of live snapshots: "unix" (a
	// socket per snapshot under StateDir, for clones on this host) or
	// "tcp:HOST:PORT" (PORT 0 picks a free port per snapshot).
	Listen string `toml:"listen"`
	// Advertise is the address clients dial when Listen's host is a
	// wildcard ("tcp:HOST"; the picked port is appended).
	Advertise string `toml:"advertise"`
	// TTL is how long a snapshot is served after a client fetched all of
	// it; MaxAge releases it in any case (0: never).
	TTL    Duration `toml:"ttl"`
	MaxAge Duration `toml:"max_age"`
	// RuncBinary and RuncRoot are given to the runc shim.
	RuncBinary string `toml:"runc_binary"`
	RuncRoot   string `toml:"runc_root"`
	// COW is the copy-on-write method of live and full snapshots: "uffd"
	// or "fork" (see checkpoint.COW). A live checkpoint with --exit always
	// uses uffd: a fork snapshot's shadow dies with the task.
	COW string `toml:"cow"`
	// StateDir holds page-server sockets and logs.
	StateDir string `toml:"state_dir"`
	// TLSCert and TLSKey (PEM) make page servers on TCP speak TLS;
	// TLSCA (PEM) is the CA restores on this host trust for that.
	TLSCert string `toml:"tls_cert"`
	TLSKey  string `toml:"tls_key"`
	TLSCA   string `toml:"tls_ca"`
}

// Duration is a time.Duration written as "5m".
type Duration = shimapi.Duration

// DefaultConfig is the configuration without a file.
func DefaultConfig() Config {
	return Config{
		Listen:     "unix",
		COW:        string(checkpoint.COWUffd),
		TTL:        Duration{Duration: 5 * time.Minute},
		MaxAge:     Duration{Duration: time.Hour},
		RuncBinary: "runc",
		RuncRoot:   "/run/containerd/runc",
		StateDir:   "/run/cowmig",
	}
}

// LoadConfig reads the file named by ConfigEnv or DefaultConfigPath over
// the defaults. A missing default file is not an error; a missing file
// named by the environment is.
func LoadConfig() (Config, string, error) {
	path, explicit := os.LookupEnv(ConfigEnv)
	if !explicit || path == "" {
		path, explicit = DefaultConfigPath, false
	}
	c := DefaultConfig()
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist) && !explicit:
		return c, "", nil
	case err != nil:
		return c, path, fmt.Errorf("read cowmig config: %w", err)
	}
	d := toml.NewDecoder(strings.NewReader(string(b)))
	d.DisallowUnknownFields()
	if err := d.Decode(&c); err != nil {
		return c, path, fmt.Errorf("parse cowmig config %s: %w", path, tomlError(err))
	}
	if err := c.Validate(); err != nil {
		return c, path, fmt.Errorf("cowmig config %s: %w", path, err)
	}
	return c, path, nil
}

// tomlError names the keys and lines a TOML error is about.
func tomlError(err error) error {
	var missing *toml.StrictMissingError
	if errors.As(err, &missing) {
		var keys []string
		for _, e := range missing.Errors {
			row, _ := e.Position()
			keys = append(keys, fmt.Sprintf("%s (line %d)", strings.Join(e.Key(), "."), row))
		}
		return fmt.Errorf("unknown keys %s", strings.Join(keys, ", "))
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, _ := de.Position()
		return fmt.Errorf("line %d: %s: %w", row, strings.Join(de.Key(), "."), err)
	}
	return err
}

// Validate checks the page-server addresses.
func (c Config) Validate() error {
	if !checkpoint.COW(c.COW).Valid() {
		return fmt.Errorf("cow %q: want uffd or fork", c.COW)
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		return errors.New("tls_cert and tls_key go together")
	}
	if c.Listen == "unix" {
		return nil
	}
	network, addr, err := transport.ParseAddr(c.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	if network != "tcp" {
		return fmt.Errorf("listen %q: want \"unix\" or tcp:HOST:PORT", c.Listen)
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("listen %q: %w", c.Listen, err)
	}
	if ip := net.ParseIP(host); (host == "" || ip != nil && ip.IsUnspecified()) && c.Advertise == "" {
		return fmt.Errorf("listen %q is a wildcard: set advertise to the address clones dial", c.Listen)
	}
	if c.Advertise != "" && !strings.HasPrefix(c.Advertise, "tcp:") {
		return fmt.Errorf("advertise %q: want tcp:HOST", c.Advertise)
	}
	return nil
}
