package live

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/internal/daemon"
)

// RunPageServer is the body of a page-server daemon (cmd/cowmig's and the
// shim's): it checkpoints pid into dir, reports the statistics to its
// starter, and serves the snapshot until Wait(ttl, maxAge) returns.
func RunPageServer(ctx context.Context, pid int, dir string, o CheckpointOptions, ttl, maxAge time.Duration) error {
	src, err := Checkpoint(ctx, pid, o)
	if err != nil {
		return daemon.ReportFailure(err)
	}
	img := src.Result.Image
	st := src.Stats(dir, pid)
	st.ServerPid = os.Getpid()
	daemon.Report(st)
	log := daemon.Log()
	fmt.Fprintf(log, "%s page server: pid %d snapshot %s (%d lazy pages, copy-on-write %s) at %s\n",
		time.Now().Format(time.RFC3339Nano), pid, img.SnapshotID, img.Stats.PagesLazy, img.Stats.COW, img.Endpoint)
	if st.ShadowPid != 0 {
		fmt.Fprintf(log, "%s page server: the snapshot is held by shadow process %d until released\n", time.Now().Format(time.RFC3339Nano), st.ShadowPid)
	}
	err = errors.Join(src.Wait(ctx, ttl, maxAge), src.Close())
	fmt.Fprintf(log, "%s page server: snapshot %s released (%v)\n", time.Now().Format(time.RFC3339Nano), img.SnapshotID, err)
	return err
}

// RunPager is the body of a pager daemon: it restores ro, reports the
// statistics to its starter, and serves the clone's lazy pages. restored,
// if set, runs once the restore is over, failed or not (the clone holds
// its own copies of ro's stdio by then).
func RunPager(ctx context.Context, ro checkpoint.RestoreOptions, tlsCfg *tls.Config, restored func()) error {
	r, err := Restore(ctx, ro, tlsCfg)
	if restored != nil {
		restored()
	}
	if err != nil {
		return daemon.ReportFailure(err)
	}
	st := r.Stats()
	st.PagerPid = os.Getpid()
	daemon.Report(st)
	return r.ServeLogged(ctx, daemon.Log())
}
