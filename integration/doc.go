// Package integration holds cowmig's end-to-end tests: they build the
// cowmig command, run it as a user would against real self-verifying
// workloads (internal/testworkload), and check what the clones, the
// daemons and the command's output say. The package has no non-test code.
package integration
