package ctrbench

import (
	"fmt"
	"io"
	"math"
	"slices"
	"text/tabwriter"
	"time"
)

// median is the median of the values that are not NaN (NaN if none).
func median(v []float64) float64 {
	var x []float64
	for _, f := range v {
		if !math.IsNaN(f) {
			x = append(x, f)
		}
	}
	if len(x) == 0 {
		return math.NaN()
	}
	slices.Sort(x)
	n := len(x)
	if n%2 == 1 {
		return x[n/2]
	}
	return (x[n/2-1] + x[n/2]) / 2
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// num formats a value, "-" when unknown.
func num(f float64, prec int) string {
	if math.IsNaN(f) {
		return "-"
	}
	return fmt.Sprintf("%.*f", prec, f)
}

// ratio formats a/b.
func ratio(a, b float64) string {
	if math.IsNaN(a) || math.IsNaN(b) || b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1fx", a/b)
}

// report prints the medians: one table of checkpoint downtime, the
// ratios between the methods, one table of restores.
func (bn *bench) report(w io.Writer, cfg config) {
	fmt.Fprintf(w, "\n== containerd checkpoint downtime: medians over %d reps; probe GET every %v from host B over the veth, window = %v + command + %v\n",
		cfg.reps, probeInterval, lead, trail)
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "MiB\tmethod\treps\tmaxgap_ms\tworst_gap_ms\tfailed/sent\tshim_freeze_ms\tshim_ckpt_ms\tcmd_ms\twindow_ms\t")
	gaps := map[int]map[string]float64{}
	for _, mib := range cfg.sizes {
		gaps[mib] = map[string]float64{}
		for _, m := range append(methods[:], mQuiet) {
			var gap, freeze, shim, cmd, win []float64
			failed, sent := 0, 0
			worst := math.NaN()
			for _, r := range bn.ckpts {
				if r.mib != mib || r.method != m {
					continue
				}
				g := ms(r.probe.MaxGap)
				gap = append(gap, g)
				if math.IsNaN(worst) || g > worst {
					worst = g
				}
				freeze, shim, cmd = append(freeze, r.freezeMs), append(shim, r.shimMs), append(cmd, r.cmdMs)
				win = append(win, ms(r.probe.Duration))
				failed += r.probe.Failed
				sent += r.probe.Sent
			}
			if len(gap) == 0 {
				continue
			}
			gaps[mib][m] = median(gap)
			fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\t%d/%d\t%s\t%s\t%s\t%s\t\n", mib, m, len(gap),
				num(median(gap), 1), num(worst, 1), failed, sent,
				num(median(freeze), 2), num(median(shim), 1), num(median(cmd), 1), num(median(win), 0))
		}
	}
	tw.Flush()

	fmt.Fprintf(w, "\ndowntime ratios (median maxgap):\n")
	tw = tabwriter.NewWriter(w, 0, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "MiB\tctr task / cowmig live\tctr container / cowmig live\tcowmig stop / cowmig live\tcowmig live / cowmig fork\tcowmig live / quiet\tctr task / quiet\t")
	for _, mib := range cfg.sizes {
		g := gaps[mib]
		get := func(m string) float64 {
			if v, ok := g[m]; ok {
				return v
			}
			return math.NaN()
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t\n", mib,
			ratio(get(mTask), get(mLive)), ratio(get(mContainer), get(mLive)), ratio(get(mStop), get(mLive)),
			ratio(get(mLive), get(mFork)), ratio(get(mLive), get(mQuiet)), ratio(get(mTask), get(mQuiet)))
	}
	tw.Flush()

	fmt.Fprintf(w, "\n== restore to running on host B: `ctr container restore --live` of a `ctr container checkpoint --task` image moved A->B; medians over %d reps\n", cfg.reps)
	tw = tabwriter.NewWriter(w, 0, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "MiB\treps\tcmd_ms\tshim_start_ms\tshim_restore_ms\tfirst_get_ms\tall_local_ms\tpager_pull_ms\tpulled_MiB\tverified\tsource_verify\t")
	for _, mib := range cfg.sizes {
		var cmd, start, rest, first, local, pull, pulled []float64
		verified, n := 0, 0
		for _, r := range bn.rests {
			if r.mib != mib {
				continue
			}
			n++
			cmd, start, rest = append(cmd, r.cmdMs), append(start, r.startMs), append(rest, r.restoreMs)
			first, local, pull = append(first, r.firstGetMs), append(local, r.localMs), append(pull, r.pullMs)
			pulled = append(pulled, float64(r.lazyPages)*pageSize/(1<<20))
			if r.verified {
				verified++
			}
		}
		srcOK := "FAIL"
		if bn.sourceOK[mib] {
			srcOK = "ok"
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d/%d\t%s\t\n", mib, n,
			num(median(cmd), 1), num(median(start), 1), num(median(rest), 1), num(median(first), 1),
			num(median(local), 1), num(median(pull), 1), num(median(pulled), 1), verified, n, srcOK)
	}
	tw.Flush()
}
