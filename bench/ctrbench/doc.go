// Package ctrbench benchmarks cowmig's containerd shim end to end, the way
// a user drives it: two containerd hosts in two network namespaces (see
// internal/ctrtest), a kvserver container on host A, and
//
//   - the client-visible downtime of checkpointing that running container
//     with `ctr task checkpoint`, `ctr container checkpoint --task`,
//     `cowmig checkpoint` (live), `cowmig checkpoint --cow fork` and
//     `cowmig checkpoint --mode stop`,
//     measured by a 1 ms GET probe from host B over the veth, next to the
//     shim's own freeze time and a quiet window as the noise floor;
//   - restore to running on host B with `ctr container restore --live`
//     after `ctr image export`/`import`: command time, the shim's figures,
//     time to the clone's first answer and to all pages local, bytes
//     pulled, and a VERIFY of every clone.
//
// The package holds only the benchmark, TestContainerdBench, which runs
// when COWMIG_BENCH=1 (scripts/bench.sh sets it); it prints a table of
// medians. COWMIG_CTRBENCH_REPS (default 5) and COWMIG_CTRBENCH_SIZES
// (MiB, default "256,1024") size it.
package ctrbench
