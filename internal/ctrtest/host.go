package ctrtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// CommandTimeout bounds every ctr, nerdctl and Exec command a Host runs.
const CommandTimeout = 2 * time.Minute

// startTimeout bounds containerd's start (it takes ~0.1 s here).
const startTimeout = 30 * time.Second

// stopTimeout is how long containerd gets to exit after SIGTERM.
const stopTimeout = 10 * time.Second

// basePath follows Options.ExtraPath in containerd's PATH.
const basePath = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Options configure one Host.
type Options struct {
	// ExtraPath goes in front of containerd's PATH, which its shims
	// inherit: the directory holding containerd-shim-cowmig-v2 (the
	// repository's bin/). May hold several directories joined by ':'.
	ExtraPath string
	// Env adds KEY=VALUE entries to containerd's environment (and so its
	// shims'), e.g. COWMIG_CONFIG=/path/to/config.
	Env []string
	// Imports are extra containerd config files (drop-ins) the host's
	// config.toml imports, in order: absolute paths or globs. An explicit
	// config does not get the default /etc/containerd/conf.d/*.toml.
	Imports []string
	// Namespace is the containerd namespace Ctr and Nerdctl use. Default:
	// "host<name>-<Net.ID>", unique so that parallel and leftover runs
	// never share runc state (/run/containerd/runc/<ns>/<id>) or cgroups
	// (/<ns>/<id>): the runc shim keeps both outside containerd's state
	// directory.
	Namespace string
	// Debug sets containerd's log level to debug.
	Debug bool
}

// Host is one containerd instance running in a network namespace of a Net
// and in the host's mount namespace, with its own root, state, gRPC and
// ttrpc addresses and config file.
type Host struct {
	name       string // "a" or "b"
	netns      *Netns
	namespace  string
	dir        string // per-host files: config, log, root, nerdctl data
	root       string
	state      string
	address    string
	configPath string
	logPath    string
	env        []string

	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been waited for
	err    error         // cmd.Wait's result; read after exited is closed
}

// NewHosts makes a Net and starts host "a" (IPA) with options a and host
// "b" (IPB) with options b on it. Host files go under dir/a and dir/b.
// Everything is torn down at t.Cleanup. It skips the test unless root and
// the containerd tools are there (see SkipUnlessContainerd).
func NewHosts(t testing.TB, dir string, a, b Options) (*Host, *Host) {
	t.Helper()
	SkipUnlessContainerd(t)
	n := NewNet(t)
	return StartHost(t, n.A, dir, a), StartHost(t, n.B, dir, b)
}

