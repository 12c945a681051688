package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"

	"golang.org/x/sys/unix"
)

// resultFd is the daemon's end of the pipe its starter reads the result
// from.
const resultFd = 3

// runDaemon starts this executable as a detached daemon running cmd with
// args and decodes the one JSON result it reports into out. stdio, if
// set, become the daemon's fds 0-2; its log goes to logPath otherwise.
func runDaemon(cmd string, args []string, logPath string, stdio []*os.File, out any) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	log, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		w.Close()
		return fmt.Errorf("open daemon log: %w", err)
	}
	defer log.Close()
	c := exec.Command(exe, append([]string{cmd}, args...)...)
	c.Stdin, c.Stdout, c.Stderr = nil, log, log
	if len(stdio) == 3 {
		c.Stdin, c.Stdout, c.Stderr = stdio[0], stdio[1], stdio[2]
	}
	c.ExtraFiles = []*os.File{w, log} // fds 3 and 4
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := c.Start(); err != nil {
		w.Close()
		return fmt.Errorf("start daemon: %w", err)
	}
	w.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		return fmt.Errorf("read daemon result: %w", err)
	}
	if len(b) == 0 {
		werr := c.Wait()
		return fmt.Errorf("daemon exited without a result (%v); see %s", werr, logPath)
	}
	var fail struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal(b, &fail); err == nil && fail.Error != "" {
		c.Wait()
		return errors.New(fail.Error)
	}
	c.Process.Release()
	return json.Unmarshal(b, out)
}

// daemonInit keeps the result pipe and the log out of the processes the
// daemon starts (the restore stub and with it the clone): an inherited
// copy of the pipe would keep the starter waiting for EOF.
func daemonInit() {
	unix.CloseOnExec(resultFd)
	unix.CloseOnExec(4)
}

// daemonLog is the daemon's log file (fd 4), for messages after report.
func daemonLog() *os.File { return os.NewFile(4, "log") }

// report sends the daemon's result to its starter and closes the pipe.
func report(v any) {
	f := os.NewFile(resultFd, "result")
	json.NewEncoder(f).Encode(v)
	f.Close()
}

// reportFailure sends err as the daemon's result and returns it.
func reportFailure(err error) error {
	report(struct {
		Error string `json:"error"`
	}{oneLine(err)})
	return err
}
