package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"github.com/cowmig/cowmig/internal/daemon"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/internal/live"
)

const (
	daemonCheckpoint = "__checkpoint-daemon"
	daemonRestore    = "__restore-daemon"
)

type checkpointFlags struct {
	pid       int
	dir       string
	mode      string
	listen    string
	ttl       time.Duration
	maxAge    time.Duration
	pipeSize  int
	json      bool
	leaveKids bool
}

func (c *checkpointFlags) parse(args []string) error {
	fs := flag.NewFlagSet("checkpoint", flag.ContinueOnError)
	fs.IntVar(&c.pid, "pid", 0, "process to checkpoint")
	fs.StringVar(&c.dir, "image", "", "image directory")
	fs.StringVar(&c.mode, "mode", "live", "live, full or stop")
	fs.StringVar(&c.listen, "listen", "", "page-server address (unix:PATH or tcp:HOST:PORT); default unix:IMAGE/pages.sock")
	fs.DurationVar(&c.ttl, "ttl", 5*time.Minute, "keep serving this long after the checkpoint once a client fetched everything")
	fs.DurationVar(&c.maxAge, "max-age", 24*time.Hour, "release the snapshot after this long in any case (0: never)")
	fs.IntVar(&c.pipeSize, "pipe-size", 0, "bytes per pin pipe (default: fs.pipe-max-size, at most 4 MiB)")
	fs.BoolVar(&c.json, "json", false, "print statistics as JSON")
	fs.BoolVar(&c.leaveKids, "leave-children", false, "checkpoint the process without its child processes (refused otherwise)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if c.pid <= 0 || c.dir == "" {
		return errors.New("--pid and --image are required")
	}
	if !image.Mode(c.mode).Valid() {
		return fmt.Errorf("--mode %q: want live, full or stop", c.mode)
	}
	abs, err := filepath.Abs(c.dir)
	if err != nil {
		return err
	}
	c.dir = abs
	if c.listen == "" {
		c.listen = "unix:" + filepath.Join(c.dir, "pages.sock")
	}
	return nil
}

func (c *checkpointFlags) options() live.CheckpointOptions {
	return live.CheckpointOptions{
		Options: checkpoint.Options{Mode: image.Mode(c.mode), Dir: c.dir, PipeSize: c.pipeSize, LeaveChildren: c.leaveKids},
		Listen:  c.listen,
	}
}

// checkpointStats is the --json output.
type checkpointStats struct {
	Mode       string             `json:"mode"`
	Image      string             `json:"image"`
	Pid        int                `json:"pid"`
	FreezeMs   float64            `json:"freeze_ms"`
	PagesTotal uint64             `json:"pages_total"`
	PagesEager uint64             `json:"pages_eager"`
	PagesLazy  uint64             `json:"pages_lazy"`
	Endpoint   string             `json:"endpoint,omitempty"`
	ServerPid  int                `json:"server_pid,omitempty"`
	PhasesMs   map[string]float64 `json:"phases_ms,omitempty"`
	Error      string             `json:"error,omitempty"`
}

func runCheckpoint(args []string) error {
	var c checkpointFlags
	if err := c.parse(args); err != nil {
		return err
	}
	var st checkpointStats
	if err := os.MkdirAll(c.dir, 0o700); err != nil {
		return fmt.Errorf("create image dir: %w", err)
	}
	if c.mode == string(image.ModeLive) {
		// The snapshot's uffd and pins must live in the process that
		// serves them: run the whole checkpoint in a daemon.
		if err := runDaemon(daemonCheckpoint, args, filepath.Join(c.dir, "server.log"), nil, &st); err != nil {
			return err
		}
	} else {
		src, err := live.Checkpoint(context.Background(), c.pid, c.options())
		if err != nil {
			return err
		}
		st = stats(&c, src)
	}
	return printStats(c.json, st, func() string {
		return fmt.Sprintf("checkpointed pid %d (%s) into %s: froze %.2f ms, %d pages (%d eager, %d lazy)\n",
			st.Pid, st.Mode, st.Image, st.FreezeMs, st.PagesTotal, st.PagesEager, st.PagesLazy)
	})
}

func stats(c *checkpointFlags, src *live.Source) checkpointStats {
	img := src.Result.Image
	st := checkpointStats{
		Mode: string(img.Mode), Image: c.dir, Pid: c.pid,
		FreezeMs:   float64(src.Result.Freeze.Microseconds()) / 1000,
		PagesTotal: img.Stats.PagesTotal, PagesEager: img.Stats.PagesEager, PagesLazy: img.Stats.PagesLazy,
		Endpoint: img.Endpoint, PhasesMs: map[string]float64{},
	}
	for _, p := range src.Result.Phases {
		st.PhasesMs[p.Name] += float64(p.D.Microseconds()) / 1000
	}
	return st
}

// checkpointDaemon runs a live checkpoint and then serves it.
func checkpointDaemon(args []string) error {
	var c checkpointFlags
	if err := c.parse(args); err != nil {
		return daemon.ReportFailure(err)
	}
	src, err := live.Checkpoint(context.Background(), c.pid, c.options())
	if err != nil {
		return daemon.ReportFailure(err)
	}
	st := stats(&c, src)
	st.ServerPid = os.Getpid()
	daemon.Report(st)
	err = src.Wait(context.Background(), c.ttl, c.maxAge)
	return errors.Join(err, src.Close())
}

func printStats(asJSON bool, v any, text func() string) error {
	if asJSON {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		fmt.Println(string(b))
		return nil
	}
	fmt.Print(text())
	return nil
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}