// StartHost starts containerd in network namespace ns (an end of a Net)
// with files under dir/<a|b> and waits until it answers `ctr version`. At
// t.Cleanup it kills and deletes every task and container, stops
// containerd, kills whatever is left in the network namespace (shims,
// page servers, host-network containers) or in the host's cgroups, and
// unmounts what is left under its root and state; if the test failed it
// logs the end of containerd's log.
func StartHost(t testing.TB, ns *Netns, dir string, opts Options) *Host {
	t.Helper()
	SkipUnlessContainerd(t)
	name := ns.Name[len(ns.Name)-1:]
	h := &Host{
		name:      name,
		netns:     ns,
		namespace: opts.Namespace,
		dir:       filepath.Join(dir, name),
		exited:    make(chan struct{}),
	}
	if h.namespace == "" {
		h.namespace = "host" + name + "-" + ns.net.ID
	}
	run := filepath.Join(ns.net.runDir, name)
	h.root = filepath.Join(h.dir, "root")
	h.state = filepath.Join(run, "state")
	h.address = filepath.Join(run, "containerd.sock")
	h.configPath = filepath.Join(h.dir, "config.toml")
	h.logPath = filepath.Join(h.dir, "containerd.log")
	extra := opts.ExtraPath
	if extra != "" {
		extra += ":"
	}
	h.env = append([]string{"PATH=" + extra + basePath}, opts.Env...)

	for _, d := range []string{h.dir, h.root, run, filepath.Join(h.dir, "cni", "net.d")} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			t.Fatalf("create %s: %v", d, err)
		}
	}
	if err := errors.Join(ns.net.record("root "+h.dir), ns.net.record("ns "+h.namespace)); err != nil {
		t.Fatalf("host %s: %v", name, err)
	}
	if err := h.writeConfig(opts); err != nil {
		t.Fatalf("host %s: %v", name, err)
	}
	// nerdctl reads /etc/nerdctl/nerdctl.toml unless told otherwise.
	if err := os.WriteFile(filepath.Join(h.dir, "nerdctl.toml"), nil, 0o644); err != nil {
		t.Fatalf("host %s: write nerdctl.toml: %v", name, err)
	}
	logf, err := os.Create(h.logPath)
	if err != nil {
		t.Fatalf("host %s: create log: %v", name, err)
	}
	defer logf.Close() // containerd has its own copy of the fd

	containerd, err := exec.LookPath("containerd")
	if err != nil {
		t.Fatalf("host %s: %v", name, err)
	}
	// nsenter execs containerd (no --fork is needed for a network
	// namespace), so cmd.Process is containerd itself. No Pdeathsig: it
	// fires when the starting OS thread exits, and threads that entered a
	// netns (Query) exit with their goroutine; sweepLeftovers cleans up
	// after killed runs instead.
	h.cmd = exec.Command("nsenter", "--net="+ns.Path(), "--", containerd, "--config", h.configPath)
	h.cmd.Env = h.env
	h.cmd.Stdout = logf
	h.cmd.Stderr = logf
	h.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // no terminal signals from the test's group
	if err := h.cmd.Start(); err != nil {
		t.Fatalf("host %s: start containerd: %v", name, err)
	}
	go func() {
		h.err = h.cmd.Wait()
		close(h.exited)
	}()
	t.Cleanup(func() { h.cleanup(t) })

	if err := h.waitReady(); err != nil {
		t.Fatalf("host %s: %v", name, err)
	}
	return h
}

// Pid is containerd's process id.
func (h *Host) Pid() int { return h.cmd.Process.Pid }

// Name is "a" or "b".
func (h *Host) Name() string { return h.name }

// Netns is the host's network namespace.
func (h *Host) Netns() *Netns { return h.netns }

// IP is the host's address on the veth link.
func (h *Host) IP() string { return h.netns.IP }

// Dir holds the host's config.toml, containerd.log, root/ and nerdctl
// data (nerdctl/, cni/, nerdctl.toml).
func (h *Host) Dir() string { return h.dir }

// Root and State are containerd's root and state directories.
func (h *Host) Root() string  { return h.root }
func (h *Host) State() string { return h.state }

// Address is containerd's gRPC socket; its ttrpc socket is Address()+".ttrpc".
func (h *Host) Address() string { return h.address }

// Namespace is the containerd namespace Ctr and Nerdctl use.
func (h *Host) Namespace() string { return h.namespace }

// ConfigPath is the host's containerd config file.
func (h *Host) ConfigPath() string { return h.configPath }

// Env is containerd's environment: PATH and Options.Env.
func (h *Host) Env() []string { return append([]string(nil), h.env...) }

// Log returns containerd's log so far (stdout and stderr).
func (h *Host) Log() string {
	b, err := os.ReadFile(h.logPath)
	if err != nil {
		return fmt.Sprintf("(read %s: %v)", h.logPath, err)
	}
	return string(b)
}

// Ctr runs `ctr -a <address> -n <namespace> args...` and returns its
// stdout. The error includes stderr and stdout.
func (h *Host) Ctr(args ...string) (string, error) {
	return h.run(nil, "ctr", append([]string{"-a", h.address, "-n", h.namespace}, args...)...)
}

