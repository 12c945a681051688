package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// errEOF is returned by lines.expect when the writer closed its end.
var errEOF = errors.New("output ended")

// findMemloadSrc returns bench/memload/memload.c of the module cowbench
// runs in: go run leaves no trace of the source directory in the binary, so
// look for it from the working directory upwards.
func findMemloadSrc() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	for {
		p := filepath.Join(dir, "bench", "memload", "memload.c")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("find bench/memload/memload.c: not under the working directory or its parents (use -memload-src)")
		}
		dir = parent
	}
}

// buildMemload compiles src into dir with gcc -O2 and returns the binary.
func buildMemload(src, dir string) (string, error) {
	bin := filepath.Join(dir, "memload")
	out, err := exec.Command("gcc", "-O2", "-Wall", "-o", bin, src).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("gcc %s: %w\n%s", src, err, out)
	}
	return bin, nil
}

// lines delivers the lines a process writes into a pipe. The reading
// goroutine stops at end of file or when close is called.
type lines struct {
	r    *os.File
	ch   chan string
	stop chan struct{}
	done chan struct{}
	mu   sync.Mutex // guards other
	// other keeps the lines expect skipped, for error messages.
	other []string
}

func readLines(r *os.File) *lines {
	l := &lines{r: r, ch: make(chan string, 16), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		defer close(l.ch)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			select {
			case l.ch <- sc.Text():
			case <-l.stop:
				return
			}
		}
	}()
	return l
}

// expect returns the next line starting with prefix, skipping others.
func (l *lines) expect(prefix string, timeout time.Duration) (string, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case s, ok := <-l.ch:
			if !ok {
				return "", fmt.Errorf("waiting for %q: %w%s", prefix, errEOF, l.skipped())
			}
			if ok, line := l.match(s, prefix); ok {
				return line, nil
			}
		case <-t.C:
			return "", fmt.Errorf("waiting for %q: timed out after %v%s", prefix, timeout, l.skipped())
		}
	}
}

// match reports whether s starts with prefix and otherwise keeps s.
func (l *lines) match(s, prefix string) (bool, string) {
	if strings.HasPrefix(s, prefix) {
		return true, s
	}
	l.mu.Lock()
	l.other = append(l.other, s)
	l.mu.Unlock()
	return false, ""
}

func (l *lines) skipped() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.other) == 0 {
		return ""
	}
	return " (output: " + strings.Join(l.other, " | ") + ")"
}

// close stops the reader and closes the read end.
func (l *lines) close() {
	close(l.stop)
	l.r.Close()
	<-l.done
}

// memload is one running workload process.
type memload struct {
	cmd *exec.Cmd
	out *lines
	pid int
	// unpin releases the goroutine that holds the forking thread; pinned
	// is closed when it has returned.
	unpin  chan struct{}
	pinned chan struct{}
}

