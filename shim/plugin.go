package shim

import (
	"fmt"

	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/task"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/log"
	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"

	"github.com/cowmig/cowmig/shim/shimapi"
)

// RuntimeName is the runtime containerd knows the shim by.
const RuntimeName = shimapi.RuntimeName

// Register registers the task service plugin that RunShim serves. Call
// it once, from main, instead of importing the runc shim's own task
// plugin (the same plugin ID twice panics).
func Register() {
	registry.Register(&plugin.Registration{
		Type:     plugins.TTRPCPlugin,
		ID:       "task",
		Requires: []plugin.Type{plugins.EventPlugin, plugins.InternalPlugin},
		InitFn: func(ic *plugin.InitContext) (any, error) {
			pp, err := ic.GetByID(plugins.EventPlugin, "publisher")
			if err != nil {
				return nil, err
			}
			ss, err := ic.GetByID(plugins.InternalPlugin, "shutdown")
			if err != nil {
				return nil, err
			}
			cfg, path, err := LoadConfig()
			if err != nil {
				return nil, err
			}
			if path != "" {
				log.G(ic.Context).Debugf("cowmig config %s", path)
			}
			publisher := pp.(shim.Publisher)
			runc, err := task.NewTaskService(ic.Context, publisher, ss.(shutdown.Service))
			if err != nil {
				return nil, fmt.Errorf("runc task service: %w", err)
			}
			return newService(runc, cfg, publisher)
		},
	})
}
