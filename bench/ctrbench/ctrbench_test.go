package ctrbench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cowmig/cowmig/internal/ctrtest"
	"github.com/cowmig/cowmig/internal/live"
	"github.com/cowmig/cowmig/shim/shimapi"
)

const (
	// probeInterval is how often the probe sends GET.
	probeInterval = time.Millisecond
	// probeTimeout bounds one GET: long enough that a frozen server's
	// late answer counts as a gap, not a failure.
	probeTimeout = 5 * time.Second
	// lead and trail frame each checkpoint command in the probe window,
	// so that the window's longest gap is the checkpoint's doing.
	lead, trail = 200 * time.Millisecond, 200 * time.Millisecond
	// logWait bounds the wait for the shim's line in containerd's log
	// (the shim's log reaches containerd through a fifo, a bit later).
	logWait = 5 * time.Second
	// daemonWait bounds the wait for a page server to go away.
	daemonWait = 10 * time.Second
	// restoreWait bounds a restore's first answer and its lazy pull.
	restoreWait = 2 * time.Minute
	// verifyTimeout bounds a VERIFY (it reads all of the memory).
	verifyTimeout = time.Minute
	pageSize      = 4096
)

// The ways of checkpointing compared.
const (
	mTask      = "ctr task checkpoint"
	mContainer = "ctr container checkpoint --task"
	mLive      = "cowmig checkpoint (live)"
	mFork      = "cowmig checkpoint --cow fork"
	mStop      = "cowmig checkpoint --mode stop"
	mQuiet     = "quiet window, no checkpoint"
)

// methods are the checkpoints in the order of the first rep; later reps
// rotate it so that no method always follows another.
var methods = [...]string{mTask, mContainer, mLive, mFork, mStop}

// ckptRep is one probe window.
type ckptRep struct {
	mib    int
	method string
	rep    int
	probe  ctrtest.ProbeResult
	// freezeMs is the shim's ptrace freeze; shimMs its whole Checkpoint
	// call (known for the cowmig CLI only); cmdMs the command's wall
	// time; NaN when unknown.
	freezeMs, shimMs, cmdMs float64
}

// restoreRep is one restore on B.
type restoreRep struct {
	mib, rep int
	// cmdMs is `ctr container restore --live`; startMs and restoreMs are
	// the shim's (its Start call; the morph); firstGetMs and localMs
	// count from the command's start; pullMs is the pager's own count.
	cmdMs, startMs, restoreMs, firstGetMs, localMs, pullMs float64
	lazyPages                                              uint64
	verified                                               bool
}

// bench is one run: the hosts, the binaries and the results.
type bench struct {
	t     *testing.T
	a, b  *ctrtest.Host
	bins  binaries
	work  string
	ckpts []ckptRep
	rests []restoreRep
	// sourceOK counts sizes whose source passed VERIFY at the end.
	sourceOK map[int]bool
}

// source is the container being checkpointed on A.
type source struct {
	id   string
	mib  int
	addr string // from B: A's veth address
	pid  int
}

func TestContainerdBench(t *testing.T) {
	if os.Getenv(envBench) != "1" {
		t.Skipf("benchmark: set %s=1 to run it (scripts/bench.sh does)", envBench)
	}
	ctrtest.SkipUnlessContainerd(t)
	cfg, err := readConfig()
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	bins := buildBinaries(t)
	a, b := ctrtest.CowmigHosts(t, bins.dir)
	bn := &bench{t: t, a: a, b: b, bins: bins, work: t.TempDir(), sourceOK: map[int]bool{}}
	for _, mib := range cfg.sizes {
		bn.runSize(mib, cfg.reps)
	}
	bn.report(os.Stdout, cfg)
	fmt.Printf("\ntotal run time %v (%d reps, sizes %v MiB)\n", time.Since(began).Round(time.Second), cfg.reps, cfg.sizes)
}

