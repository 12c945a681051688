package testworkload

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
	"testing"
	"time"
)

// Timeouts of the helpers that take none. They are generous because a
// 2-core machine may be running several test binaries at once.
const (
	ReadyTimeout   = 60 * time.Second
	DefaultTimeout = 60 * time.Second
)

// Kinds of failure of VerifyLine and friends, for errors.Is.
var (
	ErrVerifyFailed = errors.New("workload verify failed")
	ErrTimeout      = errors.New("timed out waiting for the workload")
	ErrExited       = errors.New("workload output ended")
)

// Proc is a running workload and the lines it prints on stdout.
//
// A Proc's methods must be called from one goroutine at a time: each
// request signals the process and consumes lines until its answer.
type Proc struct {
	// Cmd is the started command; nil for a Proc made by Attach.
	Cmd *exec.Cmd
	// Pid is the process to signal, in this process's pid namespace.
	Pid int
	// ReadyPid is the pid the workload printed on its ready line, as it
	// sees itself (it differs from Pid inside a pid namespace); 0 for
	// Attach.
	ReadyPid int

	lines      <-chan string
	stdout     io.Reader
	stderrPath string // file the workload's stderr goes to; "" for Attach

	stop      chan struct{} // closed by Close to stop the reader goroutine
	done      chan struct{} // closed when the reader goroutine has returned
	closeOnce sync.Once
}

