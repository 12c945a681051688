package main

import (
	"fmt"
	"os"

	"github.com/cowmig/cowmig/internal/daemon"
)

// runDaemon starts this executable as a detached daemon running cmd with
// args and decodes the one JSON result it reports into out. stdio, if
// set, become the daemon's fds 0-2; its log goes to logPath otherwise.
func runDaemon(cmd string, args []string, logPath string, stdio []*os.File, out any) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	log, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open daemon log: %w", err)
	}
	defer log.Close()
	c, err := daemon.Spawn(exe, append([]string{cmd}, args...), log, stdio, nil, out)
	if err != nil {
		if c != nil {
			if werr := c.Wait(); werr != nil {
				err = fmt.Errorf("%w (daemon: %v)", err, werr)
			}
		}
		return err
	}
	c.Process.Release()
	return nil
}