// runSize starts a kvserver of mib MiB on A and runs every rep on it.
func (bn *bench) runSize(mib, reps int) {
	t := bn.t
	id := fmt.Sprintf("kv%d", mib)
	addr := bn.a.RunKV(t, id, shimapi.RuntimeName, "-mib", strconv.Itoa(mib), "-port", kvPort)
	src := &source{id: id, mib: mib, addr: addr}
	src.pid, _ = bn.a.TaskPid(t, id)
	t.Logf("source %s: %d MiB, pid %d, at %s", id, mib, src.pid, addr)
	for rep := 0; rep < reps; rep++ {
		var longest float64
		for i := range methods {
			m := methods[(i+rep)%len(methods)]
			r := bn.checkpoint(src, m, rep)
			longest = max(longest, r.cmdMs)
		}
		bn.quiet(src, rep, time.Duration(longest*float64(time.Millisecond)))
	}
	// The source must have come through every checkpoint intact.
	line, err := bn.a.Query(addr, "VERIFY", verifyTimeout)
	bn.sourceOK[mib] = err == nil && strings.HasPrefix(line, "verify ok")
	if !bn.sourceOK[mib] {
		t.Errorf("source %s after the checkpoints: VERIFY answered %q (%v)", id, line, err)
	}
	removeContainer(t, bn.a, id)
}

// window probes the source from B while run runs, from lead before it to
// trail after it returns; it returns the probe's result and run's time.
func (bn *bench) window(src *source, run func() error) (ctrtest.ProbeResult, time.Duration, error) {
	p, err := ctrtest.StartProbe(bn.b.Netns().Name, src.addr, probeInterval, probeTimeout)
	if err != nil {
		return ctrtest.ProbeResult{}, 0, err
	}
	pause(lead)
	t0 := time.Now()
	err = run()
	d := time.Since(t0)
	pause(trail)
	return p.Stop(), d, err
}

// pause waits d: the probe window's frame, not a synchronisation.
func pause(d time.Duration) {
	tm := time.NewTimer(d)
	<-tm.C
}

// quiet probes the source for as long as a checkpoint window, without a
// checkpoint: the noise floor.
func (bn *bench) quiet(src *source, rep int, d time.Duration) {
	res, _, _ := bn.window(src, func() error { pause(d); return nil })
	r := ckptRep{mib: src.mib, method: mQuiet, rep: rep, probe: res, freezeMs: math.NaN(), shimMs: math.NaN(), cmdMs: math.NaN()}
	bn.ckpts = append(bn.ckpts, r)
	bn.t.Logf("%d MiB rep %d %-32s probe %v", src.mib, rep, mQuiet, res)
}

// checkpoint checkpoints the source with method m in a probe window,
// releases the snapshot, and for `ctr container checkpoint` restores it
// on B first.
func (bn *bench) checkpoint(src *source, m string, rep int) ckptRep {
	t := bn.t
	if left := pageServers(src.pid); len(left) > 0 {
		t.Fatalf("page servers %v of an earlier checkpoint of pid %d still run", left, src.pid)
	}
	r := ckptRep{mib: src.mib, method: m, rep: rep, freezeMs: math.NaN(), shimMs: math.NaN()}
	logOff := len(bn.a.Log())
	var out string
	var run func() error
	var dir, ref string
	switch m {
	case mTask:
		run = func() (err error) { out, err = bn.a.Ctr("task", "checkpoint", src.id); return err }
	case mContainer:
		ref = fmt.Sprintf("ckpt/%s:rep%d", src.id, rep)
		run = func() (err error) { out, err = bn.a.Ctr("container", "checkpoint", "--task", src.id, ref); return err }
	case mLive, mFork, mStop:
		mode, cow := "live", "uffd"
		switch m {
		case mStop:
			mode = "stop"
		case mFork:
			cow = "fork"
		}
		dir = filepath.Join(bn.work, fmt.Sprintf("img-%s-%s-%d", mode, cow, rep))
		run = func() (err error) {
			out, err = bn.cowmig("checkpoint", "--address", bn.a.Address(), "--namespace", bn.a.Namespace(),
				"--image", dir, "--mode", mode, "--cow", cow, "--json", src.id)
			return err
		}
	}
	res, d, err := bn.window(src, run)
	if err != nil {
		t.Fatalf("%s of %s: %v\n%s", m, src.id, err, out)
	}
	r.probe, r.cmdMs = res, live.Ms(d)

	switch m {
	case mTask, mContainer:
		var line string
		r.freezeMs, line = bn.shimFreeze(logOff, src.id)
		if rep == 0 {
			t.Logf("containerd log: %s", line)
		}
		if m == mTask {
			ref = ctrtest.CheckpointRef(t, out)
		}
		if m == mContainer {
			bn.restore(src, ref, rep)
		}
		if left := waitPageServersGone(src.pid, true, daemonWait); len(left) > 0 {
			t.Fatalf("page servers %v of pid %d survive SIGKILL", left, src.pid)
		}
		bn.a.MustCtr(t, "image", "rm", ref)
	case mLive, mFork, mStop:
		var st live.CheckpointStats
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("%s: decode --json output %q: %v", m, out, err)
		}
		r.freezeMs, r.shimMs = st.FreezeMs, st.CheckpointMs
		if m != mStop {
			if rel, err := bn.a.Exec(bn.bins.cowmig, "release", "--image", dir); err != nil {
				t.Errorf("cowmig release --image %s: %v\n%s", dir, err, rel)
			}
		}
		if left := waitPageServersGone(src.pid, false, daemonWait); len(left) > 0 {
			t.Errorf("%s: page servers %v of pid %d still run %v after the release; killing them", m, left, src.pid, daemonWait)
			waitPageServersGone(src.pid, true, daemonWait)
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
	}
	bn.ckpts = append(bn.ckpts, r)
	t.Logf("%d MiB rep %d %-32s freeze %.2f ms, shim %.1f ms, command %.1f ms; probe %v",
		src.mib, rep, m, r.freezeMs, r.shimMs, r.cmdMs, res)
	return r
}

