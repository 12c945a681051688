// Command containerd-shim-cowmig-v2 is cowmig's containerd runtime shim
// (io.containerd.cowmig.v2): the runc shim with live copy-on-write
// checkpoints and lazy restores. It also runs, started by itself, the
// page-server and pager daemons of those checkpoints and restores.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/manager"
	containerdshim "github.com/containerd/containerd/v2/pkg/shim"

	"github.com/cowmig/cowmig/internal/daemon"
	"github.com/cowmig/cowmig/shim"
)

func main() {
	if ran, err := shim.RunDaemon(os.Args[1:]); ran {
		if err != nil {
			fmt.Fprintf(daemon.Log(), "%s: %s\n", os.Args[1], daemon.OneLine(err))
			os.Exit(1)
		}
		return
	}
	shim.Register()
	containerdshim.RunShim(context.Background(), manager.NewShimManager(shim.RuntimeName))
}
