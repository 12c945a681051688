// Command cowbench measures cowmig's checkpoint modes side by side on
// memload workloads (bench/memload): freeze time, COW-window length, the
// cost of a write in the window against the same writes without a
// snapshot, restore-to-running, time until every page is local and the
// background-fill rate; medians over repetitions, ratios between modes and
// the project's performance targets, met or missed.
//
//	go run ./bench/cowbench [-sizes 256M,1G,4G] [-modes live,full,stop]
//	    [-reps 3] [-thp4g] [-json]
//
// Every repetition starts a fresh workload and frees everything before the
// next, so at most one source, one snapshot store (or image) and one clone
// exist at a time. It must run as root.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cowmig/cowmig/checkpoint"
	"github.com/cowmig/cowmig/checkpoint/image"
)

// config is the parsed command line.
type config struct {
	workloads  []workload
	modes      []benchMode
	thpModes   []benchMode
	reps       int
	writes     int
	verify     bool
	json       bool
	workDir    string
	memloadSrc string
}

// workload is one memload configuration.
type workload struct {
	Name string `json:"name"`
	MiB  int    `json:"mib"`
	THP  bool   `json:"thp"`
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "cowbench:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	code := run(ctx, cfg, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func parseFlags(args []string) (*config, error) {
	fs := flag.NewFlagSet("cowbench", flag.ContinueOnError)
	sizes := fs.String("sizes", "256M,1G,4G", "workload sizes (M or G suffix, MiB without)")
	modes := fs.String("modes", "live,live-fork,full,stop", "checkpoint modes, run side by side (live-fork, full-fork: copy-on-write method fork)")
	thp4g := fs.Bool("thp4g", true, "also run a 4 GiB MADV_HUGEPAGE workload")
	thpModes := fs.String("thp-modes", "live,live-fork,stop", "modes for the THP workload")
	cfg := &config{}
	fs.IntVar(&cfg.reps, "reps", 3, "repetitions per size and mode (medians are reported)")
	fs.IntVar(&cfg.writes, "writes", 20000, "8-byte writes per write phase, each to a distinct page")
	fs.BoolVar(&cfg.verify, "verify", true, "check every clone's memory checksum against the source's")
	fs.BoolVar(&cfg.json, "json", false, "print JSON instead of tables")
	fs.StringVar(&cfg.workDir, "workdir", os.TempDir(), "directory for images, sockets and the memload binary")
	fs.StringVar(&cfg.memloadSrc, "memload-src", "", "memload.c (default: bench/memload/memload.c above the working directory)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() != 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if cfg.reps < 1 || cfg.writes < 1 {
		return nil, errors.New("-reps and -writes must be at least 1")
	}
	var err error
	if cfg.modes, err = parseModes(*modes); err != nil {
		return nil, err
	}
	for _, s := range strings.Split(*sizes, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		mib, err := parseSize(s)
		if err != nil {
			return nil, err
		}
		cfg.workloads = append(cfg.workloads, workload{Name: sizeName(mib), MiB: mib})
	}
	if *thp4g {
		if cfg.thpModes, err = parseModes(*thpModes); err != nil {
			return nil, err
		}
		cfg.workloads = append(cfg.workloads, workload{Name: "4G-thp", MiB: 4096, THP: true})
	}
	if len(cfg.workloads) == 0 {
		return nil, errors.New("no workload: give -sizes or -thp4g")
	}
	return cfg, nil
}

func parseModes(s string) ([]benchMode, error) {
	var out []benchMode
	for _, f := range strings.Split(s, ",") {
		m := benchMode(strings.TrimSpace(f))
		if m == "" {
			continue
		}
		if !m.valid() {
			return nil, fmt.Errorf("unknown mode %q (live, full, stop, live-fork, full-fork)", m)
		}
		out = append(out, m)
	}
	if len(out) == 0 {
		return nil, errors.New("no mode given")
	}
	return out, nil
}

// benchMode is a checkpoint mode, with "-fork" for the copy-on-write
// method fork (checkpoint.COWFork); without it, uffd.
type benchMode string

func (m benchMode) mode() image.Mode { return image.Mode(strings.TrimSuffix(string(m), "-fork")) }

func (m benchMode) cow() checkpoint.COW {
	if strings.HasSuffix(string(m), "-fork") {
		return checkpoint.COWFork
	}
	return checkpoint.COWUffd
}

func (m benchMode) valid() bool {
	return m.mode().Valid() && (m.cow() == checkpoint.COWUffd || m.mode() != image.ModeStop)
}

// parseSize reads 256M, 1G, 4GiB or a bare number of MiB.
func parseSize(s string) (int, error) {
	u := strings.ToUpper(s)
	u = strings.TrimSuffix(strings.TrimSuffix(u, "IB"), "B")
	mul := 1
	switch {
	case strings.HasSuffix(u, "G"):
		mul, u = 1024, strings.TrimSuffix(u, "G")
	case strings.HasSuffix(u, "M"):
		u = strings.TrimSuffix(u, "M")
	}
	n, err := strconv.Atoi(u)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("size %q: want e.g. 256M or 4G", s)
	}
	return n * mul, nil
}

func sizeName(mib int) string {
	if mib%1024 == 0 {
		return fmt.Sprintf("%dG", mib/1024)
	}
	return fmt.Sprintf("%dM", mib)
}