// cowmig runs the cowmig CLI and returns its stdout; the error carries
// its stderr.
func (bn *bench) cowmig(args ...string) (string, error) {
	cmd := exec.Command(bn.bins.cowmig, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("cowmig %s: %w\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

// freezeRE is the shim's checkpoint line in containerd's log.
var freezeRE = regexp.MustCompile(`cowmig checkpoint: \w+, froze ([0-9.]+) ms`)

// shimFreeze finds the shim's newest "cowmig checkpoint: ..., froze X ms"
// line for container id in A's containerd log past offset off, and
// returns X and the line.
func (bn *bench) shimFreeze(off int, id string) (float64, string) {
	deadline := time.Now().Add(logWait)
	for {
		log := bn.a.Log()
		if off > len(log) {
			off = 0
		}
		lines := strings.Split(log[off:], "\n")
		for i := len(lines) - 1; i >= 0; i-- {
			l := lines[i]
			if m := freezeRE.FindStringSubmatch(l); m != nil && strings.Contains(l, id) {
				v, _ := strconv.ParseFloat(m[1], 64)
				return v, l
			}
		}
		if time.Now().After(deadline) {
			bn.t.Errorf("no \"cowmig checkpoint: ..., froze\" line for %s in containerd's log after %v", id, logWait)
			return math.NaN(), ""
		}
		time.Sleep(10 * time.Millisecond) // the log is a file: poll it
	}
}

// pagerDoneRE is the pager's last line once every page is local.
var pagerDoneRE = regexp.MustCompile(`all (\d+) lazy pages local after (\S+)`)

// restore moves checkpoint image ref from A to B, restores it there as a
// new container, measures it, verifies the clone and removes it.
func (bn *bench) restore(src *source, ref string, rep int) {
	t := bn.t
	a, b := bn.a, bn.b
	tar := filepath.Join(bn.work, "checkpoint.tar")
	// --local: through the transfer API (the default), ctr v2.4.2 can
	// exit 0 before its goroutine has copied the whole stream into the
	// file (core/transfer/archive ImageExportStream.MarshalAny does not
	// wait for it): the archive then ends in the middle of a blob.
	a.MustCtr(t, "image", "export", "--local", "--skip-manifest-json", tar, ref)
	if out, err := b.Ctr("image", "import", tar); err != nil {
		t.Fatalf("host b: %v\n%s\n%s", err, out, bn.exportDiagnosis(tar, ref))
	}
	if err := os.Remove(tar); err != nil {
		t.Fatal(err)
	}
	id := fmt.Sprintf("clone%d-%d", src.mib, rep)
	addr := b.IP() + ":" + kvPort
	bundle := filepath.Join(b.State(), "io.containerd.runtime.v2.task", b.Namespace(), id)
	r := restoreRep{mib: src.mib, rep: rep}

	t0 := time.Now()
	firstGet := bn.pollFirstGet(addr, t0)
	out, err := b.Ctr("container", "restore", "--live", id, ref)
	r.cmdMs = live.Ms(time.Since(t0))
	if err != nil {
		firstGet.stop()
		t.Fatalf("host b: %v\n%s", err, out)
	}
	var st live.RestoreStats
	statsPath := filepath.Join(bundle, "cowmig-restore.json")
	if data, err := os.ReadFile(statsPath); err != nil {
		t.Errorf("restore %s: %v", id, err)
	} else if err := json.Unmarshal(data, &st); err != nil {
		t.Errorf("restore %s: decode %s: %v", id, statsPath, err)
	}
	r.startMs, r.restoreMs, r.lazyPages = st.StartMs, st.RestoreMs, st.LazyPages

	logPath := filepath.Join(bundle, "cowmig-pager.log")
	r.localMs, r.pullMs = math.NaN(), math.NaN()
	for {
		data, _ := os.ReadFile(logPath)
		if m := pagerDoneRE.FindStringSubmatch(string(data)); m != nil {
			r.localMs = live.Ms(time.Since(t0))
			if d, err := time.ParseDuration(m[2]); err == nil {
				r.pullMs = live.Ms(d)
			}
			if n, _ := strconv.ParseUint(m[1], 10, 64); n != st.LazyPages {
				t.Errorf("restore %s: the pager made %d pages local, cowmig-restore.json says %d lazy", id, n, st.LazyPages)
			}
			break
		}
		if strings.Contains(string(data), "killed") || strings.Contains(string(data), "exited after") {
			t.Errorf("restore %s: the pager failed:\n%s", id, data)
			break
		}
		if time.Since(t0) > restoreWait {
			t.Errorf("restore %s: not all pages local after %v; pager log:\n%s", id, restoreWait, data)
			break
		}
		time.Sleep(5 * time.Millisecond) // the log is a file: poll it
	}
	if d, ok := firstGet.wait(); ok {
		r.firstGetMs = live.Ms(d)
	} else {
		r.firstGetMs = math.NaN()
		t.Errorf("restore %s: the clone did not answer GET within %v", id, restoreWait)
	}

	line, err := b.Query(addr, "VERIFY", verifyTimeout)
	r.verified = err == nil && strings.HasPrefix(line, "verify ok")
	if !r.verified {
		pager, _ := os.ReadFile(logPath)
		t.Errorf("clone %s of %s (ctr container restore --live %s %s): VERIFY answered %q (%v)\npager log:\n%s",
			id, src.id, id, ref, line, err, pager)
	}
	bn.rests = append(bn.rests, r)
	t.Logf("%d MiB rep %d restore: command %.1f ms, shim start %.1f ms, restore %.1f ms, first GET %.1f ms, all local %.1f ms (pager %.1f ms), %d lazy pages, VERIFY %q",
		src.mib, rep, r.cmdMs, r.startMs, r.restoreMs, r.firstGetMs, r.localMs, r.pullMs, r.lazyPages, line)
	removeContainer(t, b, id)
	b.MustCtr(t, "image", "rm", ref)
}

// getPoller sends GET to a restoring clone until it first answers.
type getPoller struct {
	quit chan struct{}
	done chan time.Duration // since the start; negative: none
}

// pollFirstGet starts sending GET to addr from B's network namespace
// every millisecond; wait returns the time from t0 to the first answer.
func (bn *bench) pollFirstGet(addr string, t0 time.Time) *getPoller {
	p := &getPoller{quit: make(chan struct{}), done: make(chan time.Duration, 1)}
	ns := bn.b.Netns().Name
	go func() {
		for {
			select {
			case <-p.quit:
				p.done <- -1
				return
			default:
			}
			line, err := ctrtest.Query(ns, addr, "GET", time.Second)
			if err == nil && strings.HasPrefix(line, "count ") {
				p.done <- time.Since(t0)
				return
			}
			if time.Since(t0) > restoreWait {
				p.done <- -1
				return
			}
			// Nothing listens yet, and a server in another netns
			// offers nothing to wait on: poll.
			time.Sleep(probeInterval)
		}
	}()
	return p
}

// wait returns the time to the first answer, or false if there was none.
func (p *getPoller) wait() (time.Duration, bool) {
	d := <-p.done
	return d, d >= 0
}

// stop ends the poller without an answer.
func (p *getPoller) stop() {
	close(p.quit)
	<-p.done
}
