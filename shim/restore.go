package shim

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/sys/reaper"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/internal/daemon"
	"github.com/cowmig/cowmig/internal/live"
	"github.com/cowmig/cowmig/shim/shimapi"
)

// stubInContainer is where the restore stub is bind-mounted: /dev is a
// tmpfs runc mounts first, so the mount point can be made even on a
// read-only rootfs.
const stubInContainer = "/dev/.cowmig-restore-stub"

// restoreCaps are given to the stub for the morph and dropped by it
// (the engine sets the image's bounding set and capset exactly):
// CHECKPOINT_RESTORE for clone3 set_tid and PR_SET_MM_MAP's exe file,
// SETPCAP to drop bounding capabilities.
var restoreCaps = []string{"CAP_CHECKPOINT_RESTORE", "CAP_SETPCAP"}

// TopicRestoreFailed is the containerd event topic of a restored task
// killed because its pages could not be served; the event is a
// containerd.events.ContainerUpdate whose labels io.cowmig.restore.error
// and io.cowmig.restore.pid say why and which process.
const TopicRestoreFailed = "/tasks/cowmig/restore-failed"

// restore is a container being created from a cowmig checkpoint.
type restore struct {
	dir     string // the image, copied into the bundle
	bundle  string
	src     string // the checkpoint directory containerd gave
	ns      string // containerd namespace, for events
	started bool   // guarded by service.mu
	stats   live.RestoreStats
}

// RestoreStatsFile is the name, in the bundle, of the restore's
// live.RestoreStats; they are also written into the checkpoint directory
// (shimapi.RestoreStatsPrefix), for the client that gave it.
const RestoreStatsFile = "cowmig-restore.json"

// prepareRestore copies the image out of containerd's temporary checkpoint
// directory and rewrites the bundle's spec so that runc creates the
// container with the restore stub as its process.
func (s *service) prepareRestore(ctx context.Context, r *taskAPI.CreateTaskRequest) (*restore, error) {
	rs := &restore{dir: filepath.Join(r.Bundle, "cowmig-image"), bundle: r.Bundle, ns: namespace(ctx), src: r.Checkpoint}
	if err := copyDir(r.Checkpoint, rs.dir); err != nil {
		return nil, fmt.Errorf("copy checkpoint image: %w", err)
	}
	// A corrupt or truncated image fails here, before runc runs.
	if _, err := image.Read(rs.dir); err != nil {
		return nil, fmt.Errorf("checkpoint image: %w", err)
	}
	stub, err := checkpoint.WriteStub(r.Bundle)
	if err != nil {
		return nil, err
	}
	specPath := filepath.Join(r.Bundle, "config.json")
	b, err := os.ReadFile(specPath)
	if err != nil {
		return nil, fmt.Errorf("read bundle spec: %w", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, fmt.Errorf("decode bundle spec: %w", err)
	}
	if spec.Process == nil {
		return nil, fmt.Errorf("bundle spec has no process")
	}
	if spec.Process.Terminal {
		return nil, fmt.Errorf("restoring a container with a terminal is not supported")
	}
	if err := ownCgroup(&spec, r.Checkpoint, r.ID); err != nil {
		return nil, err
	}
	spec.Process.Args = []string{stubInContainer}
	spec.Mounts = append(spec.Mounts, specs.Mount{
		Destination: stubInContainer, Type: "bind", Source: stub,
		Options: []string{"bind", "ro", "nosuid", "nodev"},
	})
	if spec.Process.Capabilities == nil {
		spec.Process.Capabilities = &specs.LinuxCapabilities{}
	}
	c := spec.Process.Capabilities
	for _, set := range []*[]string{&c.Bounding, &c.Effective, &c.Permitted} {
		for _, cp := range restoreCaps {
			if !slices.Contains(*set, cp) {
				*set = append(*set, cp)
			}
		}
	}
	if b, err = json.Marshal(&spec); err != nil {
		return nil, fmt.Errorf("encode bundle spec: %w", err)
	}
	if err := os.WriteFile(specPath, b, 0o600); err != nil {
		return nil, fmt.Errorf("write bundle spec: %w", err)
	}
	log.G(ctx).WithField("id", r.ID).Infof("cowmig restore: container created with the restore stub (image %s)", rs.dir)
	return rs, nil
}

// ownCgroup gives a container restored from the checkpoint of another
// one its own cgroup: `ctr c restore` reuses the checkpointed spec, whose
// cgroupsPath names the source's cgroup ("/ns/ID", or "slice:prefix:ID"
// with systemd), and two tasks in one cgroup kill each other (runc kill
// --all signals the whole cgroup).
func ownCgroup(spec *specs.Spec, checkpointDir, id string) error {
	if spec.Linux == nil || spec.Linux.CgroupsPath == "" {
		return nil
	}
	b, err := os.ReadFile(filepath.Join(checkpointDir, shimapi.StatsFile))
	if err != nil {
		return fmt.Errorf("read checkpoint stats: %w", err)
	}
	var st live.CheckpointStats
	if err := json.Unmarshal(b, &st); err != nil {
		return fmt.Errorf("decode checkpoint stats: %w", err)
	}
	old, p := st.ContainerID, spec.Linux.CgroupsPath
	if old == "" || old == id {
		return nil
	}
	for _, sep := range []string{"/", ":"} {
		if strings.HasSuffix(p, sep+old) {
			spec.Linux.CgroupsPath = strings.TrimSuffix(p, old) + id
			return nil
		}
	}
	return nil
}

// morph restores the image into the started stub (pid) in a pager
// daemon, which then pages the clone in. If the restore fails the
// container is killed.
func (s *service) morph(ctx context.Context, id string, rs *restore, pid int) error {
	start := time.Now()
	logPath := filepath.Join(rs.bundle, "cowmig-pager.log")
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		s.killTask(ctx, id)
		return fmt.Errorf("open pager log: %w", err)
	}
	defer logf.Close()
	var ec chan runcExit
	c, err := daemon.Spawn(s.exe, []string{daemonRestore, "--image", rs.dir, "--stub", fmt.Sprint(pid), "--tls-ca", s.cfg.TLSCA}, logf, nil,
		func(c *exec.Cmd) (err error) {
			ec, err = reaper.Default.Start(c)
			return err
		}, &rs.stats)
	if err != nil {
		s.killTask(ctx, id)
		if c != nil && ec != nil {
			reaper.Default.Wait(c, ec)
		}
		return fmt.Errorf("%w (pager log %s)", err, logPath)
	}
	// Hold a copy of the clone's uffd: should the pager die, the clone's
	// faults stay blocked (never zero-filled) until it is killed below.
	uffd := -1
	if rs.stats.UffdFd >= 0 {
		if uffd, err = takeFd(c.Process.Pid, rs.stats.UffdFd); err != nil {
			s.killTask(ctx, id)
			go reaper.Default.Wait(c, ec)
			return fmt.Errorf("hold the clone's userfaultfd: %w", err)
		}
	}
	rs.stats.StartMs = live.Ms(time.Since(start))
	if b, err := json.Marshal(rs.stats); err == nil {
		os.WriteFile(filepath.Join(rs.bundle, RestoreStatsFile), b, 0o600)
		// containerd may have removed its temporary directory by now.
		os.WriteFile(filepath.Join(rs.src, shimapi.RestoreStatsPrefix+id+".json"), b, 0o600)
	}
	log.G(ctx).WithField("id", id).Infof("cowmig restore: pid %d running after %.2f ms (morph %.2f ms), %d lazy pages",
		pid, rs.stats.StartMs, rs.stats.RestoreMs, rs.stats.LazyPages)
	go s.watchPager(rs.ns, id, pid, c, ec, uffd, logPath)
	return nil
}

