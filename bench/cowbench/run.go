package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/internal/live"
)

// ioTimeout bounds every wait for a line from a workload or clone; a 4 GiB
// checksum or write phase takes about a second.
const ioTimeout = 2 * time.Minute

// repTimeout bounds one repetition.
const repTimeout = 10 * time.Minute

// errEngine marks failures of cowmig itself (checkpoint, restore, serve or
// a wrong clone), as opposed to failures of the harness.
var errEngine = errors.New("engine")

// repResult is one measured checkpoint and restore.
type repResult struct {
	Workload string    `json:"workload"`
	Mode     benchMode `json:"mode"`
	Rep      int       `json:"rep"`
	// FreezeMs is the engine's freeze (seize to detach).
	FreezeMs float64 `json:"freeze_ms"`
	// CheckpointMs is the whole Checkpoint call.
	CheckpointMs float64 `json:"checkpoint_ms"`
	// WindowMs is the COW window: from the end of the freeze until
	// WindowClosed (live) or until Checkpoint returned (full); 0 for stop
	// and -1 for live-fork, whose window lasts until the release.
	WindowMs float64 `json:"window_ms"`
	// Base is the write phase before the checkpoint, Win the one started
	// right after the freeze; WinOverlap is the fraction of Win's duration
	// that fell inside the window (1 when it ended before the window).
	Base       writeStats `json:"base"`
	Win        writeStats `json:"win"`
	WinOverlap float64    `json:"win_overlap"`
	// RestoreMs is restore-to-running (Restored.Duration); AllLocalMs runs
	// from calling Restore until Serve returned; FillGiBs is the lazy
	// bytes over Serve's time (0 when nothing is lazy).
	RestoreMs  float64 `json:"restore_ms"`
	AllLocalMs float64 `json:"all_local_ms"`
	ServeMs    float64 `json:"serve_ms"`
	FillGiBs   float64 `json:"fill_gibs"`
	PagesTotal uint64  `json:"pages_total"`
	PagesEager uint64  `json:"pages_eager"`
	PagesLazy  uint64  `json:"pages_lazy"`
	// SourceTHPMiB is the workload's AnonHugePages before the checkpoint.
	SourceTHPMiB int `json:"source_thp_mib"`
	// Verified: the clone's checksum equals the source's at checkpoint
	// time; nil when not checked.
	Verified *bool `json:"verified,omitempty"`
}

// runRep runs one rep: workload, baseline writes, checkpoint with a write
// phase in the window, restore, serve, verify, teardown.
func runRep(ctx context.Context, cfg *config, bin string, w workload, mode benchMode, rep int) (res *repResult, err error) {
	// A hung engine must not hang the benchmark; a 4 GiB rep takes < 1 min.
	ctx, cancel := context.WithTimeout(ctx, repTimeout)
	defer cancel()
	res = &repResult{Workload: w.Name, Mode: mode, Rep: rep}
	m, err := startMemload(bin, w.MiB, w.THP, cfg.writes, 5*time.Minute)
	if err != nil {
		return nil, err
	}
	defer m.close()
	res.SourceTHPMiB = anonHugeMiB(m.pid)
	if res.Base, err = m.writePhase(ioTimeout); err != nil {
		return nil, fmt.Errorf("baseline write phase: %w", err)
	}
	var want string
	if cfg.verify {
		if want, err = checksum(m.pid, m.out, ioTimeout); err != nil {
			return nil, fmt.Errorf("source checksum: %w", err)
		}
	}

	tmp, err := os.MkdirTemp(cfg.workDir, "cowbench-")
	if err != nil {
		return nil, fmt.Errorf("create work dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	dir := filepath.Join(tmp, "image")

	src, err := checkpointPhase(ctx, m, mode, dir, filepath.Join(tmp, "pages.sock"), res)
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := src.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("%w: close source: %w", errEngine, cerr)
		}
	}()
	if err := restorePhase(ctx, cfg, dir, tmp, want, res); err != nil {
		return nil, err
	}
	return res, nil
}

