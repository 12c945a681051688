// Package ctrtest runs real containerd instances for cowmig's integration
// tests, demo and benchmark, and gives them a workload to move.
//
// Pieces:
//
//   - kvserver (testdata/kvserver.c, BuildKVServer, BuildImage/WriteImage):
//     a static, self-verifying memory workload with a one-line TCP
//     protocol (GET, VERIFY, PAUSE, RESUME; see the C file's header), and
//     an OCI image archive of it named ImageRef, importable with
//     `ctr image import` and runnable with `ctr run` and `nerdctl run`.
//   - Net (NewNet): two network namespaces "hosts" A (IPA) and B (IPB)
//     joined by a veth pair, named uniquely per run; leftovers of killed
//     runs are swept on the next NewNet.
//   - Host (StartHost, NewHosts): one containerd per namespace, started
//     with nsenter --net (host mount namespace), with its own root, state,
//     gRPC/ttrpc sockets and config (version 3, NRI off, CRI on, extra
//     drop-ins imported), PATH = Options.ExtraPath + the system PATH, and
//     Options.Env. Ctr, Nerdctl, Exec and Command drive it.
//   - Query, WaitReady, StartProbe/Probe: talk to a kvserver from inside a
//     network namespace (an OS thread that setns's into it), and measure
//     the longest gap between answers for the downtime benchmark.
//
// Every resource is released at t.Cleanup: tasks killed and deleted,
// containers deleted, containerd stopped, processes left in a host's
// network namespace or cgroups killed, mounts under its directories
// detached, cgroups and runc state removed, namespaces deleted.
//
// Typical use:
//
//	a, b := ctrtest.NewHosts(t, t.TempDir(), opts, opts)
//	tarPath, ref := ctrtest.BuildImage(t, t.TempDir())
//	a.Ctr("image", "import", tarPath)
//	addr := a.RunKV(t, "kv", ctrtest.RuncRuntime, "-mib", "64", "-port", "7070")
//	line, err := ctrtest.Query(b.Netns().Name, addr, "VERIFY", time.Second)
package ctrtest