// Start runs argv (argv[0] is the program: BuildC's binary, or Python with
// PythonScript's path as argv[1]) and waits until it prints its ready line.
// extra, if not nil, may adjust the command before it starts (environment,
// SysProcAttr, ...) but must keep Stdout; it should set fields of the
// existing SysProcAttr rather than replace it, to keep Pdeathsig. The process is SIGKILLed and
// reaped when the test ends; it also gets SIGKILL if the test binary dies
// first (Pdeathsig), so a timed-out test leaves no writers spinning.
func Start(t testing.TB, argv []string, extra func(*exec.Cmd)) *Proc {
	t.Helper()
	if len(argv) == 0 {
		t.Fatal("testworkload.Start: empty argv")
	}
	dir := t.TempDir()
	stderrPath := filepath.Join(dir, "stderr")
	errFile, err := os.Create(stderrPath)
	if err != nil {
		t.Fatalf("create %s: %v", stderrPath, err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		errFile.Close()
		t.Fatalf("stdout pipe: %v", err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout = pw
	cmd.Stderr = errFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if extra != nil {
		extra(cmd)
	}
	// Pdeathsig fires when the forking OS thread exits, and Go ends a
	// thread when a goroutine locked to it returns (the injector's tracers
	// do). An idle thread can be picked up and locked by such a goroutine
	// later, so fork from a goroutine that keeps its thread locked until
	// the test ends (cleanups run last-in first-out: after p.kill).
	started := make(chan error, 1)
	release := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		started <- cmd.Start()
		<-release
	}()
	t.Cleanup(func() { close(release) })
	err = <-started
	pw.Close()
	errFile.Close()
	if err != nil {
		pr.Close()
		t.Fatalf("start %q: %v", argv, err)
	}

	p := newProc(cmd.Process.Pid, pr)
	p.Cmd = cmd
	p.stderrPath = stderrPath
	t.Cleanup(p.kill)

	if _, err := p.WaitReady(ReadyTimeout); err != nil {
		t.Fatalf("start %q: %v", argv, err)
	}
	return p
}

// Attach wraps a workload that is not our child, typically a clone
// restored from a snapshot, whose stdout the test reads through stdout.
// It does not wait for a ready line (a clone has printed it already, as
// the source; see WaitReady). Attach owns stdout from now on: Close closes it if it is an
// io.Closer. The caller must Close the Proc.
func Attach(pid int, stdout io.Reader) *Proc {
	return newProc(pid, stdout)
}

func newProc(pid int, stdout io.Reader) *Proc {
	lines := make(chan string, 64)
	p := &Proc{
		Pid:    pid,
		lines:  lines,
		stdout: stdout,
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	go p.read(lines)
	return p
}

// read forwards stdout line by line until EOF, a read error or Close.
func (p *Proc) read(out chan<- string) {
	defer close(p.done)
	defer close(out)
	sc := bufio.NewScanner(p.stdout)
	for sc.Scan() {
		select {
		case out <- sc.Text():
		case <-p.stop:
			return
		}
	}
}

// WaitReady waits for the ready line, records its pid in ReadyPid and
// returns it. Start calls it; call it after Attach only for a workload
// that has just been started (a clone printed its ready line as the
// source). Until the ready line, a workload has not yet blocked its
// control signals, and SIGUSR1 would kill it.
func (p *Proc) WaitReady(timeout time.Duration) (int, error) {
	line, err := p.waitLine("ready ", timeout)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimPrefix(line, "ready "))
	if err != nil {
		return 0, fmt.Errorf("ready line %q of pid %d: %w", line, p.Pid, err)
	}
	p.ReadyPid = pid
	return pid, nil
}

// Signal sends sig to the workload.
func (p *Proc) Signal(sig syscall.Signal) error {
	if err := syscall.Kill(p.Pid, sig); err != nil {
		return fmt.Errorf("signal %v to pid %d: %w", sig, p.Pid, err)
	}
	return nil
}

// Verify asks the workload to check itself and returns its "verify ok"
// line. It fails the test on "verify FAIL", timeout or exit.
func (p *Proc) Verify(t testing.TB) string {
	t.Helper()
	line, err := p.VerifyLine(DefaultTimeout)
	if err != nil {
		t.Fatalf("verify pid %d: %v", p.Pid, err)
	}
	return line
}

// VerifyLine sends SIGUSR1 and returns the next verify line. A "verify
// FAIL" line is returned together with an error wrapping ErrVerifyFailed.
func (p *Proc) VerifyLine(timeout time.Duration) (string, error) {
	line, err := p.request(syscall.SIGUSR1, "verify ", timeout)
	if err != nil {
		return "", err
	}
	if !strings.HasPrefix(line, "verify ok") {
		return line, fmt.Errorf("%s: %w", line, ErrVerifyFailed)
	}
	return line, nil
}

// Counters sends SIGUSR2 and returns the workload's counters by name.
func (p *Proc) Counters(timeout time.Duration) (map[string]uint64, error) {
	line, err := p.request(syscall.SIGUSR2, "counters ", timeout)
	if err != nil {
		return nil, err
	}
	m := make(map[string]uint64)
	for k := range Fields(line) {
		n, err := Counter(line, k)
		if err != nil {
			return nil, err
		}
		m[k] = n
	}
	return m, nil
}

// Terminate sends SIGTERM to a workload made by Start and waits for it to
// exit; the error says whether it exited 0 in time.
func (p *Proc) Terminate(timeout time.Duration) error {
	if p.Cmd == nil {
		return fmt.Errorf("terminate pid %d: not started by this package", p.Pid)
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	waited := make(chan error, 1)
	go func() { waited <- p.Cmd.Wait() }()
	select {
	case err := <-waited:
		if err != nil {
			return fmt.Errorf("terminate pid %d: %w%s", p.Pid, err, p.stderrTail())
		}
		return nil
	case <-time.After(timeout):
		_ = p.Cmd.Process.Kill()
		<-waited
		return fmt.Errorf("terminate pid %d: %w", p.Pid, ErrTimeout)
	}
}

// Close stops reading the workload's stdout and waits for the reader.
// For a Proc made by Attach it also closes stdout if that is an io.Closer.
// It does not kill the process.
func (p *Proc) Close() {
	p.closeOnce.Do(func() {
		close(p.stop)
		if c, ok := p.stdout.(io.Closer); ok {
			// Unblocks a pending Read; for Start's pipe the process is
			// gone by now, but its fork children may still hold the
			// write end.
			c.Close()
		}
	})
	<-p.done
}

// kill is Start's cleanup: SIGKILL, reap, stop the reader.
func (p *Proc) kill() {
	if p.Cmd.ProcessState == nil {
		_ = p.Cmd.Process.Kill()
		_ = p.Cmd.Wait()
	}
	p.Close()
}

// request signals the workload and waits for the next line with prefix.
func (p *Proc) request(sig syscall.Signal, prefix string, timeout time.Duration) (string, error) {
	// Lines already buffered were printed before this signal, so none of
	// them can be its answer.
	for drained := false; !drained; {
		select {
		case _, ok := <-p.lines:
			drained = !ok
		default:
			drained = true
		}
	}
	if err := p.Signal(sig); err != nil {
		return "", err
	}
	return p.waitLine(prefix, timeout)
}

func (p *Proc) waitLine(prefix string, timeout time.Duration) (string, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		select {
		case line, ok := <-p.lines:
			if !ok {
				return "", fmt.Errorf("wait for %q from pid %d: %w%s", prefix, p.Pid, ErrExited, p.stderrTail())
			}
			if strings.HasPrefix(line, prefix) {
				return line, nil
			}
		case <-timer.C:
			return "", fmt.Errorf("wait %v for %q from pid %d: %w%s", timeout, prefix, p.Pid, ErrTimeout, p.stderrTail())
		}
	}
}

// stderrTail returns the end of the workload's stderr for error messages.
func (p *Proc) stderrTail() string {
	if p.stderrPath == "" {
		return ""
	}
	b, err := os.ReadFile(p.stderrPath)
	if err != nil || len(b) == 0 {
		return ""
	}
	const max = 2048
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return "; stderr:\n" + string(b)
}
