package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/internal/ctrapi"
	"github.com/cowmig/cowmig/internal/daemon"
	"github.com/cowmig/cowmig/internal/live"
)

type restoreFlags struct {
	dir                   string
	stdin, stdout, stderr string
	json                  bool
	// containerd mode: restore as a new container through containerd.
	address, namespace, container, ref string
	checkpoint                         string
	tlsCA                              string
}

func (r *restoreFlags) parse(args []string) error {
	fs := flag.NewFlagSet("restore", flag.ContinueOnError)
	fs.StringVar(&r.dir, "image", "", "image directory")
	fs.StringVar(&r.stdin, "stdin", "", "file for the clone's stdin (default: this command's)")
	fs.StringVar(&r.stdout, "stdout", "", "file for the clone's stdout (default: this command's)")
	fs.StringVar(&r.stderr, "stderr", "", "file for the clone's stderr (default: this command's)")
	fs.BoolVar(&r.json, "json", false, "print the result as JSON")
	fs.StringVar(&r.address, "address", "", "containerd's address: restore as a new container --container (or the argument) through containerd")
	fs.StringVar(&r.namespace, "namespace", "default", "containerd namespace")
	fs.StringVar(&r.container, "container", "", "ID of the new containerd container")
	fs.StringVar(&r.ref, "ref", "", "containerd: the container image (default: the one recorded at checkpoint)")
	fs.StringVar(&r.tlsCA, "tls-ca", "", "CA of the page server's TLS certificate (PEM)")
	fs.StringVar(&r.checkpoint, "checkpoint", "", "containerd: restore this checkpoint image (from ctr task|container checkpoint) instead of --image")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if r.container == "" && fs.NArg() == 1 {
		r.container = fs.Arg(0)
	} else if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if r.container != "" && r.address == "" {
		r.address = ctrapi.DefaultAddress
	}
	if r.checkpoint != "" && r.address == "" {
		r.address = ctrapi.DefaultAddress
	}
	if r.dir == "" && r.checkpoint == "" {
		return errors.New("--image is required")
	}
	if r.dir != "" && r.checkpoint != "" {
		return errors.New("--image and --checkpoint are exclusive")
	}
	if r.dir == "" {
		return nil
	}
	if r.address != "" && r.container == "" {
		return errors.New("--address needs the new container's ID (--container or an argument)")
	}
	abs, err := filepath.Abs(r.dir)
	r.dir = abs
	return err
}

func openStdio(path string, def *os.File, flag int) (*os.File, error) {
	if path == "" {
		return def, nil
	}
	f, err := os.OpenFile(path, flag, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open clone stdio: %w", err)
	}
	return f, nil
}

func runRestore(args []string) error {
	var rf restoreFlags
	if err := rf.parse(args); err != nil {
		return err
	}
	if rf.address != "" {
		if rf.stdin != "" || rf.stderr != "" {
			return errors.New("containerd restore: the clone's output goes to --stdout (a log file) only")
		}
		if rf.container == "" {
			return errors.New("the new container's ID is required (--container or an argument)")
		}
		target := ctrapi.Target{Address: rf.address, Namespace: rf.namespace}
		o := ctrapi.RestoreOptions{Ref: rf.ref, LogPath: rf.stdout}
		var res ctrapi.RestoreResult
		var err error
		if rf.checkpoint != "" {
			res, err = ctrapi.RestoreImage(context.Background(), target, rf.container, rf.checkpoint, o)
		} else {
			res, err = ctrapi.Restore(context.Background(), target, rf.container, rf.dir, o)
		}
		if err != nil {
			return err
		}
		return printStats(rf.json, res, func() string { return fmt.Sprintf("%d\n", res.Pid) })
	}
	in, err := openStdio(rf.stdin, os.Stdin, os.O_RDONLY)
	if err != nil {
		return err
	}
	out, err := openStdio(rf.stdout, os.Stdout, os.O_WRONLY|os.O_CREATE|os.O_APPEND)
	if err != nil {
		return err
	}
	errf, err := openStdio(rf.stderr, os.Stderr, os.O_WRONLY|os.O_CREATE|os.O_APPEND)
	if err != nil {
		return err
	}
	// The pager must outlive this command: restore in a daemon whose
	// stdio become the clone's.
	var st live.RestoreStats
	logPath := filepath.Join(os.TempDir(), fmt.Sprintf("cowmig-restore-%d.log", os.Getpid()))
	if err := runDaemon(daemonRestore, args, logPath, []*os.File{in, out, errf}, &st); err != nil {
		return err
	}
	return printStats(rf.json, st, func() string { return fmt.Sprintf("%d\n", st.Pid) })
}

// restoreDaemon restores the image, reports, then runs the pager.
func restoreDaemon(args []string) error {
	var rf restoreFlags
	if err := rf.parse(args); err != nil {
		return daemon.ReportFailure(err)
	}
	ctx := context.Background()
	tlsCfg, err := live.TLSFiles{CA: rf.tlsCA}.Client()
	if err != nil {
		return daemon.ReportFailure(err)
	}
	return live.RunPager(ctx, checkpoint.RestoreOptions{Dir: rf.dir, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}, tlsCfg, nil)
}
