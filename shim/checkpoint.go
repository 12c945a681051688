package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/pkg/sys/reaper"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/internal/daemon"
	"github.com/cowmig/cowmig/internal/live"
	"github.com/cowmig/cowmig/shim/shimapi"
)

// checkpoint snapshots the container's process into r.Path.
func (s *service) checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) error {
	start := time.Now()
	var opts options.CheckpointOptions
	if r.Options != nil {
		if err := typeurl.UnmarshalTo(r.Options, &opts); err != nil {
			return fmt.Errorf("decode checkpoint options: %w", err)
		}
	}
	req, err := readRequest(opts.WorkPath)
	if err != nil {
		return err
	}
	st, err := s.TTRPCTaskService.State(ctx, &taskAPI.StateRequest{ID: r.ID})
	if err != nil {
		return fmt.Errorf("task state: %w", err)
	}
	if st.Status != task.Status_RUNNING && st.Status != task.Status_PAUSED {
		return fmt.Errorf("task is %s, not running: %w", st.Status, errdefs.ErrFailedPrecondition)
	}
	pids, err := s.TTRPCTaskService.Pids(ctx, &taskAPI.PidsRequest{ID: r.ID})
	if err != nil {
		return fmt.Errorf("task pids: %w", err)
	}
	var procs []uint32
	for _, p := range pids.Processes {
		// The shadows of fork snapshots are the engine's own.
		if !checkpoint.IsShadow(int(p.Pid)) {
			procs = append(procs, p.Pid)
		}
	}
	if len(procs) != 1 {
		var list []string
		for _, p := range procs {
			list = append(list, fmt.Sprint(p))
		}
		return fmt.Errorf("the container runs %d processes (%s); cowmig snapshots single-process containers: %w",
			len(procs), strings.Join(list, " "), errdefs.ErrNotImplemented)
	}
	if st.Status == task.Status_PAUSED {
		// ctr and nerdctl pause the task around a checkpoint. A frozen
		// cgroup would keep the engine's ptrace stops from happening,
		// and the engine freezes the process itself, for less time:
		// resume now and let the client's Resume be a no-op.
		if _, err := s.TTRPCTaskService.Resume(ctx, &taskAPI.ResumeRequest{ID: r.ID}); err != nil {
			return fmt.Errorf("resume paused task for the snapshot: %w", err)
		}
		s.mu.Lock()
		s.resumed[r.ID] = true
		s.mu.Unlock()
	}
	stats, server, err := s.runCheckpointDaemon(ctx, r.ID, int(st.Pid), r.Path, req, opts.Exit)
	if err != nil {
		return err
	}
	// Everything that can fail comes before the task may go; a failure
	// ends the page server, whose snapshot nobody could find.
	stats.ContainerID, stats.ImageRef = r.ID, req.ImageRef
	if err := copyFile(filepath.Join(st.Bundle, "config.json"), filepath.Join(r.Path, shimapi.SpecFile)); err != nil {
		server.Kill()
		return fmt.Errorf("save the container's spec: %w", err)
	}
	stats.CheckpointMs = live.Ms(time.Since(start))
	b, _ := json.Marshal(stats)
	// r.Path is ImagePath when cowmig's CLI asks: it reads them there.
	if err := os.WriteFile(filepath.Join(r.Path, shimapi.StatsFile), b, 0o600); err != nil {
		server.Kill()
		return fmt.Errorf("write checkpoint stats: %w", err)
	}
	if opts.Exit {
		// Migration: the snapshot is safe (pinned in the page server),
		// so the task may go now.
		if _, err := s.TTRPCTaskService.Kill(ctx, &taskAPI.KillRequest{ID: r.ID, Signal: uint32(syscall.SIGKILL), All: true}); err != nil {
			return fmt.Errorf("stop task after checkpoint (exit): %w", err)
		}
	}
	log.G(ctx).WithField("id", r.ID).Infof("cowmig checkpoint: %s, froze %.2f ms, %d pages (%d lazy) served at %s",
		stats.Mode, stats.FreezeMs, stats.PagesTotal, stats.PagesLazy, stats.Endpoint)
	return nil
}

