// Package shimapi is what clients of the cowmig shim share with it
// beyond containerd's task API: the runtime name, the files it reads and
// writes in checkpoint directories, and the per-checkpoint request. It
// imports nothing of the shim, so a client does not link the runc shim.
package shimapi

import "time"

// RuntimeName is the runtime containerd knows the shim by.
const RuntimeName = "io.containerd.cowmig.v2"

// ConfigEnv names the environment variable that overrides the shim's
// config file path (default /etc/cowmig/config.toml). containerd starts
// shims with its own environment, so it is set where containerd runs.
const ConfigEnv = "COWMIG_CONFIG"

// Files in a checkpoint directory (and in CheckpointOptions.WorkPath).
const (
	// RequestFile, in WorkPath, is a CheckpointRequest: how a client
	// asks for what runc's checkpoint options cannot say (containerd
	// passes only those to a shim).
	RequestFile = "cowmig-request.json"
	// StatsFile, in the checkpoint directory, is the checkpoint's
	// live.CheckpointStats.
	StatsFile = "cowmig-stats.json"
	// SpecFile is the container's OCI spec at checkpoint time.
	SpecFile = "cowmig-spec.json"
	// RestoreStatsPrefix+ID+".json" is written into the checkpoint
	// directory of a restore: its live.RestoreStats.
	RestoreStatsPrefix = "cowmig-restore-"
)

// CheckpointRequest overrides the shim's config for one checkpoint.
type CheckpointRequest struct {
	Mode      string `json:"mode,omitempty"`
	COW       string `json:"cow,omitempty"` // uffd or fork; "" means the shim's config
	Listen    string `json:"listen,omitempty"`
	Advertise string `json:"advertise,omitempty"`
	// TTL and MaxAge override the config when set (0 is a value: for
	// MaxAge, no limit).
	TTL    *Duration `json:"ttl,omitempty"`
	MaxAge *Duration `json:"max_age,omitempty"`
	// ImageRef is the container's image, recorded for a restore.
	ImageRef string `json:"image_ref,omitempty"`
}

// Duration is a time.Duration written as "5m" in TOML and JSON.
type Duration struct{ time.Duration }

// UnmarshalText parses a Go duration.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// MarshalText writes a Go duration.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }
