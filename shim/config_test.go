package shim

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func loadFrom(t *testing.T, text string) (Config, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv(ConfigEnv, path)
	c, _, err := LoadConfig()
	return c, err
}

// The example shipped in config/ is the defaults, spelled out.
func TestExampleConfigIsDefault(t *testing.T) {
	b, err := os.ReadFile("../config/config.toml")
	if err != nil {
		t.Fatal(err)
	}
	c, err := loadFrom(t, string(b))
	if err != nil {
		t.Fatal(err)
	}
	if c != DefaultConfig() {
		t.Errorf("example config = %+v, defaults %+v", c, DefaultConfig())
	}
}

func TestConfig(t *testing.T) {
	c, err := loadFrom(t, "listen = \"tcp:10.1.2.3:0\"\nttl = \"90s\"\nrunc_root = \"/run/x\"\n")
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "tcp:10.1.2.3:0" || c.TTL.Duration != 90*time.Second || c.RuncRoot != "/run/x" || c.RuncBinary != "runc" {
		t.Errorf("config = %+v", c)
	}
	for text, want := range map[string]string{
		"listen = \"tcp:0.0.0.0:7000\"\n": "is a wildcard: set advertise",
		"listen = \"udp:1.2.3.4:5\"\n":    "listen: parse address",
		"lisen = \"unix\"\n":              "unknown keys lisen (line 1)",
		"ttl = \"soon\"\n":                "line 1: ttl: ",
		"tls_cert = \"/c.pem\"\n":         "tls_cert and tls_key go together",
	} {
		if _, err := loadFrom(t, text); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: error %v, want one naming %q", text, err, want)
		}
	}
	if _, err := loadFrom(t, "listen = \"tcp:0.0.0.0:0\"\nadvertise = \"tcp:10.0.0.1\"\n"); err != nil {
		t.Errorf("wildcard with advertise: %v", err)
	}
	// A file named by the environment must exist; the default may not.
	t.Setenv(ConfigEnv, filepath.Join(t.TempDir(), "missing.toml"))
	if _, _, err := LoadConfig(); err == nil {
		t.Error("missing $COWMIG_CONFIG file: no error")
	}
}

func TestOwnCgroup(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "cowmig-stats.json"), []byte(`{"container_id":"src"}`), 0o600)
	for in, want := range map[string]string{
		"/ns/src":                "/ns/clone",
		"system.slice:cri:src":   "system.slice:cri:clone",
		"/ns/other":              "/ns/other",
		"/kubepods/pod1/srcsrc2": "/kubepods/pod1/srcsrc2",
	} {
		spec := specs.Spec{Linux: &specs.Linux{CgroupsPath: in}}
		if err := ownCgroup(&spec, dir, "clone"); err != nil {
			t.Fatal(err)
		}
		if spec.Linux.CgroupsPath != want {
			t.Errorf("%s -> %s, want %s", in, spec.Linux.CgroupsPath, want)
		}
	}
}
