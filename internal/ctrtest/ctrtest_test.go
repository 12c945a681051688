package ctrtest

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const queryTimeout = 10 * time.Second

// freePort returns a TCP port nothing listens on right now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startKV runs kvserver directly and waits for its "ready" line.
func startKV(t *testing.T, args ...string) string {
	t.Helper()
	port := freePort(t)
	cmd := exec.Command(BuildKVServer(t), append([]string{"-port", strconv.Itoa(port)}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("kvserver said %q, %v; want ready", line, err)
	}
	return fmt.Sprintf("127.0.0.1:%d", port)
}

func mustQuery(t *testing.T, ns, addr, cmd string) string {
	t.Helper()
	line, err := Query(ns, addr, cmd, queryTimeout)
	if err != nil {
		t.Fatalf("%s to %s: %v", cmd, addr, err)
	}
	return line
}

// field returns the value of key=value in line.
func field(t *testing.T, line, key string) string {
	t.Helper()
	for _, tok := range strings.Fields(line) {
		if k, v, ok := strings.Cut(tok, "="); ok && k == key {
			return v
		}
	}
	t.Fatalf("no %s= in %q", key, line)
	return ""
}

func getCount(t *testing.T, ns, addr string) uint64 {
	t.Helper()
	line := mustQuery(t, ns, addr, "GET")
	var n, mib uint64
	if _, err := fmt.Sscanf(line, "count %d mib %d", &n, &mib); err != nil {
		t.Fatalf("GET answered %q: %v", line, err)
	}
	return n
}

// checkProtocol runs the whole kvserver protocol against addr from ns:
// VERIFY passes, PAUSE freezes count and memory (same sum twice and in
// VERIFY), RESUME lets the writers go on.
func checkProtocol(t *testing.T, ns, addr string, mib int) {
	t.Helper()
	if got := mustQuery(t, ns, addr, "GET"); !strings.HasPrefix(got, "count ") || !strings.HasSuffix(got, fmt.Sprintf(" mib %d", mib)) {
		t.Fatalf("GET answered %q", got)
	}
	v := mustQuery(t, ns, addr, "VERIFY")
	if !strings.HasPrefix(v, "verify ok ") {
		t.Fatalf("VERIFY answered %q", v)
	}
	if pages := field(t, v, "pages"); pages != strconv.Itoa(mib*256) {
		t.Errorf("VERIFY says pages=%s, want %d", pages, mib*256)
	}
	p1 := mustQuery(t, ns, addr, "PAUSE")
	p2 := mustQuery(t, ns, addr, "PAUSE")
	if !strings.HasPrefix(p1, "paused ") || p1 != p2 {
		t.Fatalf("PAUSE twice answered %q then %q; want the same paused line", p1, p2)
	}
	if c := getCount(t, ns, addr); strconv.FormatUint(c, 10) != field(t, p1, "count") {
		t.Errorf("GET while paused says count %d, PAUSE said %q", c, p1)
	}
	pv := mustQuery(t, ns, addr, "VERIFY")
	if field(t, pv, "sum") != field(t, p1, "sum") || field(t, pv, "count") != field(t, p1, "count") {
		t.Errorf("VERIFY while paused %q differs from PAUSE %q", pv, p1)
	}
	if got := mustQuery(t, ns, addr, "RESUME"); got != "resumed" {
		t.Fatalf("RESUME answered %q", got)
	}
	paused, _ := strconv.ParseUint(field(t, p1, "count"), 10, 64)
	waitCount(t, ns, addr, paused)
	if s := field(t, mustQuery(t, ns, addr, "PAUSE"), "sum"); s == field(t, p1, "sum") {
		t.Errorf("memory sum %s unchanged after the writers ran", s)
	}
	mustQuery(t, ns, addr, "RESUME")
	if got := mustQuery(t, ns, addr, "HELLO"); got != "error unknown command" {
		t.Errorf("HELLO answered %q", got)
	}
}

// waitCount polls GET until the count passes min.
func waitCount(t *testing.T, ns, addr string, min uint64) uint64 {
	t.Helper()
	deadline := time.Now().Add(queryTimeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if c := getCount(t, ns, addr); c > min {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("count stays at %d", min)
		}
		<-tick.C
	}
}

func TestKVServer(t *testing.T) {
	addr := startKV(t, "-mib", "16", "-threads", "3")
	checkProtocol(t, "", addr, 16)
}

func TestKVServerSelftestCorrupt(t *testing.T) {
	addr := startKV(t, "-mib", "4", "-selftest-corrupt")
	v := mustQuery(t, "", addr, "VERIFY")
	if !strings.HasPrefix(v, "verify FAIL w0 page ") || !strings.HasSuffix(v, " bad=1") {
		t.Fatalf("VERIFY with -selftest-corrupt answered %q; want one bad page", v)
	}
	// Paused, the damage stays put: the same page fails twice.
	mustQuery(t, "", addr, "PAUSE")
	v1 := mustQuery(t, "", addr, "VERIFY")
	if !strings.HasPrefix(v1, "verify FAIL ") {
		t.Fatalf("VERIFY answered %q", v1)
	}
}

func TestKVServerBadArgs(t *testing.T) {
	bin := BuildKVServer(t)
	for _, args := range [][]string{{}, {"-mib", "1"}, {"-mib", "x", "-port", "1"}, {"-mib", "1", "-port", "1", "-bogus", "1"}} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err == nil || !strings.HasPrefix(string(out), "kvserver: ") {
			t.Errorf("kvserver %v: %v, %q; want an error", args, err, out)
		}
	}
}

