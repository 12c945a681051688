package ctrtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/cowmig/cowmig/shim/shimapi"
)

// ModuleRoot walks up from the working directory to go.mod.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// GoTool is the go command that runs this test, else the one on PATH.
func GoTool() string {
	if p := filepath.Join(runtime.GOROOT(), "bin", "go"); fileExists(p) {
		return p
	}
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "/usr/local/go/bin/go"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// BuildCommands builds the module's commands pkgs (e.g. ./cmd/cowmig)
// into dir, where they keep their names.
func BuildCommands(dir string, pkgs ...string) error {
	root, err := ModuleRoot()
	if err != nil {
		return err
	}
	for _, pkg := range pkgs {
		build := exec.Command(GoTool(), "build", "-o", dir+"/", pkg)
		build.Dir = root
		if out, err := build.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %w\n%s", pkg, err, out)
		}
	}
	return nil
}

// CowmigHosts starts hosts A and B for the cowmig shim: containerd finds
// containerd-shim-cowmig-v2 in binDir on its PATH and imports the
// repository's drop-in config/cowmig.toml; the shim's config
// (COWMIG_CONFIG) puts page servers on the host's veth address and runc
// state in a directory of its own; extra, if given, adds lines to each
// host's shim config. Both hosts get the kvserver image.
func CowmigHosts(t testing.TB, binDir string, extra ...func(ip string) string) (a, b *Host) {
	t.Helper()
	SkipUnlessContainerd(t)
	root, err := ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	n := NewNet(t)
	start := func(ns *Netns) *Host {
		cfgDir := filepath.Join(dir, "cowmig-"+ns.IP)
		if err := os.MkdirAll(cfgDir, 0o700); err != nil {
			t.Fatal(err)
		}
		cfg := filepath.Join(cfgDir, "config.toml")
		text := fmt.Sprintf("listen = \"tcp:%s:0\"\nttl = \"2m\"\nrunc_root = %q\nstate_dir = %q\n",
			ns.IP, filepath.Join(cfgDir, "runc"), filepath.Join(cfgDir, "state"))
		for _, f := range extra {
			text += f(ns.IP)
		}
		if err := os.WriteFile(cfg, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return StartHost(t, ns, dir, Options{
			ExtraPath: binDir,
			Env:       []string{shimapi.ConfigEnv + "=" + cfg},
			Imports:   []string{filepath.Join(root, "config", "cowmig.toml")},
		})
	}
	a, b = start(n.A), start(n.B)
	tarPath, _ := BuildImage(t, dir)
	a.Import(t, tarPath)
	b.Import(t, tarPath)
	return a, b
}

// MustCtr runs ctr on h and fails the test on error.
func (h *Host) MustCtr(t testing.TB, args ...string) string {
	t.Helper()
	out, err := h.Ctr(args...)
	if err != nil {
		t.Fatalf("host %s: %v", h.name, err)
	}
	return strings.TrimSpace(out)
}

// TaskPid is the host pid of container id's task on h, and its status.
func (h *Host) TaskPid(t testing.TB, id string) (int, string) {
	t.Helper()
	for _, l := range strings.Split(h.MustCtr(t, "task", "ls"), "\n") {
		f := strings.Fields(l)
		if len(f) == 3 && f[0] == id {
			pid, _ := strconv.Atoi(f[1])
			return pid, f[2]
		}
	}
	t.Fatalf("host %s: no task %s", h.name, id)
	return 0, ""
}

// MoveImage exports image ref (a checkpoint) from h and imports it on to.
// --local: through the transfer API (the default), ctr v2.4.2 can exit 0
// before its goroutine has copied the whole stream into the file
// (core/transfer/archive ImageExportStream.MarshalAny does not wait for
// it), leaving an archive cut in a blob; --skip-manifest-json: the Docker
// manifest.json cannot describe a checkpoint index.
func (h *Host) MoveImage(t testing.TB, to *Host, ref string) {
	t.Helper()
	tar := filepath.Join(h.dir, "move.tar")
	h.MustCtr(t, "image", "export", "--local", "--skip-manifest-json", tar, ref)
	to.MustCtr(t, "image", "import", tar)
	if err := os.Remove(tar); err != nil {
		t.Fatal(err)
	}
}

// CheckpointRef extracts the image name `ctr task checkpoint` prints.
func CheckpointRef(t testing.TB, out string) string {
	t.Helper()
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "containerd.io/checkpoint/") {
			return strings.TrimSpace(l)
		}
	}
	t.Fatalf("no checkpoint image in ctr output %q", out)
	return ""
}