// watchPager waits for the pager daemon. If it fails (or dies) before
// every page is local, the clone is killed while its faults are still
// held, and the failure is logged and published.
func (s *service) watchPager(ns, id string, pid int, c *exec.Cmd, ec chan runcExit, uffd int, logPath string) {
	status, _ := reaper.Default.Wait(c, ec)
	ctx := namespaces.WithNamespace(context.Background(), ns)
	if status != 0 {
		s.killTask(ctx, id)
		waitGone(pid, 5*time.Second)
		msg := fmt.Sprintf("cowmig pager for %s exited with status %d before all pages were local: the clone was killed; %s",
			id, status, lastLine(logPath))
		log.G(ctx).WithField("id", id).Error(msg)
		s.publishFailure(ctx, id, pid, msg)
	}
	if uffd >= 0 {
		unix.Close(uffd)
	}
}

// publishFailure tells containerd's event subscribers why a restored task
// died, next to the TaskExit the runc shim publishes.
func (s *service) publishFailure(ctx context.Context, id string, pid int, msg string) {
	if s.publisher == nil {
		return
	}
	// A type every containerd client decodes (ctr events drops types it
	// does not link, such as google.protobuf.Struct).
	ev := &eventstypes.ContainerUpdate{ID: id, Labels: map[string]string{
		"io.cowmig.restore.error": msg,
		"io.cowmig.restore.pid":   fmt.Sprint(pid),
	}}
	if err := s.publisher.Publish(ctx, TopicRestoreFailed, ev); err != nil {
		log.G(ctx).WithError(err).Warn("publish cowmig restore failure")
	}
}

// killTask SIGKILLs every process of the task.
func (s *service) killTask(ctx context.Context, id string) {
	if _, err := s.TTRPCTaskService.Kill(ctx, &taskAPI.KillRequest{ID: id, Signal: uint32(syscall.SIGKILL), All: true}); err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("kill task")
	}
}

// takeFd duplicates fd of process pid into this process.
func takeFd(pid, fd int) (int, error) {
	pfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(pfd)
	return unix.PidfdGetfd(pfd, fd, 0)
}

// waitGone waits up to timeout for process pid to exit.
func waitGone(pid int, timeout time.Duration) {
	pfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return
	}
	defer unix.Close(pfd)
	fds := []unix.PollFd{{Fd: int32(pfd), Events: unix.POLLIN}}
	unix.Poll(fds, int(timeout.Milliseconds()))
}

// lastLine is the last line of the file at path, for error messages.
func lastLine(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "no pager log"
	}
	lines := slices.DeleteFunc(strings.Split(string(b), "\n"), func(s string) bool { return s == "" })
	if len(lines) == 0 {
		return "empty pager log"
	}
	return lines[len(lines)-1]
}

// copyDir copies the regular files of src into a new directory dst.
func copyDir(src, dst string) error {
	if err := os.MkdirAll(dst, 0o700); err != nil {
		return err
	}
	entries, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		if err := copyFile(filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
