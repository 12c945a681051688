// Package daemon runs a command of this executable as a detached daemon
// that reports one JSON result to its starter over a pipe and then keeps
// working: the page server that owns a live snapshot and the pager that
// serves a clone. cmd/cowmig and the shim both start their engine work
// this way, so the work outlives the short-lived command (or shim call)
// that asked for it.
package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

const (
	resultFd = 3 // the daemon's end of the result pipe
	logFd    = 4 // the daemon's log
)

// Spawn starts exe with args as a detached daemon (a new session) and
// decodes the one result it reports into out. The daemon's stdout, stderr
// and fd 4 go to log, unless stdio (three files) gives its fds 0-2. start
// starts the command: exec.Cmd.Start, or a reaper's start in a process
// that reaps all its children. A reported failure is returned as an error;
// on any error the daemon is gone or killed, and the caller must still
// wait for it (the returned command, if not nil).
func Spawn(exe string, args []string, log *os.File, stdio []*os.File, start func(*exec.Cmd) error, out any) (*exec.Cmd, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("daemon result pipe: %w", err)
	}
	defer r.Close()
	c := exec.Command(exe, args...)
	c.Stdin, c.Stdout, c.Stderr = nil, log, log
	if len(stdio) == 3 {
		c.Stdin, c.Stdout, c.Stderr = stdio[0], stdio[1], stdio[2]
	}
	c.ExtraFiles = []*os.File{w, log} // fds 3 and 4
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if start == nil {
		start = (*exec.Cmd).Start
	}
	if err := start(c); err != nil {
		w.Close()
		return nil, fmt.Errorf("start daemon: %w", err)
	}
	w.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		c.Process.Kill()
		return c, fmt.Errorf("read daemon result: %w", err)
	}
	if len(b) == 0 {
		return c, fmt.Errorf("daemon %s exited without a result; see %s", args[0], log.Name())
	}
	var fail struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal(b, &fail); err == nil && fail.Error != "" {
		return c, errors.New(fail.Error)
	}
	if err := json.Unmarshal(b, out); err != nil {
		// It reported success and works on: it must not outlive this.
		c.Process.Kill()
		return c, fmt.Errorf("decode daemon result: %w", err)
	}
	return c, nil
}

// Init runs first in a daemon: it keeps the result pipe and the log out
// of the processes the daemon starts (a restore stub and with it the
// clone), since an inherited copy of the pipe would keep the starter
// waiting for EOF.
func Init() {
	unix.CloseOnExec(resultFd)
	unix.CloseOnExec(logFd)
}

// Log is the daemon's log file, for messages after Report. One File for
// the process: each File closes its fd when collected.
var Log = sync.OnceValue(func() *os.File { return os.NewFile(logFd, "log") })

// Report sends the daemon's result to its starter and closes the pipe.
func Report(v any) {
	f := os.NewFile(resultFd, "result")
	json.NewEncoder(f).Encode(v)
	f.Close()
}

// ReportFailure sends err as the daemon's result and returns it.
func ReportFailure(err error) error {
	Report(struct {
		Error string `json:"error"`
	}{OneLine(err)})
	return err
}

// OneLine is err's message on one line (joined errors are separated by
// "; "), for a one-line reason on stderr or in a result.
func OneLine(err error) string {
	return strings.ReplaceAll(err.Error(), "\n", "; ")
}
