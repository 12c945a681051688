package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"github.com/cowmig/cowmig/internal/daemon"
	"os"
	"path/filepath"
	"time"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/internal/live"
)

type restoreFlags struct {
	dir                   string
	stdin, stdout, stderr string
	json                  bool
}

func (r *restoreFlags) parse(args []string) error {
	fs := flag.NewFlagSet("restore", flag.ContinueOnError)
	fs.StringVar(&r.dir, "image", "", "image directory")
	fs.StringVar(&r.stdin, "stdin", "", "file for the clone's stdin (default: this command's)")
	fs.StringVar(&r.stdout, "stdout", "", "file for the clone's stdout (default: this command's)")
	fs.StringVar(&r.stderr, "stderr", "", "file for the clone's stderr (default: this command's)")
	fs.BoolVar(&r.json, "json", false, "print the result as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if r.dir == "" {
		return errors.New("--image is required")
	}
	abs, err := filepath.Abs(r.dir)
	r.dir = abs
	return err
}

type restoreStats struct {
	Pid       int                `json:"pid"`
	NSPid     int                `json:"ns_pid"`
	RestoreMs float64            `json:"restore_ms"`
	Mode      string             `json:"mode"`
	LazyPages uint64             `json:"lazy_pages"`
	PagerPid  int                `json:"pager_pid,omitempty"`
	PhasesMs  map[string]float64 `json:"phases_ms,omitempty"`
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
	var st restoreStats
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
	r, err := live.Restore(ctx, checkpoint.RestoreOptions{Dir: rf.dir, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr})
	if err != nil {
		return daemon.ReportFailure(err)
	}
	st := restoreStats{Pid: r.Pid, NSPid: r.NSPid, RestoreMs: float64(r.Duration.Microseconds()) / 1000,
		Mode: string(r.Image.Mode), LazyPages: r.Image.Stats.PagesLazy, PagerPid: os.Getpid()}
	st.PhasesMs = map[string]float64{}
	for _, p := range r.Phases {
		st.PhasesMs[p.Name] += float64(p.D.Microseconds()) / 1000
	}
	daemon.Report(st)
	log := daemon.Log()
	start := time.Now()
	if err := r.Serve(ctx); errors.Is(err, checkpoint.ErrCloneExited) {
		fmt.Fprintf(log, "cowmig pager: pid %d exited after %v, before all its pages were local\n", r.Pid, time.Since(start))
		return nil
	} else if err != nil {
		fmt.Fprintf(log, "cowmig pager: pid %d: %v (the clone was killed)\n", r.Pid, err)
		return err
	}
	if r.Image.Mode == image.ModeLive {
		fmt.Fprintf(log, "cowmig pager: pid %d: all %d lazy pages local after %v\n", r.Pid, r.Image.Stats.PagesLazy, time.Since(start))
	}
	return nil
}
