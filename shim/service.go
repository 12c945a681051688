// Package shim is the task service of containerd-shim-cowmig-v2: the runc
// shim's task service (task API v3) with Checkpoint, Create and Start
// replaced by cowmig's engine. A checkpoint is a live copy-on-write
// snapshot served by a page-server daemon that outlives the task; a
// create from a checkpoint makes runc start our restore stub as the
// container's init, and a restore daemon morphs it into the checkpointed
// process and pages its memory in from the source. Everything else is
// the runc shim's behaviour (DESIGN §4).
package shim

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	ptypes "github.com/containerd/containerd/v2/pkg/protobuf/types"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"

	"github.com/cowmig/cowmig/checkpoint/image"
)

// service wraps the runc shim's task service.
type service struct {
	taskAPI.TTRPCTaskService
	cfg       Config
	exe       string // this executable, started again as a daemon
	publisher shim.Publisher

	mu sync.Mutex // guards the maps below
	// restores are the containers created from a cowmig checkpoint,
	// until they are deleted.
	restores map[string]*restore
	// resumed marks containers that a checkpoint took out of a client's
	// pause: the client's Resume that follows is then already done.
	resumed map[string]bool
}

// newService wraps runc, the runc shim's task service.
func newService(runc taskAPI.TTRPCTaskService, cfg Config, publisher shim.Publisher) (*service, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	return &service{TTRPCTaskService: runc, cfg: cfg, exe: exe, publisher: publisher,
		restores: map[string]*restore{}, resumed: map[string]bool{}}, nil
}

// RegisterTTRPC registers the wrapper, not the runc service it embeds.
func (s *service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(server, s)
	return nil
}

// runcOptions gives the runc shim our runc binary and root when
// containerd sent no runtime options (it never does for a non-runc
// runtime from ctr or nerdctl).
func (s *service) runcOptions(r *taskAPI.CreateTaskRequest) error {
	if r.Options != nil {
		return nil
	}
	a, err := typeurl.MarshalAnyToProto(&options.Options{BinaryName: s.cfg.RuncBinary, Root: s.cfg.RuncRoot})
	if err != nil {
		return fmt.Errorf("runc options: %w", err)
	}
	r.Options = a
	return nil
}

// Create creates the container; from a cowmig checkpoint, runc creates it
// with the restore stub as its process (see prepareRestore).
func (s *service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	if err := s.runcOptions(r); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if r.Checkpoint == "" {
		return s.TTRPCTaskService.Create(ctx, r)
	}
	if _, err := os.Stat(filepath.Join(r.Checkpoint, image.MetaFile)); err != nil {
		return nil, errgrpc.ToGRPCf(errdefs.ErrInvalidArgument,
			"checkpoint %s is not a cowmig image (no %s): %v", r.Checkpoint, image.MetaFile, err)
	}
	rs, err := s.prepareRestore(ctx, r)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("cowmig restore of %s: %w", r.ID, err))
	}
	r.Checkpoint = ""
	resp, err := s.TTRPCTaskService.Create(ctx, r)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.restores[r.ID] = rs
	s.mu.Unlock()
	return resp, nil
}

// Start starts the container; a restored one is morphed into its
// checkpointed process before Start returns.
func (s *service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	s.mu.Lock()
	rs := s.restores[r.ID]
	morph := r.ExecID == "" && rs != nil && !rs.started
	if morph {
		rs.started = true
	}
	s.mu.Unlock()
	if !morph {
		return s.TTRPCTaskService.Start(ctx, r)
	}
	resp, err := s.TTRPCTaskService.Start(ctx, r)
	if err != nil {
		return nil, err
	}
	if err := s.morph(ctx, r.ID, rs, int(resp.Pid)); err != nil {
		log.G(ctx).WithError(err).WithField("id", r.ID).Error("cowmig restore failed; the container was killed")
		return nil, errgrpc.ToGRPC(fmt.Errorf("cowmig restore of %s: %w", r.ID, err))
	}
	return resp, nil
}

// Delete forgets a restored container once runc deleted it.
func (s *service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	resp, err := s.TTRPCTaskService.Delete(ctx, r)
	if err == nil && r.ExecID == "" {
		s.mu.Lock()
		delete(s.restores, r.ID)
		delete(s.resumed, r.ID)
		s.mu.Unlock()
	}
	return resp, err
}

// Pause pauses the container; a checkpoint's earlier resume no longer
// stands in for the next Resume.
func (s *service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*ptypes.Empty, error) {
	s.mu.Lock()
	delete(s.resumed, r.ID)
	s.mu.Unlock()
	return s.TTRPCTaskService.Pause(ctx, r)
}

// Resume resumes the container, unless the checkpoint that ran inside the
// client's pause already did.
func (s *service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*ptypes.Empty, error) {
	s.mu.Lock()
	done := s.resumed[r.ID]
	delete(s.resumed, r.ID)
	s.mu.Unlock()
	if done {
		return &ptypes.Empty{}, nil
	}
	return s.TTRPCTaskService.Resume(ctx, r)
}

// Checkpoint takes a live snapshot of the container (see checkpoint.go).
func (s *service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*ptypes.Empty, error) {
	if err := s.checkpoint(ctx, r); err != nil {
		log.G(ctx).WithError(err).WithField("id", r.ID).Error("cowmig checkpoint failed")
		return nil, errgrpc.ToGRPC(fmt.Errorf("cowmig checkpoint of %s: %w", r.ID, err))
	}
	return &ptypes.Empty{}, nil
}

// namespace is the containerd namespace of a request, for state paths.
func namespace(ctx context.Context) string {
	ns, ok := namespaces.Namespace(ctx)
	if !ok {
		return "default"
	}
	return ns
}
