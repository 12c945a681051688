package main

import (
	"fmt"
	"io"
	"slices"
	"text/tabwriter"

	"github.com/cowmig/cowmig/checkpoint/image"
)

// row is the medians of one workload and mode.
type row struct {
	Workload     string    `json:"workload"`
	MiB          int       `json:"mib"`
	Mode         benchMode `json:"mode"`
	Reps         int       `json:"reps"`
	FreezeMs     float64   `json:"freeze_ms"`
	CheckpointMs float64   `json:"checkpoint_ms"`
	WindowMs     float64   `json:"window_ms"`
	WinOverlap   float64   `json:"win_overlap"`
	BaseP50      float64   `json:"base_p50_ns"`
	WinP50       float64   `json:"win_p50_ns"`
	BaseP99      float64   `json:"base_p99_ns"`
	WinP99       float64   `json:"win_p99_ns"`
	BaseMean     float64   `json:"base_mean_ns"`
	WinMean      float64   `json:"win_mean_ns"`
	BaseMax      float64   `json:"base_max_ns"`
	WinMax       float64   `json:"win_max_ns"`
	RestoreMs    float64   `json:"restore_ms"`
	AllLocalMs   float64   `json:"all_local_ms"`
	FillGiBs     float64   `json:"fill_gibs"`
	LazyMiB      float64   `json:"lazy_mib"`
	THPMiB       float64   `json:"source_thp_mib"`
	// Verified counts reps whose clone checksum matched.
	Verified int `json:"verified"`
}

// medians groups results by workload and mode, in run order.
func medians(cfg *config, results []*repResult) []row {
	var rows []row
	for _, w := range cfg.workloads {
		for _, m := range cfg.modesFor(w) {
			var rs []*repResult
			for _, r := range results {
				if r.Workload == w.Name && r.Mode == m {
					rs = append(rs, r)
				}
			}
			if len(rs) == 0 {
				continue
			}
			med := func(f func(*repResult) float64) float64 {
				v := make([]float64, len(rs))
				for i, r := range rs {
					v[i] = f(r)
				}
				return median(v)
			}
			r := row{Workload: w.Name, MiB: w.MiB, Mode: m, Reps: len(rs),
				FreezeMs:     med(func(r *repResult) float64 { return r.FreezeMs }),
				CheckpointMs: med(func(r *repResult) float64 { return r.CheckpointMs }),
				WindowMs:     med(func(r *repResult) float64 { return r.WindowMs }),
				WinOverlap:   med(func(r *repResult) float64 { return r.WinOverlap }),
				BaseP50:      med(func(r *repResult) float64 { return float64(r.Base.P50) }),
				WinP50:       med(func(r *repResult) float64 { return float64(r.Win.P50) }),
				BaseP99:      med(func(r *repResult) float64 { return float64(r.Base.P99) }),
				WinP99:       med(func(r *repResult) float64 { return float64(r.Win.P99) }),
				BaseMean:     med(func(r *repResult) float64 { return float64(r.Base.Mean) }),
				WinMean:      med(func(r *repResult) float64 { return float64(r.Win.Mean) }),
				BaseMax:      med(func(r *repResult) float64 { return float64(r.Base.Max) }),
				WinMax:       med(func(r *repResult) float64 { return float64(r.Win.Max) }),
				RestoreMs:    med(func(r *repResult) float64 { return r.RestoreMs }),
				AllLocalMs:   med(func(r *repResult) float64 { return r.AllLocalMs }),
				FillGiBs:     med(func(r *repResult) float64 { return r.FillGiBs }),
				LazyMiB:      med(func(r *repResult) float64 { return float64(r.PagesLazy) * image.PageSize / (1 << 20) }),
				THPMiB:       med(func(r *repResult) float64 { return float64(r.SourceTHPMiB) }),
			}
			for _, x := range rs {
				if x.Verified != nil && *x.Verified {
					r.Verified++
				}
			}
			rows = append(rows, r)
		}
	}
	return rows
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// div is a/b, or 0 when b is 0.
func div(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

func printTable(w io.Writer, rows []row) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "workload\tmode\tfreeze_ms\twindow_ms\tin_win\tp50_base\tp50_win\tp50_x\tp99_base\tp99_win\tp99_x\tmean_x\tmax_base_us\tmax_win_us\trestore_ms\tall_local_ms\tfill_GiB/s\tlazy_MiB\tthp_MiB\tverified\t")
	for _, r := range rows {
		fill := "-"
		if r.FillGiBs > 0 {
			fill = fmt.Sprintf("%.2f", r.FillGiBs)
		}
		window := fmt.Sprintf("%.1f", r.WindowMs)
		if r.WindowMs < 0 {
			window = "release"
		}
		fmt.Fprintf(tw, "%s\t%s\t%.2f\t%s\t%.0f%%\t%.0f\t%.0f\t%.2f\t%.0f\t%.0f\t%.2f\t%.2f\t%.1f\t%.1f\t%.2f\t%.1f\t%s\t%.0f\t%.0f\t%d/%d\t\n",
			r.Workload, r.Mode, r.FreezeMs, window, 100*r.WinOverlap,
			r.BaseP50, r.WinP50, div(r.WinP50, r.BaseP50),
			r.BaseP99, r.WinP99, div(r.WinP99, r.BaseP99), div(r.WinMean, r.BaseMean),
			r.BaseMax/1000, r.WinMax/1000,
			r.RestoreMs, r.AllLocalMs, fill, r.LazyMiB, r.THPMiB, r.Verified, r.Reps)
	}
	tw.Flush()
	fmt.Fprintln(w, `
  freeze_ms     engine freeze (seize .. detach)
  window_ms     COW window: end of freeze .. WindowClosed (live), .. Checkpoint returned (full); stop has none;
                live-fork: the shadow keeps the snapshot until it is released ("release")
  in_win        share of the window write phase that ran before the window closed
  p50/p99       8-byte write latency (ns) at distinct pages: base = no snapshot, win = started right after
                the freeze (live: when Checkpoint returned; full: on detach; stop: after Checkpoint, no window);
                _x = win / base; mean_x compares mean latencies; max_*_us is the slowest single write (µs)
  restore_ms    restore-to-running (Restored.Duration); all_local_ms = Restore called .. Serve returned
  fill_GiB/s    lazy bytes / time in Serve (live only)`)
}