// Nerdctl runs nerdctl against this host: its address and namespace, a
// data root and CNI config directory under Dir, and an empty nerdctl.toml
// so /etc/nerdctl/nerdctl.toml does not apply. No CNI plugins are
// installed: use `run --net host` (the host's network namespace, since
// nerdctl's container inherits containerd's).
func (h *Host) Nerdctl(args ...string) (string, error) {
	global := []string{
		"--address", h.address,
		"--namespace", h.namespace,
		"--data-root", filepath.Join(h.dir, "nerdctl"),
		"--cni-netconfpath", filepath.Join(h.dir, "cni", "net.d"),
	}
	env := append(h.Env(), "NERDCTL_TOML="+filepath.Join(h.dir, "nerdctl.toml"))
	return h.run(env, "nerdctl", append(global, args...)...)
}

// Exec runs name with args inside the host's network namespace (host
// mount namespace), with containerd's environment, and returns its
// stdout. The error includes stderr and stdout.
func (h *Host) Exec(name string, args ...string) (string, error) {
	return h.run(nil, "nsenter", append([]string{"--net=" + h.netns.Path(), "--", name}, args...)...)
}

// Command returns an unstarted command that runs name with args inside
// the host's network namespace with containerd's environment, for
// long-running processes; the caller owns it.
func (h *Host) Command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command("nsenter", append([]string{"--net=" + h.netns.Path(), "--", name}, args...)...)
	cmd.Env = h.Env()
	return cmd
}

// Query sends cmd to the kvserver at addr from the host's network
// namespace; see Query.
func (h *Host) Query(addr, cmd string, timeout time.Duration) (string, error) {
	return Query(h.netns.Name, addr, cmd, timeout)
}

// run runs a command with env (default h.env) and CommandTimeout and
// returns its stdout. stderr goes only into the error: ctr logs a warning
// there on every call on this cgroup v1+v2 host ("DEPRECATION: The support
// for cgroup v1 is deprecated since containerd v2.2 ..."), which must not
// end up in parsed output.
func (h *Host) run(env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), CommandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	if env == nil {
		cmd.Env = h.env
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w\n%s%s", name, strings.Join(args, " "), err,
			bytes.TrimSpace(stderr.Bytes()), prefixed("\nstdout: ", bytes.TrimSpace(stdout.Bytes())))
	}
	return stdout.String(), nil
}

func prefixed(p string, b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return p + string(b)
}

// writeConfig writes the host's containerd config.toml.
func (h *Host) writeConfig(opts Options) error {
	var b strings.Builder
	q := func(s string) string { return "'" + s + "'" } // TOML literal string
	for _, s := range append([]string{h.root, h.state, h.address, h.dir}, opts.Imports...) {
		if strings.ContainsAny(s, "'\n") {
			return fmt.Errorf("config path %q: quote or newline in a TOML literal string: %w", s, ErrBadOption)
		}
	}
	imports := make([]string, len(opts.Imports))
	for i, s := range opts.Imports {
		imports[i] = q(s)
	}
	level := "info"
	if opts.Debug {
		level = "debug"
	}
	fmt.Fprintf(&b, "# Written by cowmig's internal/ctrtest for host %s (net %s).\n", h.name, h.netns.net.ID)
	fmt.Fprintf(&b, "version = 3\nroot = %s\nstate = %s\nimports = [%s]\n\n", q(h.root), q(h.state), strings.Join(imports, ", "))
	fmt.Fprintf(&b, "[grpc]\n  address = %s\n\n[ttrpc]\n  address = %s\n\n", q(h.address), q(h.address+".ttrpc"))
	fmt.Fprintf(&b, "[debug]\n  level = %s\n\n", q(level))
	// NRI's socket (/var/run/nri/nri.sock) is machine-wide: every
	// instance would replace every other's. The opt plugin would install
	// into /opt/containerd.
	fmt.Fprintf(&b, "[plugins]\n  [plugins.'io.containerd.nri.v1.nri']\n    disable = true\n")
	fmt.Fprintf(&b, "  [plugins.'io.containerd.internal.v1.opt']\n    path = %s\n", q(filepath.Join(h.dir, "opt")))
	if err := os.WriteFile(h.configPath, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", h.configPath, err)
	}
	return nil
}