// checkpointPhase checkpoints the workload and runs a write phase in the
// COW window. For live the phase is signalled when Checkpoint returns; for
// full, whose window (the drain) ends inside Checkpoint, a watcher signals
// as soon as the engine detaches; for stop there is no window and the
// phase runs after Checkpoint returns.
func checkpointPhase(ctx context.Context, m *memload, bm benchMode, dir, sock string, res *repResult) (*live.Source, error) {
	mode := bm.mode()
	o := live.CheckpointOptions{Options: checkpoint.Options{Mode: mode, COW: bm.cow(), Dir: dir}}
	if mode == image.ModeLive {
		o.Listen = "unix:" + sock
	}
	var watch *detachWatch
	if mode == image.ModeFull {
		watch = watchDetach(m.pid)
	}
	t0 := time.Now()
	src, err := live.Checkpoint(ctx, m.pid, o)
	tRet := time.Now()
	var sentAt time.Time
	if watch != nil {
		var werr error
		sentAt, werr = watch.wait()
		if err == nil && werr != nil {
			src.Close()
			return nil, werr
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%w: checkpoint (%s) pid %d: %w", errEngine, mode, m.pid, err)
	}
	res.FreezeMs = ms(src.Result.Freeze)
	res.CheckpointMs = ms(tRet.Sub(t0))
	st := src.Result.Image.Stats
	res.PagesTotal, res.PagesEager, res.PagesLazy = st.PagesTotal, st.PagesEager, st.PagesLazy
	// The engine's freeze starts just after Checkpoint is called (a stat,
	// a mkdir and a create before the seize), so the window opens at
	// t0+Freeze to within those few microseconds.
	winStart := t0.Add(src.Result.Freeze)

	var winEnd time.Time
	var closed <-chan struct{}
	forkWindow := false
	switch mode {
	case image.ModeLive:
		if bm.cow() == checkpoint.COWFork {
			forkWindow = true // open until the release, after the restore
		} else if src.Result.Snapshot != nil {
			closed = src.Result.Snapshot.WindowClosed()
		} else {
			winEnd = winStart
		}
	case image.ModeFull:
		winEnd = tRet
	}
	if watch == nil {
		sentAt = time.Now()
		if err := m.signal(syscall.SIGUSR1); err != nil {
			src.Close()
			return nil, err
		}
	}

	// Wait for both the write phase and the end of the window.
	timer := time.NewTimer(ioTimeout)
	defer timer.Stop()
	var wline string
	for wline == "" || closed != nil {
		select {
		case <-closed:
			winEnd, closed = time.Now(), nil
		case s, ok := <-m.out.ch:
			if !ok {
				src.Close()
				return nil, fmt.Errorf("%w: source output ended in the COW window (%s): %w%s", errEngine, m.state(), errEOF, m.out.skipped())
			}
			if ok, line := m.out.match(s, "writes "); ok {
				wline = line
			}
		case <-timer.C:
			src.Close()
			return nil, fmt.Errorf("%w: write phase or COW window (%s): not done after %v (write line %q)%s",
				errEngine, mode, ioTimeout, wline, m.out.skipped())
		}
	}
	var err2 error
	if res.Win, err2 = parseWrites(wline); err2 != nil {
		src.Close()
		return nil, err2
	}
	if forkWindow {
		res.WindowMs, res.WinOverlap = -1, 1
	} else if mode != image.ModeStop {
		res.WindowMs = ms(winEnd.Sub(winStart))
		if phase := time.Duration(res.Win.TotalUs) * time.Microsecond; phase > 0 {
			res.WinOverlap = min(1, max(0, float64(winEnd.Sub(sentAt))/float64(phase)))
		}
	}
	return src, nil
}

// restorePhase restores the image, waits until every page is local,
// checks the clone's memory and kills it. The clone's stdout is a pipe so
// that its checksum line can be waited for without polling a file.
func restorePhase(ctx context.Context, cfg *config, dir, tmp, want string, res *repResult) error {
	pr, pw, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("clone pipe: %w", err)
	}
	out := readLines(pr)
	defer out.close()
	t0 := time.Now()
	r, err := live.Restore(ctx, checkpoint.RestoreOptions{Dir: dir, WorkDir: tmp, Stdout: pw, Stderr: pw}, nil)
	pw.Close()
	if err != nil {
		return fmt.Errorf("%w: restore (%s): %w", errEngine, res.Mode, err)
	}
	defer func() {
		r.Kill()
		r.Wait()
	}()
	tRun := time.Now()
	if err := r.Serve(ctx); err != nil {
		return fmt.Errorf("%w: serve lazy pages (%s): %w", errEngine, res.Mode, err)
	}
	tAll := time.Now()
	res.RestoreMs = ms(r.Duration)
	res.AllLocalMs = ms(tAll.Sub(t0))
	res.ServeMs = ms(tAll.Sub(tRun))
	if lazy := float64(res.PagesLazy * image.PageSize); lazy > 0 && tAll.After(tRun) {
		res.FillGiBs = lazy / (1 << 30) / tAll.Sub(tRun).Seconds()
	}
	if cfg.verify {
		got, err := checksum(r.Pid, out, ioTimeout)
		if err != nil {
			return fmt.Errorf("%w: clone checksum (%s): %w", errEngine, res.Mode, err)
		}
		ok := got == want
		res.Verified = &ok
		if !ok {
			return fmt.Errorf("%w: clone checksum %s, source had %s at checkpoint time (%s)", errEngine, got, want, res.Mode)
		}
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
