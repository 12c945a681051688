package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/internal/ctrapi"
	"github.com/cowmig/cowmig/internal/daemon"
	"github.com/cowmig/cowmig/internal/live"
	"github.com/cowmig/cowmig/shim/shimapi"
)

const (
	daemonCheckpoint = "__checkpoint-daemon"
	daemonRestore    = "__restore-daemon"
)

type checkpointFlags struct {
	pid       int
	dir       string
	mode      string
	cow       string
	listen    string
	ttl       time.Duration
	maxAge    time.Duration
	pipeSize  int
	json      bool
	leaveKids bool
	// containerd mode: checkpoint a container through containerd's API.
	address, namespace, container, advertise string
	exit                                     bool
	tlsCert, tlsKey                          string
	set                                      map[string]bool // flags given
}

func (c *checkpointFlags) parse(args []string) error {
	fs := flag.NewFlagSet("checkpoint", flag.ContinueOnError)
	fs.IntVar(&c.pid, "pid", 0, "process to checkpoint")
	fs.StringVar(&c.dir, "image", "", "image directory")
	fs.StringVar(&c.mode, "mode", "live", "live, full or stop")
	fs.StringVar(&c.cow, "cow", "", "copy-on-write method of live and full snapshots: uffd (default: write-protect and pin; copies paid by the page server) or fork (a shadow process; shorter freeze, copies paid by the process)")
	fs.StringVar(&c.listen, "listen", "", "page-server address (unix:PATH or tcp:HOST:PORT); default unix:IMAGE/pages.sock")
	fs.DurationVar(&c.ttl, "ttl", 5*time.Minute, "keep serving this long after the checkpoint once a client fetched everything")
	fs.DurationVar(&c.maxAge, "max-age", 24*time.Hour, "release the snapshot after this long in any case (0: never)")
	fs.IntVar(&c.pipeSize, "pipe-size", 0, "bytes per pin pipe (default: fs.pipe-max-size, at most 4 MiB)")
	fs.BoolVar(&c.json, "json", false, "print statistics as JSON")
	fs.BoolVar(&c.leaveKids, "leave-children", false, "checkpoint the process without its child processes (refused otherwise)")
	fs.StringVar(&c.address, "address", "", "containerd's address: checkpoint the container --container (or the argument) through containerd")
	fs.StringVar(&c.namespace, "namespace", "default", "containerd namespace")
	fs.StringVar(&c.container, "container", "", "containerd container ID")
	fs.StringVar(&c.advertise, "advertise", "", "page-server address written into the image (tcp:HOST), when --listen is a wildcard")
	fs.BoolVar(&c.exit, "exit", false, "containerd: stop the task once the snapshot is safe (migration)")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "page server's TLS certificate (PEM) for a tcp: listener")
	fs.StringVar(&c.tlsKey, "tls-key", "", "page server's TLS key (PEM)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c.set = map[string]bool{}
	fs.Visit(func(f *flag.Flag) { c.set[f.Name] = true })
	if c.container == "" && fs.NArg() == 1 {
		c.container = fs.Arg(0)
	} else if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if c.container != "" && c.address == "" {
		c.address = ctrapi.DefaultAddress
	}
	switch {
	case c.dir == "":
		return errors.New("--image is required")
	case c.address != "" && c.container == "":
		return errors.New("--address needs a container ID (--container or an argument)")
	case c.address == "" && c.pid <= 0:
		return errors.New("--pid (or a containerd container ID) is required")
	case c.address != "" && c.pid > 0:
		return errors.New("--pid and a containerd container are exclusive")
	}
	if !image.Mode(c.mode).Valid() {
		return fmt.Errorf("--mode %q: want live, full or stop", c.mode)
	}
	if c.cow != "" && !checkpoint.COW(c.cow).Valid() {
		return fmt.Errorf("--cow %q: want uffd or fork", c.cow)
	}
	abs, err := filepath.Abs(c.dir)
	if err != nil {
		return err
	}
	c.dir = abs
	if c.listen == "" && c.address == "" {
		c.listen = "unix:" + filepath.Join(c.dir, "pages.sock")
	}
	return nil
}

func (c *checkpointFlags) options() (live.CheckpointOptions, error) {
	tlsCfg, err := live.TLSFiles{Cert: c.tlsCert, Key: c.tlsKey}.Server()
	return live.CheckpointOptions{
		Options:   checkpoint.Options{Mode: image.Mode(c.mode), COW: checkpoint.COW(c.cow), Dir: c.dir, PipeSize: c.pipeSize, LeaveChildren: c.leaveKids},
		Listen:    c.listen,
		Advertise: c.advertise,
		TLS:       tlsCfg,
	}, err
}

func runCheckpoint(args []string) error {
	var c checkpointFlags
	if err := c.parse(args); err != nil {
		return err
	}
	var st live.CheckpointStats
	if err := os.MkdirAll(c.dir, 0o700); err != nil {
		return fmt.Errorf("create image dir: %w", err)
	}
	if c.address != "" {
		req := shimapi.CheckpointRequest{Mode: c.mode, COW: c.cow, Listen: c.listen, Advertise: c.advertise}
		if c.set["ttl"] {
			req.TTL = &shimapi.Duration{Duration: c.ttl}
		}
		if c.set["max-age"] {
			req.MaxAge = &shimapi.Duration{Duration: c.maxAge}
		}
		var err error
		st, err = ctrapi.Checkpoint(context.Background(), ctrapi.Target{Address: c.address, Namespace: c.namespace}, c.container, c.dir, req, c.exit)
		if err != nil {
			return err
		}
	} else if c.mode == string(image.ModeLive) {
		// The snapshot's uffd and pins must live in the process that
		// serves them: run the whole checkpoint in a daemon.
		if err := runDaemon(daemonCheckpoint, args, filepath.Join(c.dir, "server.log"), nil, &st); err != nil {
			return err
		}
	} else {
		o, err := c.options()
		if err != nil {
			return err
		}
		src, err := live.Checkpoint(context.Background(), c.pid, o)
		if err != nil {
			return err
		}
		st = src.Stats(c.dir, c.pid)
	}
	return printStats(c.json, st, func() string {
		what := fmt.Sprintf("pid %d", st.Pid)
		if c.container != "" {
			what = fmt.Sprintf("container %s (pid %d)", c.container, st.Pid)
		}
		return fmt.Sprintf("checkpointed %s (%s) into %s: froze %.2f ms, %d pages (%d eager, %d lazy)\n",
			what, st.Mode, st.Image, st.FreezeMs, st.PagesTotal, st.PagesEager, st.PagesLazy)
	})
}

// checkpointDaemon runs a live checkpoint and then serves it.
func checkpointDaemon(args []string) error {
	var c checkpointFlags
	if err := c.parse(args); err != nil {
		return daemon.ReportFailure(err)
	}
	o, err := c.options()
	if err != nil {
		return daemon.ReportFailure(err)
	}
	return live.RunPageServer(context.Background(), c.pid, c.dir, o, c.ttl, c.maxAge)
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
