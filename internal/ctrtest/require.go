package ctrtest

import (
	"errors"
	"os"
	"os/exec"
	"testing"
)

// ErrBadOption reports an option the package cannot use as given.
var ErrBadOption = errors.New("bad option")

// ErrNoAnswer reports that a kvserver closed the connection without a line.
var ErrNoAnswer = errors.New("no answer")

// SkipUnlessRoot skips the test unless it runs as root.
func SkipUnlessRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, containerd and runc")
	}
}

// SkipUnlessContainerd skips the test unless it runs as root and
// containerd, ctr, containerd-shim-runc-v2, runc, ip and nsenter are on
// PATH.
func SkipUnlessContainerd(t testing.TB) {
	t.Helper()
	SkipUnlessRoot(t)
	// scripts/containerd-deps.sh installs the containerd tools and runc,
	// scripts/deps.sh iproute2; nsenter is util-linux (essential).
	for _, tool := range []string{"containerd", "ctr", "containerd-shim-runc-v2", "runc", "ip", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (scripts/containerd-deps.sh installs the containerd tools and runc): %v", tool, err)
		}
	}
}

// SkipUnlessNerdctl is SkipUnlessContainerd plus nerdctl.
func SkipUnlessNerdctl(t testing.TB) {
	t.Helper()
	SkipUnlessContainerd(t)
	if _, err := exec.LookPath("nerdctl"); err != nil {
		t.Skipf("needs nerdctl (scripts/containerd-deps.sh builds it): %v", err)
	}
}