// startMemload starts bin and waits for its "ready" line. Its stdout and
// stderr are one pipe (the engine records pipes on stdio as stdio, which a
// restore replaces with the descriptors it is given).
func startMemload(bin string, mib int, thp bool, writes int, timeout time.Duration) (*memload, error) {
	args := []string{"-mib", strconv.Itoa(mib), "-writes", strconv.Itoa(writes)}
	if thp {
		args = append(args, "-thp")
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("memload pipe: %w", err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = pw, pw
	// The workload must not outlive a killed benchmark. The parent-death
	// signal fires when the forking *thread* exits, and the Go runtime ends
	// threads whose locked goroutine returns (the engine's ptrace tracers
	// do), so fork from a thread pinned until close.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	unpin := make(chan struct{})
	pinned := make(chan struct{})
	started := make(chan error, 1)
	go func() {
		defer close(pinned)
		runtime.LockOSThread()
		err := cmd.Start()
		started <- err
		if err == nil {
			<-unpin
		}
		runtime.UnlockOSThread()
	}()
	if err := <-started; err != nil {
		<-pinned
		pr.Close()
		pw.Close()
		return nil, fmt.Errorf("start memload: %w", err)
	}
	pw.Close()
	m := &memload{cmd: cmd, out: readLines(pr), pid: cmd.Process.Pid, unpin: unpin, pinned: pinned}
	if _, err := m.out.expect("ready ", timeout); err != nil {
		m.close()
		return nil, fmt.Errorf("memload -mib %d: %w", mib, err)
	}
	return m, nil
}

// signal sends sig to the workload.
func (m *memload) signal(sig syscall.Signal) error {
	if err := syscall.Kill(m.pid, sig); err != nil {
		return fmt.Errorf("signal memload %d: %w", m.pid, err)
	}
	return nil
}

// state describes the workload after its output ended: its exit status
// if it exited, else its /proc state (the output can also end because the
// process lost its stdout).
func (m *memload) state() string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", m.pid))
	if err == nil {
		// pid (comm) S ...
		if i := strings.LastIndexByte(string(b), ')'); i > 0 && len(b) > i+2 && b[i+2] != 'Z' {
			return fmt.Sprintf("pid %d still exists, state %c", m.pid, b[i+2])
		}
	}
	if err := m.cmd.Wait(); err != nil {
		return fmt.Sprintf("pid %d: %v", m.pid, err)
	}
	return fmt.Sprintf("pid %d: %v", m.pid, m.cmd.ProcessState)
}

// close kills the workload and waits for it.
func (m *memload) close() {
	m.cmd.Process.Kill()
	m.cmd.Wait()
	close(m.unpin)
	<-m.pinned
	m.out.close()
}

// writeStats is one write phase as memload reports it.
type writeStats struct {
	N       int64 `json:"n"`
	P50     int64 `json:"p50_ns"`
	P90     int64 `json:"p90_ns"`
	P99     int64 `json:"p99_ns"`
	Max     int64 `json:"max_ns"`
	Mean    int64 `json:"mean_ns"`
	TotalUs int64 `json:"total_us"`
}

// parseWrites parses "writes n=.. p50_ns=.. ...".
func parseWrites(line string) (writeStats, error) {
	var w writeStats
	fields := map[string]*int64{"n": &w.N, "p50_ns": &w.P50, "p90_ns": &w.P90, "p99_ns": &w.P99,
		"max_ns": &w.Max, "mean_ns": &w.Mean, "total_us": &w.TotalUs}
	seen := 0
	for _, f := range strings.Fields(strings.TrimPrefix(line, "writes ")) {
		k, v, ok := strings.Cut(f, "=")
		dst, known := fields[k]
		if !ok || !known {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return w, fmt.Errorf("parse %q in %q: %w", f, line, err)
		}
		*dst = n
		seen++
	}
	if seen != len(fields) {
		return w, fmt.Errorf("parse write phase %q: %d of %d fields", line, seen, len(fields))
	}
	return w, nil
}

// writePhase runs one write phase and returns its figures.
func (m *memload) writePhase(timeout time.Duration) (writeStats, error) {
	if err := m.signal(syscall.SIGUSR1); err != nil {
		return writeStats{}, err
	}
	line, err := m.out.expect("writes ", timeout)
	if err != nil {
		return writeStats{}, err
	}
	return parseWrites(line)
}

// checksum asks for the region's checksum (SIGUSR2) on pid, whose output
// arrives on out.
func checksum(pid int, out *lines, timeout time.Duration) (string, error) {
	if err := syscall.Kill(pid, syscall.SIGUSR2); err != nil {
		return "", fmt.Errorf("signal %d: %w", pid, err)
	}
	line, err := out.expect("sum ", timeout)
	if err != nil {
		return "", err
	}
	return strings.TrimPrefix(line, "sum "), nil
}

// anonHugeMiB reads AnonHugePages of pid from smaps_rollup.
func anonHugeMiB(pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return -1
	}
	defer f.Close()
	return int(meminfoField(f, "AnonHugePages:") >> 10)
}

// meminfoField returns the kB value of key in a meminfo-style file.
func meminfoField(r io.Reader, key string) int64 {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[0] == key {
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n
		}
	}
	return -1
}

// tracerPid returns the TracerPid of pid, or -1 if it cannot be read.
func tracerPid(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	_, rest, ok := strings.Cut(string(b), "\nTracerPid:")
	if !ok {
		return -1
	}
	line, _, _ := strings.Cut(rest, "\n")
	n, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		return -1
	}
	return n
}

// detachWatch sends SIGUSR1 to pid as soon as the engine's tracer has
// detached from it (TracerPid went non-zero, then zero), so that a write
// phase can run inside a COW window that ends before Checkpoint returns
// (full mode drains inside Dump). If the freeze is shorter than a poll, the
// signal goes when stop is closed. It polls every 200 µs: a little CPU on
// the core the frozen target does not use.
type detachWatch struct {
	stop chan struct{}
	done chan struct{}
	// sentAt is when the signal went out; read after wait.
	sentAt time.Time
	err    error
}

func watchDetach(pid int) *detachWatch {
	w := &detachWatch{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		seen := false
		for {
			select {
			case <-w.stop:
				w.fire(pid)
				return
			default:
			}
			t := tracerPid(pid)
			if t > 0 {
				seen = true
			} else if seen && t == 0 {
				w.fire(pid)
				return
			}
			time.Sleep(200 * time.Microsecond)
		}
	}()
	return w
}

func (w *detachWatch) fire(pid int) {
	w.sentAt = time.Now()
	if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
		w.err = fmt.Errorf("signal memload %d: %w", pid, err)
	}
}

// wait stops the watcher (sending the signal if it has not yet) and
// returns when the signal was sent.
func (w *detachWatch) wait() (time.Time, error) {
	close(w.stop)
	<-w.done
	return w.sentAt, w.err
}
