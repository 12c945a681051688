package live

import "time"

// CheckpointStats describe a checkpoint: cowmig checkpoint --json prints
// them, and the shim reports them to its clients.
type CheckpointStats struct {
	Mode       string             `json:"mode"`
	COW        string             `json:"cow,omitempty"` // uffd or fork (live and full)
	ShadowPid  int                `json:"shadow_pid,omitempty"`
	Image      string             `json:"image"`
	Pid        int                `json:"pid"`
	FreezeMs   float64            `json:"freeze_ms"`
	PagesTotal uint64             `json:"pages_total"`
	PagesEager uint64             `json:"pages_eager"`
	PagesLazy  uint64             `json:"pages_lazy"`
	Endpoint   string             `json:"endpoint,omitempty"`
	ServerPid  int                `json:"server_pid,omitempty"`
	PhasesMs   map[string]float64 `json:"phases_ms,omitempty"`
	// Set by the shim: its whole Checkpoint call as containerd waits
	// for it, the page server's log, the container and its image.
	CheckpointMs float64 `json:"checkpoint_ms,omitempty"`
	Log          string  `json:"log,omitempty"`
	ContainerID  string  `json:"container_id,omitempty"`
	ImageRef     string  `json:"image_ref,omitempty"`
}

// Stats are the checkpoint's statistics; dir is where its image is.
func (s *Source) Stats(dir string, pid int) CheckpointStats {
	img := s.Result.Image
	st := CheckpointStats{
		Mode: string(img.Mode), COW: img.Stats.COW, Image: dir, Pid: pid,
		FreezeMs:   Ms(s.Result.Freeze),
		PagesTotal: img.Stats.PagesTotal, PagesEager: img.Stats.PagesEager, PagesLazy: img.Stats.PagesLazy,
		Endpoint: img.Endpoint, PhasesMs: map[string]float64{},
	}
	for _, p := range s.Result.Phases {
		st.PhasesMs[p.Name] += Ms(p.D)
	}
	if s.Result.Snapshot != nil {
		st.ShadowPid = s.Result.Snapshot.ShadowPid()
	}
	return st
}

// RestoreStats describe a restore: cowmig restore --json prints them,
// and the shim reports them to its clients.
type RestoreStats struct {
	Pid       int                `json:"pid"`
	NSPid     int                `json:"ns_pid"`
	RestoreMs float64            `json:"restore_ms"`
	Mode      string             `json:"mode"`
	LazyPages uint64             `json:"lazy_pages"`
	PagerPid  int                `json:"pager_pid,omitempty"`
	PhasesMs  map[string]float64 `json:"phases_ms,omitempty"`
	// UffdFd is the clone's userfaultfd in the pager (-1: none), for a
	// supervisor that holds a copy.
	UffdFd int `json:"uffd_fd"`
	// StartMs is set by the shim: its whole Start call, runc start and
	// then the morph.
	StartMs float64 `json:"start_ms,omitempty"`
}

// Stats are the restore's statistics.
func (r *Restoring) Stats() RestoreStats {
	st := RestoreStats{Pid: r.Pid, NSPid: r.NSPid, RestoreMs: Ms(r.Duration), Mode: string(r.Image.Mode),
		LazyPages: r.Image.Stats.PagesLazy, UffdFd: r.UffdFd(), PhasesMs: map[string]float64{}}
	for _, p := range r.Phases {
		st.PhasesMs[p.Name] += Ms(p.D)
	}
	return st
}

// Ms is d in milliseconds.
func Ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