// modesFor returns the modes run on w.
func (c *config) modesFor(w workload) []benchMode {
	if w.THP {
		return c.thpModes
	}
	return c.modes
}

// run measures everything and reports; it returns the exit code.
func run(ctx context.Context, cfg *config, stdout, stderr io.Writer) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(stderr, "cowbench: must run as root (ptrace, userfaultfd, clone3 set_tid)")
		return 2
	}
	src := cfg.memloadSrc
	if src == "" {
		var err error
		if src, err = findMemloadSrc(); err != nil {
			fmt.Fprintln(stderr, "cowbench:", err)
			return 2
		}
	}
	binDir, err := os.MkdirTemp(cfg.workDir, "cowbench-bin-")
	if err != nil {
		fmt.Fprintln(stderr, "cowbench: create bin dir:", err)
		return 2
	}
	defer os.RemoveAll(binDir)
	bin, err := buildMemload(src, binDir)
	if err != nil {
		fmt.Fprintln(stderr, "cowbench:", err)
		return 2
	}
	env := machine()
	fmt.Fprintf(stderr, "cowbench: %s\n", env)

	var results []*repResult
	var runErr error
	start := time.Now()
	// Other work on the machine skews every figure: report the load.
	load0 := loadavg()
loop:
	for _, w := range cfg.workloads {
		// Reps outermost, modes innermost: drift over the run hits every
		// mode alike.
		for rep := 1; rep <= cfg.reps; rep++ {
			for _, mode := range cfg.modesFor(w) {
				if err := ctx.Err(); err != nil {
					runErr = err
					break loop
				}
				warnMemory(stderr, w)
				t := time.Now()
				res, err := runRep(ctx, cfg, bin, w, mode, rep)
				// The live snapshot store is mapped in this process;
				// give the Go heap back as well before the next rep.
				debug.FreeOSMemory()
				if err != nil {
					runErr = fmt.Errorf("%s %s rep %d: %w", w.Name, mode, rep, err)
					break loop
				}
				results = append(results, res)
				fmt.Fprintf(stderr, "cowbench: %-6s %-4s rep %d: freeze %.2f ms, window %.1f ms, restore %.2f ms, all local %.1f ms, fill %.2f GiB/s, win p99 %d ns (base %d), %s [%.1fs]\n",
					w.Name, mode, rep, res.FreezeMs, res.WindowMs, res.RestoreMs, res.AllLocalMs, res.FillGiBs,
					res.Win.P99, res.Base.P99, verifiedWord(res.Verified), time.Since(t).Seconds())
			}
		}
	}
	rows := medians(cfg, results)
	targets := checkTargets(rows)
	if cfg.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		out := struct {
			Machine string       `json:"machine"`
			Load    [2]string    `json:"loadavg_start_end"`
			Reps    int          `json:"reps"`
			Writes  int          `json:"writes"`
			Rows    []row        `json:"rows"`
			Ratios  []ratio      `json:"ratios"`
			Targets []target     `json:"targets"`
			Runs    []*repResult `json:"runs"`
			Error   string       `json:"error,omitempty"`
		}{env, [2]string{load0, loadavg()}, cfg.reps, cfg.writes, rows, ratios(rows), targets, results, errString(runErr)}
		enc.Encode(out)
	} else {
		fmt.Fprintf(stdout, "cowbench: %s\n", env)
		fmt.Fprintf(stdout, "medians over %d rep(s); %d writes per phase; total %.0fs; load average at start %s, at end %s\n\n",
			cfg.reps, cfg.writes, time.Since(start).Seconds(), load0, loadavg())
		printTable(stdout, rows)
		printRatios(stdout, ratios(rows))
		printTargets(stdout, targets)
	}
	if runErr != nil {
		fmt.Fprintf(stderr, "cowbench: FAILED: %v\n", runErr)
		return 1
	}
	return 0
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func verifiedWord(v *bool) string {
	switch {
	case v == nil:
		return "not verified"
	case *v:
		return "verified"
	}
	return "MISMATCH"
}

// machine describes the host in one line.
func machine() string {
	var u syscall.Utsname
	syscall.Uname(&u)
	rel := utsString(u.Release[:])
	mem := int64(-1)
	if f, err := os.Open("/proc/meminfo"); err == nil {
		mem = meminfoField(f, "MemTotal:")
		f.Close()
	}
	thp, _ := os.ReadFile("/sys/kernel/mm/transparent_hugepage/enabled")
	return fmt.Sprintf("kernel %s, %d CPUs, %.1f GiB RAM, THP %s, %s", rel, runtime.NumCPU(),
		float64(mem)/(1<<20), strings.TrimSpace(string(thp)), runtime.Version())
}

// loadavg returns the 1-minute load average.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

func utsString(b []int8) string {
	s := make([]byte, 0, len(b))
	for _, c := range b {
		if c == 0 {
			break
		}
		s = append(s, byte(c))
	}
	return string(s)
}

// warnMemory warns when a rep of w may not fit: source, snapshot store or
// image, and clone each hold the whole workload.
func warnMemory(w io.Writer, wl workload) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return
	}
	defer f.Close()
	avail := meminfoField(f, "MemAvailable:") >> 10
	if need := int64(3*wl.MiB + 1024); avail >= 0 && avail < need {
		fmt.Fprintf(w, "cowbench: warning: %d MiB available, a %s rep needs about %d MiB\n", avail, wl.Name, need)
	}
}