// waitReady polls `ctr version` until containerd answers, exits or
// startTimeout passes. containerd offers nothing to block on, so poll.
func (h *Host) waitReady() error {
	deadline := time.Now().Add(startTimeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		out, err := h.run(nil, "ctr", "-a", h.address, "--timeout", "2s", "version")
		if err == nil && strings.Contains(out, "Server:") {
			return nil
		}
		select {
		case <-h.exited:
			return fmt.Errorf("containerd exited during start: %v\n%s", h.err, tail(h.Log(), 40))
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("containerd does not answer after %v: %v\n%s", startTimeout, err, tail(h.Log(), 40))
		}
	}
}

// cleanup tears the host down; see StartHost.
func (h *Host) cleanup(t testing.TB) {
	running := true
	select {
	case <-h.exited:
		running = false
	default:
	}
	if running {
		h.deleteAll(t)
		h.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-h.exited:
		case <-time.After(stopTimeout):
			t.Errorf("host %s: containerd ignores SIGTERM for %v; killing it", h.name, stopTimeout)
			h.cmd.Process.Kill()
			<-h.exited
		}
		if h.err != nil && !exitedBySignal(h.err, syscall.SIGTERM, syscall.SIGKILL) {
			t.Errorf("host %s: containerd: %v", h.name, h.err)
		}
	} else if h.err != nil {
		t.Errorf("host %s: containerd exited early: %v", h.name, h.err)
	}
	if err := killProcesses([]string{h.netns.Name}, []string{h.namespace}); err != nil {
		t.Errorf("host %s: %v", h.name, err)
	}
	for _, d := range []string{h.state, h.dir} {
		if err := unmountUnder(d); err != nil {
			t.Errorf("host %s: %v", h.name, err)
		}
	}
	for _, err := range removeCgroups(h.namespace) {
		t.Errorf("host %s: %v", h.name, err)
	}
	if err := os.RemoveAll(filepath.Join("/run/containerd/runc", h.namespace)); err != nil {
		t.Errorf("host %s: remove runc state: %v", h.name, err)
	}
	if t.Failed() {
		t.Logf("host %s: end of containerd's log (%s):\n%s", h.name, h.logPath, tail(h.Log(), 60))
	}
}

// deleteAll kills and deletes every task and container of every
// containerd namespace, so the shims exit on their own.
func (h *Host) deleteAll(t testing.TB) {
	nsOut, err := h.run(nil, "ctr", "-a", h.address, "namespaces", "ls", "-q")
	if err != nil {
		t.Errorf("host %s: %v", h.name, err)
		return
	}
	for _, ns := range strings.Fields(nsOut) {
		ctr := func(args ...string) (string, error) {
			return h.run(nil, "ctr", append([]string{"-a", h.address, "-n", ns}, args...)...)
		}
		tasks, err := ctr("tasks", "ls", "-q")
		if err != nil {
			t.Errorf("host %s: %v", h.name, err)
		}
		for _, id := range strings.Fields(tasks) {
			if _, err := ctr("tasks", "rm", "-f", id); err != nil {
				t.Logf("host %s: %v", h.name, err) // the container goes anyway below
			}
		}
		ctrs, err := ctr("containers", "ls", "-q")
		if err != nil {
			t.Errorf("host %s: %v", h.name, err)
		}
		for _, id := range strings.Fields(ctrs) {
			if _, err := ctr("containers", "rm", id); err != nil {
				t.Logf("host %s: %v", h.name, err)
			}
		}
	}
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("[... %d lines]", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}
