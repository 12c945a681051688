package ctrtest

import (
	"net"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// RuncRuntime is containerd's runc runtime.
const RuncRuntime = "io.containerd.runc.v2"

// ReadyTimeout bounds how long RunKV waits for a kvserver to answer (the
// fill of a few hundred MiB takes well under a second here).
const ReadyTimeout = 30 * time.Second

// Import imports the image archive at tarPath (BuildImage) into the host's
// namespace with `ctr image import`, which also unpacks it.
func (h *Host) Import(t testing.TB, tarPath string) {
	t.Helper()
	if out, err := h.Ctr("image", "import", tarPath); err != nil {
		t.Fatalf("host %s: %v", h.name, err)
	} else {
		t.Logf("host %s: ctr image import: %s", h.name, out)
	}
}

// RunKV starts container id from ImageRef on the host with
// `ctr run -d --net-host --runtime <runtime> --log-uri file://...`,
// running /kvserver with args (e.g. "-mib", "64", "-port", "7070"), waits
// until it answers GET from the host's network namespace and returns its
// address "<IP>:<port>" (the port from -port, else DefaultPort).
//
// --log-uri puts the container's stdout and stderr ("ready", errors) in
// Dir()/<id>.log: with plain -d, ctr connects them through fifos to its
// own stdio, which is gone once `ctr run -d` returns.
func (h *Host) RunKV(t testing.TB, id, runtime string, args ...string) string {
	t.Helper()
	port := DefaultPort
	for i := 0; i+1 < len(args); i++ {
		if args[i] == "-port" || args[i] == "--port" {
			if p, err := strconv.Atoi(args[i+1]); err == nil {
				port = p
			}
		}
	}
	logURI := "file://" + filepath.Join(h.dir, id+".log")
	ctrArgs := append([]string{"run", "-d", "--net-host", "--runtime", runtime, "--log-uri", logURI, ImageRef, id, "/kvserver"}, args...)
	if _, err := h.Ctr(ctrArgs...); err != nil {
		t.Fatalf("host %s: %v", h.name, err)
	}
	addr := net.JoinHostPort(h.IP(), strconv.Itoa(port))
	if _, err := WaitReady(h.netns.Name, addr, ReadyTimeout); err != nil {
		t.Fatalf("host %s: container %s: %v", h.name, id, err)
	}
	return addr
}