// ratio compares two modes on one workload.
type ratio struct {
	Workload string    `json:"workload"`
	Of       benchMode `json:"of"`
	To       benchMode `json:"to"`
	Freeze   float64   `json:"freeze"`
	Restore  float64   `json:"restore"`
	AllLocal float64   `json:"all_local"`
}

// ratios compares every other mode with live, per workload.
func ratios(rows []row) []ratio {
	var out []ratio
	for _, l := range rows {
		if l.Mode != "live" {
			continue
		}
		for _, o := range rows {
			if o.Workload != l.Workload || o.Mode == "live" {
				continue
			}
			out = append(out, ratio{Workload: l.Workload, Of: o.Mode, To: l.Mode,
				Freeze: div(o.FreezeMs, l.FreezeMs), Restore: div(o.RestoreMs, l.RestoreMs), AllLocal: div(o.AllLocalMs, l.AllLocalMs)})
		}
	}
	return out
}

func printRatios(w io.Writer, rs []ratio) {
	if len(rs) == 0 {
		return
	}
	fmt.Fprintln(w, "\nratios (other mode / live; > 1 means live is faster):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "workload\tmodes\tfreeze\trestore-to-running\tall-local\t")
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t%s/%s\t%.1fx\t%.1fx\t%.2fx\t\n", r.Workload, r.Of, r.To, r.Freeze, r.Restore, r.AllLocal)
	}
	tw.Flush()
}

// target is one performance goal from the issue.
type target struct {
	Name     string  `json:"name"`
	Goal     string  `json:"goal"`
	Measured float64 `json:"measured"`
	Unit     string  `json:"unit"`
	// Status is met, missed, info (a reference figure) or not measured.
	Status string `json:"status"`
}

// checkTargets evaluates the targets on the medians.
func checkTargets(rows []row) []target {
	find := func(wl string, m benchMode) *row {
		for i := range rows {
			if rows[i].Workload == wl && rows[i].Mode == m {
				return &rows[i]
			}
		}
		return nil
	}
	var out []target
	atMost := func(name, goal string, r *row, v func(*row) float64, limit float64, unit string) {
		t := target{Name: name, Goal: goal, Unit: unit, Status: "not measured"}
		if r != nil {
			t.Measured = v(r)
			t.Status = "met"
			if t.Measured > limit {
				t.Status = "missed"
			}
		}
		out = append(out, t)
	}
	freeze := func(r *row) float64 { return r.FreezeMs }
	lives := []benchMode{"live", "live-fork"}
	for _, m := range lives {
		atMost(fmt.Sprintf("%s freeze, 1 GiB", m), "<= 20 ms", find("1G", m), freeze, 20, "ms")
		atMost(fmt.Sprintf("%s freeze, 4 GiB", m), "<= 60 ms", find("4G", m), freeze, 60, "ms")
	}
	for _, ref := range []struct {
		wl string
		ms float64
	}{{"1G", 1000}, {"4G", 2900}} {
		if r := find(ref.wl, "stop"); r != nil {
			out = append(out, target{Name: "stop-and-copy freeze, " + ref.wl + " (reference)",
				Goal: fmt.Sprintf("~%.0f ms in the issue", ref.ms), Measured: r.FreezeMs, Unit: "ms", Status: "info"})
		}
	}
	for _, r := range rows {
		if r.Mode.mode() != image.ModeLive {
			continue
		}
		atMost(fmt.Sprintf("lazy restore-to-running, %s %s", r.Workload, r.Mode), "<= 30 ms", &r, func(r *row) float64 { return r.RestoreMs }, 30, "ms")
	}
	for _, r := range rows {
		if r.Mode.mode() != image.ModeLive {
			continue
		}
		t := target{Name: fmt.Sprintf("background fill (unix socket), %s %s", r.Workload, r.Mode), Goal: ">= 2 GiB/s", Measured: r.FillGiBs, Unit: "GiB/s", Status: "met"}
		if r.FillGiBs < 2 {
			t.Status = "missed"
		}
		out = append(out, t)
	}
	limit := 5 + 0.3*4
	for _, m := range lives {
		atMost(fmt.Sprintf("%s freeze, 4 GiB THP", m), fmt.Sprintf("<= 5 ms + 0.3 ms/GiB = %.1f ms", limit), find("4G-thp", m), freeze, limit, "ms")
	}
	return out
}

func printTargets(w io.Writer, ts []target) {
	fmt.Fprintln(w, "\ntargets (medians):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, t := range ts {
		val := "-"
		if t.Status != "not measured" {
			val = fmt.Sprintf("%.2f %s", t.Measured, t.Unit)
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", t.Name, t.Goal, val, t.Status)
	}
	tw.Flush()
}