// readRequest reads the CLI's request from workPath, if there is one.
func readRequest(workPath string) (shimapi.CheckpointRequest, error) {
	var req shimapi.CheckpointRequest
	if workPath == "" {
		return req, nil
	}
	b, err := os.ReadFile(filepath.Join(workPath, shimapi.RequestFile))
	if errors.Is(err, os.ErrNotExist) {
		return req, nil
	}
	if err != nil {
		return req, fmt.Errorf("read checkpoint request: %w", err)
	}
	if err := json.Unmarshal(b, &req); err != nil {
		return req, fmt.Errorf("decode checkpoint request %s: %w", shimapi.RequestFile, err)
	}
	if req.Mode != "" && !image.Mode(req.Mode).Valid() {
		return req, fmt.Errorf("checkpoint request: mode %q: want live, full or stop", req.Mode)
	}
	if req.COW != "" && !checkpoint.COW(req.COW).Valid() {
		return req, fmt.Errorf("checkpoint request: cow %q: want uffd or fork", req.COW)
	}
	return req, nil
}

// runCheckpointDaemon runs the checkpoint in a daemon of this executable
// that then serves the snapshot: its uffd and pins must live in the
// process that serves them, and the page server must outlive the task
// and this shim (which exits once the task is deleted).
func (s *service) runCheckpointDaemon(ctx context.Context, id string, pid int, dir string, req shimapi.CheckpointRequest, exit bool) (live.CheckpointStats, *os.Process, error) {
	var stats live.CheckpointStats
	cfg := s.cfg
	if req.Listen != "" {
		cfg.Listen, cfg.Advertise = req.Listen, req.Advertise
	}
	if req.TTL != nil {
		cfg.TTL = *req.TTL
	}
	if req.MaxAge != nil {
		cfg.MaxAge = *req.MaxAge
	}
	if err := cfg.Validate(); err != nil {
		return stats, nil, err
	}
	mode := req.Mode
	if mode == "" {
		mode = string(image.ModeLive)
	}
	cow := cfg.COW
	if req.COW != "" {
		cow = req.COW
	}
	if exit && cow == string(checkpoint.COWFork) && mode == string(image.ModeLive) {
		// The shadow would die with the task's pid namespace: only
		// pinned pages outlive the task. (A full snapshot is drained
		// into the image before the task goes.)
		if req.COW != "" {
			return stats, nil, fmt.Errorf("checkpoint with exit: copy-on-write method fork keeps the snapshot in a process of the task, which exit kills; use uffd: %w", errdefs.ErrInvalidArgument)
		}
		log.G(ctx).WithField("id", id).Info("cowmig checkpoint with exit: copy-on-write method uffd instead of the configured fork")
		cow = string(checkpoint.COWUffd)
	}
	stateDir := filepath.Join(cfg.StateDir, namespace(ctx))
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return stats, nil, fmt.Errorf("create state dir: %w", err)
	}
	name := fmt.Sprintf("%s-%d", id, time.Now().UnixNano())
	listen := cfg.Listen
	if listen == "unix" {
		listen = "unix:" + filepath.Join(stateDir, name+".sock")
	}
	logPath := filepath.Join(stateDir, name+".log")
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return stats, nil, fmt.Errorf("open page-server log: %w", err)
	}
	defer logf.Close()
	args := []string{daemonCheckpoint, "--pid", fmt.Sprint(pid), "--image", dir, "--mode", mode, "--cow", cow,
		"--listen", listen, "--advertise", cfg.Advertise, "--ttl", cfg.TTL.String(), "--max-age", cfg.MaxAge.String(),
		"--tls-cert", cfg.TLSCert, "--tls-key", cfg.TLSKey}
	var ec chan runcExit
	c, err := daemon.Spawn(s.exe, args, logf, nil, func(c *exec.Cmd) (err error) {
		ec, err = reaper.Default.Start(c)
		return err
	}, &stats)
	if c != nil && ec != nil {
		// The page server outlives the shim's interest in it; only its
		// exit status has to be collected.
		go reaper.Default.Wait(c, ec)
	}
	if err != nil {
		return stats, nil, fmt.Errorf("%w (page-server log %s)", err, logPath)
	}
	stats.Log = logPath
	return stats, c.Process, nil
}