// readTar returns the regular files of a tar stream by name.
func readTar(t *testing.T, r io.Reader) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = b
		if h.Typeflag == tar.TypeDir {
			files[h.Name] = nil
		}
	}
}

func blob(t *testing.T, files map[string][]byte, d string) []byte {
	t.Helper()
	b, ok := files["blobs/sha256/"+strings.TrimPrefix(d, "sha256:")]
	if !ok || digest(b) != d {
		t.Fatalf("blob %s missing or with another digest", d)
	}
	return b
}

// The archive is a well-formed OCI layout whose layer holds the very
// kvserver binary, and building it twice gives the same bytes.
func TestImageArchive(t *testing.T) {
	dir := t.TempDir()
	tarPath, ref := BuildImage(t, dir)
	if ref != ImageRef {
		t.Fatalf("ref %q", ref)
	}
	b1, err := os.ReadFile(tarPath)
	if err != nil {
		t.Fatal(err)
	}
	BuildImage(t, dir)
	if b2, err := os.ReadFile(tarPath); err != nil || !bytes.Equal(b1, b2) {
		t.Fatalf("second build differs (%v)", err)
	}
	files := readTar(t, bytes.NewReader(b1))
	if string(files["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout %q", files["oci-layout"])
	}
	type desc struct {
		MediaType   string            `json:"mediaType"`
		Digest      string            `json:"digest"`
		Size        int               `json:"size"`
		Annotations map[string]string `json:"annotations"`
	}
	var index struct {
		Manifests []desc `json:"manifests"`
	}
	if err := json.Unmarshal(files["index.json"], &index); err != nil || len(index.Manifests) != 1 {
		t.Fatalf("index.json %s: %v", files["index.json"], err)
	}
	md := index.Manifests[0]
	if md.Annotations[annotationImageName] != ImageRef || md.Annotations[annotationRefName] != "test" {
		t.Errorf("manifest annotations %v", md.Annotations)
	}
	var manifest struct {
		Config desc   `json:"config"`
		Layers []desc `json:"layers"`
	}
	if err := json.Unmarshal(blob(t, files, md.Digest), &manifest); err != nil || len(manifest.Layers) != 1 {
		t.Fatalf("manifest: %v", err)
	}
	var config struct {
		Config struct {
			Entrypoint, Cmd []string
		} `json:"config"`
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(blob(t, files, manifest.Config.Digest), &config); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(config.Config.Entrypoint) != "[/kvserver]" || fmt.Sprint(config.Config.Cmd) != fmt.Sprint(DefaultCmd()) {
		t.Errorf("config %+v", config.Config)
	}
	gz := blob(t, files, manifest.Layers[0].Digest)
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	layer, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	if len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != digest(layer) {
		t.Errorf("diff_ids %v, layer %s", config.RootFS.DiffIDs, digest(layer))
	}
	lf := readTar(t, bytes.NewReader(layer))
	exe, err := os.ReadFile(BuildKVServer(t))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(lf["kvserver"], exe) {
		t.Errorf("layer's kvserver differs from the built binary")
	}
	if _, ok := lf["tmp/"]; !ok {
		t.Errorf("layer has no tmp/: %v", lf)
	}
}

// NewNet first removes what a killed run left: its namespaces, the
// processes in them, mounts under its run directory.
func TestSweepLeftovers(t *testing.T) {
	SkipUnlessRoot(t)
	// A pid that surely belongs to no running process: a reaped child's.
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	id := fmt.Sprintf("%d-deadbeef", dead.Process.Pid)
	ns := netnsPrefix + id + "-a"
	runDir := filepath.Join(runBase, id)
	exec.Command("ip", "netns", "del", ns).Run()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	mnt := filepath.Join(runDir, "a", "state", "mnt")
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	// A process inside the leftover namespace, standing in for a shim.
	// It says "in" once inside, so the sweep cannot run before it got there.
	orphan := exec.Command("nsenter", "--net=/run/netns/"+ns, "--", "sh", "-c", "echo in; exec sleep 1000")
	stdout, err := orphan.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := orphan.Start(); err != nil {
		t.Fatal(err)
	}
	if line, err := bufio.NewReader(stdout).ReadString('\n'); line != "in\n" {
		orphan.Process.Kill()
		orphan.Wait()
		t.Fatalf("orphan said %q, %v", line, err)
	}
	reaped := make(chan error, 1)
	go func() { reaped <- orphan.Wait() }()

	NewNet(t)

	if err := <-reaped; !exitedBySignal(err, unix.SIGKILL) {
		t.Errorf("process in the leftover netns: %v, want killed", err)
	}
	if _, err := os.Stat("/run/netns/" + ns); !os.IsNotExist(err) {
		t.Errorf("leftover netns %s still there (%v)", ns, err)
	}
	if _, err := os.Stat(runDir); !os.IsNotExist(err) {
		t.Errorf("leftover run dir %s still there (%v)", runDir, err)
	}
	if mi, _ := os.ReadFile("/proc/self/mountinfo"); bytes.Contains(mi, []byte(runDir)) {
		t.Errorf("mount under %s left", runDir)
	}
}

// procEnv returns the environment of process pid.
func procEnv(t *testing.T, pid int) []string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

// Two containerd hosts: a runc container from `ctr run` on A and one from
// `nerdctl run` on B answer each other across the veth, the drop-in and
// the environment reach containerd, and cleanup leaves nothing behind.
func TestHosts(t *testing.T) {
	SkipUnlessNerdctl(t)
	dir := t.TempDir()
	tarPath, ref := BuildImage(t, dir)
	dropIn := filepath.Join(dir, "cowmig-runtime.toml")
	err := os.WriteFile(dropIn, []byte("version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.cowmigtest]\n  runtime_type = 'io.containerd.cowmig.v2'\n"), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	extra := filepath.Join(dir, "bin")
	opts := Options{ExtraPath: extra, Env: []string{"COWMIG_CONFIG=/nonexistent/cowmig.toml"}, Imports: []string{dropIn}}

	// What must be gone once the hosts' cleanups have run.
	var netnsNames, dirs, namespaces []string
	var pids []int
	t.Run("run", func(t *testing.T) {
		a, b := NewHosts(t, filepath.Join(dir, "hosts"), opts, opts)
		for _, h := range []*Host{a, b} {
			netnsNames = append(netnsNames, h.Netns().Name)
			dirs = append(dirs, h.State(), h.Dir())
			namespaces = append(namespaces, h.Namespace())
			pids = append(pids, h.Pid())
			env := procEnv(t, h.Pid())
			if env[0] != "PATH="+extra+":"+basePath || !strings.Contains(strings.Join(env, "\n"), "COWMIG_CONFIG=/nonexistent/cowmig.toml") {
				t.Errorf("host %s: containerd's environment %q", h.Name(), env)
			}
			dump, err := h.Exec("containerd", "--config", h.ConfigPath(), "config", "dump")
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(dump, "runtimes.cowmigtest]\n          runtime_type = 'io.containerd.cowmig.v2'") {
				t.Errorf("host %s: config dump lacks the drop-in's runtime:\n%s", h.Name(), dump)
			}
		}
		if a.Namespace() == b.Namespace() || a.Address() == b.Address() {
			t.Fatalf("hosts share namespace %s or address %s", a.Namespace(), a.Address())
		}

		// A: ctr image import, ctr run with runc.
		a.Import(t, tarPath)
		if out, err := a.Ctr("images", "ls", "-q"); err != nil || !strings.Contains(out, ref+"\n") {
			t.Fatalf("images after import: %q, %v", out, err)
		}
		addrA := a.RunKV(t, "kv", RuncRuntime, "-mib", "64", "-port", "7070")
		pids = append(pids, taskPidOnly(t, a, "kv"))
		if addrA != IPA+":7070" {
			t.Errorf("RunKV address %s", addrA)
		}
		checkProtocol(t, b.Netns().Name, addrA, 64)
		if log, err := os.ReadFile(filepath.Join(a.Dir(), "kv.log")); err != nil || string(log) != "ready\n" {
			t.Errorf("container log %q, %v; want ready", log, err)
		}
		// The container listens in A's namespace only: B's own address
		// has nothing on 7070.
		if line, err := Query(b.Netns().Name, IPB+":7070", "GET", time.Second); err == nil {
			t.Errorf("B:7070 answers %q before anything runs on B", line)
		}

		// B: nerdctl load, nerdctl run --net host with runc.
		if out, err := b.Nerdctl("load", "-i", tarPath); err != nil {
			t.Fatal(err)
		} else {
			t.Logf("nerdctl load: %s", out)
		}
		if out, err := b.Nerdctl("run", "-d", "--net", "host", "--runtime", RuncRuntime, "--name", "kvb", ref, "-mib", "32", "-port", "7071"); err != nil {
			t.Fatal(err)
		} else {
			t.Logf("nerdctl run: %s", out)
		}
		addrB := IPB + ":7071"
		if _, err := WaitReady(a.Netns().Name, addrB, ReadyTimeout); err != nil {
			t.Fatal(err)
		}
		checkProtocol(t, a.Netns().Name, addrB, 32)
		if out, err := b.Nerdctl("ps"); err != nil || !strings.Contains(out, "kvb") {
			t.Errorf("nerdctl ps: %q, %v", out, err)
		}
		ctrs, err := b.Ctr("containers", "ls", "-q")
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range strings.Fields(ctrs) {
			pids = append(pids, taskPidOnly(t, b, id))
		}

		// A probe from B sees A's kvserver answer without a gap.
		r, err := Probe(b.Netns().Name, addrA, time.Millisecond, time.Second, 200*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("probe: %v", r)
		if r.OK < 20 || r.Failed != 0 || r.MaxGap > 150*time.Millisecond {
			t.Errorf("probe of a healthy server: %v", r)
		}
		checkProbeSeesFreeze(t, a, b, "kv", addrA)
	})
	if len(netnsNames) != 2 {
		t.Fatalf("hosts did not start")
	}
	for _, ns := range netnsNames {
		if _, err := os.Stat("/run/netns/" + ns); !os.IsNotExist(err) {
			t.Errorf("netns %s left (%v)", ns, err)
		}
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range append(dirs, runBase+"/"+strings.TrimPrefix(netnsNames[0], netnsPrefix)) {
		if bytes.Contains(mi, []byte(" "+d)) {
			t.Errorf("mounts under %s left", d)
		}
	}
	for _, pid := range pids {
		if !isZombie(pid) {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			t.Errorf("process %d (%q) left", pid, b)
		}
	}
	for _, ns := range namespaces {
		if m, _ := filepath.Glob("/sys/fs/cgroup/*/" + ns); len(m) > 0 {
			t.Errorf("cgroups left: %v", m)
		}
		if _, err := os.Stat("/run/containerd/runc/" + ns); !os.IsNotExist(err) {
			t.Errorf("runc state of %s left (%v)", ns, err)
		}
	}
}

// checkProbeSeesFreeze freezes container id on h (cgroup freezer, `ctr
// task pause`) for a while and checks that a probe from peer reports a
// gap that covers the frozen time, and no failures (requests wait).
func checkProbeSeesFreeze(t *testing.T, h, peer *Host, id, addr string) {
	t.Helper()
	p, err := StartProbe(peer.Netns().Name, addr, time.Millisecond, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	waitCount(t, peer.Netns().Name, addr, 0) // the probe's thread is up and answers flow
	pauseStart := time.Now()
	if _, err := h.Ctr("tasks", "pause", id); err != nil {
		p.Stop()
		t.Fatal(err)
	}
	frozen := time.Now()
	// The downtime to measure; nothing to synchronise with.
	<-time.After(300 * time.Millisecond)
	resumeStart := time.Now()
	if _, err := h.Ctr("tasks", "resume", id); err != nil {
		p.Stop()
		t.Fatal(err)
	}
	thawed := time.Now()
	waitCount(t, peer.Netns().Name, addr, 0) // answers flow again
	r := p.Stop()
	t.Logf("probe across a %v freeze: %v (gap from %v after pause)", resumeStart.Sub(frozen), r, r.GapStart.Sub(pauseStart))
	if r.Failed != 0 {
		t.Errorf("requests failed across a freeze: %v", r)
	}
	if min, max := resumeStart.Sub(frozen), thawed.Sub(pauseStart)+100*time.Millisecond; r.MaxGap < min || r.MaxGap > max {
		t.Errorf("probe's max gap %v, want between %v and %v", r.MaxGap, min, max)
	}
}

// taskPidOnly is Host.TaskPid without the status.
func taskPidOnly(t *testing.T, h *Host, id string) int {
	t.Helper()
	pid, _ := h.TaskPid(t, id)
	return pid
}
