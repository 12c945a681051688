// Command cowmig checkpoints a running process into a live copy-on-write
// snapshot and restores it, here or on another host.
//
//	cowmig checkpoint --pid PID --image DIR [--mode live|full|stop] [--listen unix:PATH|tcp:HOST:PORT] [--json]
//	cowmig restore --image DIR [--json]
//	cowmig inspect --image DIR
//	cowmig release --image DIR
package main

import (
	"fmt"
	"os"

	"github.com/cowmig/cowmig/internal/daemon"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "checkpoint":
		err = runCheckpoint(os.Args[2:])
	case "restore":
		err = runRestore(os.Args[2:])
	case "inspect":
		err = runInspect(os.Args[2:])
	case "release":
		err = runRelease(os.Args[2:])
	case daemonCheckpoint:
		daemon.Init()
		err = checkpointDaemon(os.Args[2:])
	case daemonRestore:
		daemon.Init()
		err = restoreDaemon(os.Args[2:])
	case "-h", "--help", "help":
		usage()
	default:
		fmt.Fprintf(os.Stderr, "cowmig: unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
	if err != nil {
		out := os.Stderr
		if os.Args[1] == daemonCheckpoint || os.Args[1] == daemonRestore {
			// A daemon's stderr may be the clone's: its starter reports
			// the error; the log keeps it.
			out = daemon.Log()
		}
		fmt.Fprintf(out, "cowmig %s: %v\n", os.Args[1], daemon.OneLine(err))
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprint(os.Stderr, `usage:
  cowmig checkpoint --pid PID --image DIR [--mode live|full|stop] [--listen unix:PATH|tcp:HOST:PORT] [--ttl D] [--json]
  cowmig restore --image DIR [--stdin F] [--stdout F] [--stderr F] [--json]
  cowmig inspect --image DIR
  cowmig release --image DIR
`)
	os.Exit(2)
}
