// Package ctrapi drives containerd's API for cowmig's CLI: checkpoint a
// container that runs under the cowmig shim with options ctr cannot
// express (mode, page-server address, TTL) and read back the shim's
// statistics, and restore such a checkpoint as a new container. The shim
// does the work; this package only speaks to containerd.
package ctrapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/api/services/tasks/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/api/types/runc/options"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/typeurl/v2"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/cowmig/cowmig/internal/live"
	"github.com/cowmig/cowmig/shim/shimapi"
)

// DefaultAddress is containerd's socket when none is given.
const DefaultAddress = defaults.DefaultAddress

// Target names a containerd instance and namespace.
type Target struct {
	Address   string
	Namespace string
}

func (t Target) connect(ctx context.Context) (*containerd.Client, context.Context, error) {
	c, err := containerd.New(t.Address, containerd.WithTimeout(10*time.Second))
	if err != nil {
		return nil, nil, fmt.Errorf("connect to containerd at %s: %w", t.Address, err)
	}
	return c, namespaces.WithNamespace(ctx, t.Namespace), nil
}

// Checkpoint checkpoints container id into dir (created if needed)
// without pausing it (the shim freezes the process itself). With exit
// the task stops once the snapshot is safe (migration).
func Checkpoint(ctx context.Context, t Target, id, dir string, req shimapi.CheckpointRequest, exit bool) (live.CheckpointStats, error) {
	var st live.CheckpointStats
	c, ctx, err := t.connect(ctx)
	if err != nil {
		return st, err
	}
	defer c.Close()
	ctr, err := c.LoadContainer(ctx, id)
	if err != nil {
		return st, fmt.Errorf("container %s: %w", id, err)
	}
	info, err := ctr.Info(ctx)
	if err != nil {
		return st, fmt.Errorf("container %s: %w", id, err)
	}
	if info.Runtime.Name != shimapi.RuntimeName {
		return st, fmt.Errorf("container %s runs under %s, not %s", id, info.Runtime.Name, shimapi.RuntimeName)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return st, fmt.Errorf("create image dir: %w", err)
	}
	work, err := os.MkdirTemp("", "cowmig-request-")
	if err != nil {
		return st, err
	}
	defer os.RemoveAll(work)
	req.ImageRef = info.Image
	b, err := json.Marshal(req)
	if err != nil {
		return st, err
	}
	if err := os.WriteFile(filepath.Join(work, shimapi.RequestFile), b, 0o600); err != nil {
		return st, fmt.Errorf("write checkpoint request: %w", err)
	}
	opts, err := typeurl.MarshalAnyToProto(&options.CheckpointOptions{Exit: exit, ImagePath: dir, WorkPath: work})
	if err != nil {
		return st, err
	}
	// The task service directly: a client-side Task.Checkpoint would
	// pause the task around the call, for nothing.
	if _, err := c.TaskService().Checkpoint(ctx, &tasks.CheckpointTaskRequest{ContainerID: id, Options: opts}); err != nil {
		return st, fmt.Errorf("checkpoint %s: %w", id, err)
	}
	if b, err = os.ReadFile(filepath.Join(dir, shimapi.StatsFile)); err != nil {
		return st, fmt.Errorf("read the shim's checkpoint statistics: %w", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("decode the shim's checkpoint statistics: %w", err)
	}
	return st, nil
}

// RestoreOptions configure Restore.
type RestoreOptions struct {
	// Ref is the container image the checkpointed container ran
	// (default: the one recorded at checkpoint).
	Ref string
	// LogPath receives the clone's stdout and stderr (default: none).
	LogPath string
}

// RestoreResult describes a restored container.
type RestoreResult struct {
	ID  string `json:"id"`
	Pid int    `json:"pid"`
	// StartMs is containerd's NewTask (create and start) as this
	// command saw it; the shim's own figures are in Shim.
	StartMs float64 `json:"start_ms"`
	// Shim is the shim's report, when it could leave one where this
	// command finds it (a restore from a directory).
	Shim *live.RestoreStats `json:"shim,omitempty"`
}

// Restore creates container id from the checkpoint in dir (written by
// Checkpoint or `ctr task checkpoint --image-path`), with the source's
// spec and image, and starts it under the cowmig shimapi.
func Restore(ctx context.Context, t Target, id, dir string, o RestoreOptions) (RestoreResult, error) {
	res := RestoreResult{ID: id}
	b, err := os.ReadFile(filepath.Join(dir, shimapi.SpecFile))
	if err != nil {
		return res, fmt.Errorf("read the checkpointed spec: %w", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return res, fmt.Errorf("decode the checkpointed spec: %w", err)
	}
	var cst live.CheckpointStats
	if b, err := os.ReadFile(filepath.Join(dir, shimapi.StatsFile)); err == nil {
		if err := json.Unmarshal(b, &cst); err != nil {
			return res, fmt.Errorf("decode the checkpoint's %s: %w", shimapi.StatsFile, err)
		}
	}
	ref := o.Ref
	if ref == "" {
		ref = cst.ImageRef
	}
	if ref == "" {
		return res, errors.New("no container image: the checkpoint records none; give one")
	}
	c, ctx, err := t.connect(ctx)
	if err != nil {
		return res, err
	}
	defer c.Close()
	fromDir := func(_ context.Context, _ *containerd.Client, ti *containerd.TaskInfo) error {
		ti.Checkpoint = &types.Descriptor{MediaType: images.MediaTypeContainerd1Checkpoint,
			Annotations: map[string]string{"RestoreFromPath": dir}}
		return nil
	}
	// With RestoreFromPath containerd starts the task right after
	// creating it (the restore path CRI uses): no Start here.
	if res, err = startClone(ctx, c, id, ref, &spec, o, fromDir, false); err != nil {
		return res, err
	}
	if b, err := os.ReadFile(filepath.Join(dir, shimapi.RestoreStatsPrefix+id+".json")); err == nil {
		var st live.RestoreStats
		if json.Unmarshal(b, &st) == nil {
			res.Shim = &st
		}
	}
	return res, nil
}

// RestoreImage creates container id from checkpoint image ref in
// containerd's image store, as `ctr task checkpoint` or `ctr c checkpoint
// --task` make it, and starts it under the cowmig shim. It reads the spec
// and the container image from the checkpoint itself: `ctr c restore`
// cannot restore a task checkpoint, whose index lacks the annotations it
// wants (org.opencontainers.image.ref.name and the snapshotter).
func RestoreImage(ctx context.Context, t Target, id, ref string, o RestoreOptions) (RestoreResult, error) {
	res := RestoreResult{ID: id}
	c, ctx, err := t.connect(ctx)
	if err != nil {
		return res, err
	}
	defer c.Close()
	ckpt, err := c.GetImage(ctx, ref)
	if err != nil {
		return res, fmt.Errorf("checkpoint image %s: %w", ref, err)
	}
	b, err := content.ReadBlob(ctx, c.ContentStore(), ckpt.Target())
	if err != nil {
		return res, fmt.Errorf("read checkpoint index %s: %w", ref, err)
	}
	var index ocispec.Index
	if err := json.Unmarshal(b, &index); err != nil {
		return res, fmt.Errorf("decode checkpoint index %s: %w", ref, err)
	}
	var spec *specs.Spec
	for _, m := range index.Manifests {
		if m.MediaType != images.MediaTypeContainerd1CheckpointConfig {
			continue
		}
		data, err := content.ReadBlob(ctx, c.ContentStore(), m)
		if err != nil {
			return res, fmt.Errorf("read checkpointed spec: %w", err)
		}
		var a anypb.Any
		if err := proto.Unmarshal(data, &a); err != nil {
			return res, fmt.Errorf("decode checkpointed spec: %w", err)
		}
		v, err := typeurl.UnmarshalAny(&a)
		if err != nil {
			return res, fmt.Errorf("decode checkpointed spec: %w", err)
		}
		var ok bool
		if spec, ok = v.(*specs.Spec); !ok {
			return res, fmt.Errorf("checkpointed spec is a %T", v)
		}
	}
	if spec == nil {
		return res, fmt.Errorf("checkpoint image %s has no spec (%s)", ref, images.MediaTypeContainerd1CheckpointConfig)
	}
	base := o.Ref
	for _, key := range []string{ocispec.AnnotationRefName, "image.name"} {
		if base == "" {
			base = index.Annotations[key]
		}
	}
	if base == "" {
		return res, fmt.Errorf("checkpoint image %s names no container image; give one", ref)
	}
	return startClone(ctx, c, id, base, spec, o, containerd.WithTaskCheckpoint(ckpt), true)
}

// startClone creates container id from image ref with spec under the
// cowmig shim, and its task with from, the checkpoint; start says whether
// the task must be started too (a restore from a path starts itself).
func startClone(ctx context.Context, c *containerd.Client, id, ref string, spec *specs.Spec, o RestoreOptions,
	from containerd.NewTaskOpts, start bool) (RestoreResult, error) {
	res := RestoreResult{ID: id}
	img, err := c.GetImage(ctx, ref)
	if err != nil {
		return res, fmt.Errorf("image %s: %w", ref, err)
	}
	ctr, err := c.NewContainer(ctx, id,
		containerd.WithImage(img),
		containerd.WithNewSnapshot(id, img),
		containerd.WithSpec(spec),
		containerd.WithRuntime(shimapi.RuntimeName, nil))
	if err != nil {
		return res, fmt.Errorf("create container %s: %w", id, err)
	}
	creator := cio.NullIO
	if o.LogPath != "" {
		creator = cio.LogFile(o.LogPath)
	}
	began := time.Now()
	task, err := ctr.NewTask(ctx, creator, from)
	if err != nil {
		ctr.Delete(ctx, containerd.WithSnapshotCleanup)
		return res, fmt.Errorf("create task %s: %w", id, err)
	}
	if start {
		if err := task.Start(ctx); err != nil {
			task.Delete(ctx, containerd.WithProcessKill)
			ctr.Delete(ctx, containerd.WithSnapshotCleanup)
			return res, fmt.Errorf("start task %s: %w", id, err)
		}
	}
	res.StartMs = live.Ms(time.Since(began))
	res.Pid = int(task.Pid())
	return res, nil
}
