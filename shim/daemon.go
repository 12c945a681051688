package shim

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	runcC "github.com/containerd/go-runc"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/internal/daemon"
	"github.com/cowmig/cowmig/internal/live"
)

// The shim starts itself again as these daemons.
const (
	daemonCheckpoint = "__cowmig-page-server"
	daemonRestore    = "__cowmig-pager"
)

type runcExit = runcC.Exit

// RunDaemon runs the daemon named by args[0] if it is one of the shim's,
// and reports whether it was; the shim's main calls it before RunShim.
func RunDaemon(args []string) (bool, error) {
	if len(args) == 0 {
		return false, nil
	}
	switch args[0] {
	case daemonCheckpoint:
		daemon.Init()
		return true, pageServer(args[1:])
	case daemonRestore:
		daemon.Init()
		return true, pager(args[1:])
	}
	return false, nil
}

// pageServer checkpoints a container's process and serves the snapshot
// until it is released, fully fetched and its TTL passed, or too old.
func pageServer(args []string) error {
	fs := flag.NewFlagSet(daemonCheckpoint, flag.ContinueOnError)
	pid := fs.Int("pid", 0, "")
	dir := fs.String("image", "", "")
	mode := fs.String("mode", string(image.ModeLive), "")
	cow := fs.String("cow", string(checkpoint.COWUffd), "")
	listen := fs.String("listen", "", "")
	advertise := fs.String("advertise", "", "")
	ttl := fs.Duration("ttl", 5*time.Minute, "")
	maxAge := fs.Duration("max-age", 24*time.Hour, "")
	var tf live.TLSFiles
	fs.StringVar(&tf.Cert, "tls-cert", "", "")
	fs.StringVar(&tf.Key, "tls-key", "", "")
	if err := fs.Parse(args); err != nil {
		return daemon.ReportFailure(err)
	}
	tlsCfg, err := tf.Server()
	if err != nil {
		return daemon.ReportFailure(err)
	}
	return live.RunPageServer(context.Background(), *pid, *dir, live.CheckpointOptions{
		Options:   checkpoint.Options{Mode: image.Mode(*mode), COW: checkpoint.COW(*cow), Dir: *dir},
		Listen:    *listen,
		Advertise: *advertise,
		TLS:       tlsCfg,
	}, *ttl, *maxAge)
}

// pager morphs the container's stub into the image's process, reports,
// then serves the clone's lazy pages until all are local. It exits
// non-zero if the clone had to be killed.
func pager(args []string) error {
	fs := flag.NewFlagSet(daemonRestore, flag.ContinueOnError)
	dir := fs.String("image", "", "")
	stub := fs.Int("stub", 0, "")
	var tf live.TLSFiles
	fs.StringVar(&tf.CA, "tls-ca", "", "")
	if err := fs.Parse(args); err != nil {
		return daemon.ReportFailure(err)
	}
	tlsCfg, err := tf.Client()
	if err != nil {
		return daemon.ReportFailure(err)
	}
	stdio, err := stubStdio(*stub)
	if err != nil {
		return daemon.ReportFailure(err)
	}
	return live.RunPager(context.Background(), checkpoint.RestoreOptions{
		Dir: *dir, Stub: *stub, Stdin: stdio[0], Stdout: stdio[1], Stderr: stdio[2],
		// runc installed the container's seccomp filter in the stub.
		AllowSeccomp: true,
	}, tlsCfg, func() {
		// The clone has its own copies: the task's IO must not stay
		// open in the pager.
		for _, f := range stdio {
			f.Close()
		}
	})
}

// stubStdio takes the stub's fds 0-2, the task's IO that runc gave it,
// for the clone.
func stubStdio(pid int) ([3]*os.File, error) {
	var out [3]*os.File
	for i := range out {
		fd, err := takeFd(pid, i)
		if err != nil {
			for _, f := range out[:i] {
				f.Close()
			}
			return out, fmt.Errorf("take stub fd %d: %w", i, err)
		}
		out[i] = os.NewFile(uintptr(fd), fmt.Sprintf("stub-fd-%d", i))
	}
	return out, nil
}
