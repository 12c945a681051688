package procfs

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// startSleep starts `sleep 1000` in dir, stops it with SIGSTOP and waits
// until it is stopped, so its memory and fds hold still; it is killed when
// the test ends. exec.Cmd.Start returns after the execve succeeded, so what
// execve sets up (text mapping, [stack], [vdso], brk, argv) is in place, but
// the dynamic loader may be anywhere in its work.
func startSleep(t *testing.T, dir string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "1000")
	cmd.Dir = dir
	if err := cmd.Start(); err != nil {
		t.Fatalf("start sleep: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	if err := cmd.Process.Signal(unix.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	var ws unix.WaitStatus
	if _, err := unix.Wait4(cmd.Process.Pid, &ws, unix.WUNTRACED, nil); err != nil || !ws.Stopped() {
		t.Fatalf("wait for sleep to stop: %v (status %#x)", err, ws)
	}
	return cmd
}

// pythonChild runs python3 -c script (behind the wrap command, if any).
// The script prints one line of integers when it is ready, then blocks
// reading stdin; closing stdin at the end of the test ends it. It returns the
// printed integers, or an error if python failed before printing them.
func pythonChild(t *testing.T, script string, wrap ...string) ([]int, error) {
	t.Helper()
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not found; it provides a process with known threads and sockets")
	}
	args := append(append([]string{}, wrap...), py, "-c", script)
	cmd := exec.Command(args[0], args[1:]...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %v: %v", args, err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		stdin.Close()
		cmd.Wait()
		return nil, fmt.Errorf("%v: no ready line: %v (stderr %q)", args[:len(wrap)+1], err, stderr.String())
	}
	f := strings.Fields(line)
	ids := make([]int, len(f))
	for i, s := range f {
		if ids[i], err = strconv.Atoi(s); err != nil {
			t.Fatalf("python printed %q", line)
		}
	}
	return ids, nil
}

// pythonThreads starts python3 with n extra threads blocked on an event and
// returns python's pid and the native ids of the extra threads.
func pythonThreads(t *testing.T, n int) (pid int, tids []int) {
	t.Helper()
	ids, err := pythonChild(t, fmt.Sprintf(`
import os, sys, threading
ev = threading.Event()
ts = [threading.Thread(target=ev.wait) for _ in range(%d)]
for t in ts: t.start()
print(os.getpid(), *[t.native_id for t in ts], flush=True)
sys.stdin.read()
ev.set()
`, n))
	if err != nil {
		t.Fatal(err)
	}
	return ids[0], ids[1:]
}

// pythonServer starts python3 with a TCP listener (backlog 5) on an
// ephemeral port behind wrap, and returns python's pid, the socket's inode
// and port.
func pythonServer(t *testing.T, wrap ...string) (pid int, ino uint64, port uint16, err error) {
	t.Helper()
	ids, err := pythonChild(t, `
import os, socket, sys
s = socket.socket()
s.bind(("0.0.0.0", 0))
s.listen(5)
print(os.getpid(), os.fstat(s.fileno()).st_ino, s.getsockname()[1], flush=True)
sys.stdin.read()
`, wrap...)
	if err != nil {
		return 0, 0, 0, err
	}
	return ids[0], uint64(ids[1]), uint16(ids[2]), nil
}

func TestThreadsPython(t *testing.T) {
	requireRoot(t)
	const n = 5
	pid, tids := pythonThreads(t, n)
	got, err := Threads(pid)
	if err != nil {
		t.Fatalf("Threads: %v", err)
	}
	slices.Sort(tids)
	want := append([]int{pid}, tids...)
	if !slices.Equal(got, want) {
		t.Fatalf("Threads(%d) = %v, want %v", pid, got, want)
	}
	lead, err := ReadStatus(pid, pid)
	if err != nil {
		t.Fatal(err)
	}
	if lead.Threads != n+1 || lead.Tgid != pid || lead.Pid != pid || lead.PPid != os.Getpid() {
		t.Errorf("leader status: Threads=%d Tgid=%d Pid=%d PPid=%d", lead.Threads, lead.Tgid, lead.Pid, lead.PPid)
	}
	for _, tid := range tids {
		st, err := ReadStatus(pid, tid)
		if err != nil {
			t.Fatal(err)
		}
		// A thread about to block may still show R: only a dead state
		// would be wrong here.
		if st.Tgid != pid || st.Pid != tid || st.State == "" || strings.ContainsAny(st.State[:1], "ZXx") {
			t.Errorf("thread %d: Tgid=%d Pid=%d State=%q", tid, st.Tgid, st.Pid, st.State)
		}
	}
	// A tid that is not in pid's group.
	if _, err := ReadStatus(pid, os.Getpid()); !errors.Is(err, ErrNotFound) {
		t.Errorf("ReadStatus(foreign tid) err = %v, want ErrNotFound", err)
	}
}

func TestThreadsSelf(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	me := unix.Gettid()
	got, err := Threads(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if len(got) < 1 || got[0] != os.Getpid() || !slices.IsSorted(got[1:]) || !slices.Contains(got, me) {
		t.Fatalf("Threads(self) = %v (pid %d, this thread %d)", got, os.Getpid(), me)
	}
}

func TestStatusSelf(t *testing.T) {
	old := unix.Umask(0o027)
	defer unix.Umask(old)

	// Block SIGUSR2 on this thread and make it pending there, so the per-
	// thread masks in status have known bits.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGUSR2)
	defer signal.Stop(sigs)
	var set, oldSet unix.Sigset_t
	set.Val[0] = 1 << (unix.SIGUSR2 - 1)
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &set, &oldSet); err != nil {
		t.Fatal(err)
	}
	tid := unix.Gettid()
	if err := unix.Tgkill(os.Getpid(), tid, unix.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	st, err := ReadStatus(os.Getpid(), tid)
	unix.PthreadSigmask(unix.SIG_SETMASK, &oldSet, nil)
	if err != nil {
		t.Fatal(err)
	}
	<-sigs // delivered once unblocked

	bit := uint64(1) << (unix.SIGUSR2 - 1)
	if st.SigBlk&bit == 0 || st.SigPnd&bit == 0 {
		t.Errorf("SigBlk=%#x SigPnd=%#x, want bit %#x in both", st.SigBlk, st.SigPnd, bit)
	}
	// The Go runtime installs a handler for SIGURG (preemption).
	if st.SigCgt&(1<<(unix.SIGURG-1)) == 0 {
		t.Errorf("SigCgt=%#x lacks SIGURG", st.SigCgt)
	}
	if st.Umask != 0o027 {
		t.Errorf("Umask = %#o, want 027", st.Umask)
	}
	if st.State != "R (running)" {
		t.Errorf("State of the reading thread = %q", st.State)
	}
	if st.Pid != tid || st.Tgid != os.Getpid() || st.PPid != os.Getppid() {
		t.Errorf("Pid=%d Tgid=%d PPid=%d", st.Pid, st.Tgid, st.PPid)
	}
	if len(st.NSpid) == 0 || st.NSpid[0] != tid {
		t.Errorf("NSpid = %v, want first %d", st.NSpid, tid)
	}
	r, e, s := unix.Getresuid()
	if st.Uid != [4]uint32{uint32(r), uint32(e), uint32(s), uint32(e)} {
		t.Errorf("Uid = %v, want %d %d %d %d", st.Uid, r, e, s, e)
	}
	r, e, s = unix.Getresgid()
	if st.Gid != [4]uint32{uint32(r), uint32(e), uint32(s), uint32(e)} {
		t.Errorf("Gid = %v, want %d %d %d %d", st.Gid, r, e, s, e)
	}
	groups, err := unix.Getgroups()
	if err != nil {
		t.Fatal(err)
	}
	var wantGroups []uint32
	for _, g := range groups {
		wantGroups = append(wantGroups, uint32(g))
	}
	slices.Sort(wantGroups)
	if !slices.Equal(slices.Sorted(slices.Values(st.Groups)), wantGroups) {
		t.Errorf("Groups = %v, want %v", st.Groups, wantGroups)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		t.Fatal(err)
	}
	capOf := func(lo, hi uint32) uint64 { return uint64(hi)<<32 | uint64(lo) }
	if st.CapEff != capOf(data[0].Effective, data[1].Effective) ||
		st.CapPrm != capOf(data[0].Permitted, data[1].Permitted) ||
		st.CapInh != capOf(data[0].Inheritable, data[1].Inheritable) {
		t.Errorf("caps eff/prm/inh = %#x/%#x/%#x, capget says %+v", st.CapEff, st.CapPrm, st.CapInh, data)
	}
	if os.Geteuid() == 0 && st.CapEff&(1<<unix.CAP_SYS_ADMIN) == 0 {
		t.Errorf("root without CAP_SYS_ADMIN in CapEff %#x", st.CapEff)
	}
	nnp, err := unix.PrctlRetInt(unix.PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if st.NoNewPrivs != (nnp == 1) {
		t.Errorf("NoNewPrivs = %v, prctl says %d", st.NoNewPrivs, nnp)
	}
	sc, err := unix.PrctlRetInt(unix.PR_GET_SECCOMP, 0, 0, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if st.Seccomp != sc {
		t.Errorf("Seccomp = %d, prctl says %d", st.Seccomp, sc)
	}
	comm, err := os.ReadFile("/proc/thread-self/comm")
	if err != nil {
		t.Fatal(err)
	}
	if st.Name != strings.TrimSuffix(string(comm), "\n") {
		t.Errorf("Name = %q, comm = %q", st.Name, comm)
	}
}

func TestStatSelf(t *testing.T) {
	st, err := ReadStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// State is the leader's, which may be asleep while this thread reads.
	if st.Pid != os.Getpid() || st.PPid != os.Getppid() || st.State == 0 || st.NumThreads < 1 || st.StartTime == 0 {
		t.Errorf("Pid=%d PPid=%d State=%c NumThreads=%d StartTime=%d", st.Pid, st.PPid, st.State, st.NumThreads, st.StartTime)
	}
	if st.Pgrp != unix.Getpgrp() {
		t.Errorf("Pgrp = %d, want %d", st.Pgrp, unix.Getpgrp())
	}
	sid, _ := unix.Getsid(0)
	if st.Session != sid {
		t.Errorf("Session = %d, want %d", st.Session, sid)
	}
	if !(st.StartCode < st.EndCode && st.EndCode <= st.StartData && st.StartData <= st.EndData &&
		st.EndData <= st.StartBrk && st.ArgStart < st.ArgEnd && st.ArgEnd <= st.EnvStart && st.EnvStart < st.EnvEnd &&
		st.StartStack != 0) {
		t.Fatalf("layout out of order: %+v", st)
	}
	// The argument and environment areas hold what cmdline and environ show.
	mem, err := os.Open("/proc/self/mem")
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	for _, c := range []struct {
		file       string
		start, end uint64
	}{{"cmdline", st.ArgStart, st.ArgEnd}, {"environ", st.EnvStart, st.EnvEnd}} {
		want, err := os.ReadFile("/proc/self/" + c.file)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, c.end-c.start)
		if _, err := mem.ReadAt(got, int64(c.start)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("memory at %s area differs from /proc/self/%s", c.file, c.file)
		}
	}
	// StartCode lies in an executable mapping of our own binary, StartStack
	// in [stack].
	exe, err := Exe(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	maps, err := Maps(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	var inText, inStack bool
	for _, m := range maps {
		if m.Start <= st.StartCode && st.StartCode < m.End && m.Exec && m.FilePath() == exe {
			inText = true
		}
		if m.Start <= st.StartStack && st.StartStack < m.End && m.Path == "[stack]" {
			inStack = true
		}
	}
	if !inText || !inStack {
		t.Errorf("StartCode %#x in text of %s: %v; StartStack %#x in [stack]: %v", st.StartCode, exe, inText, st.StartStack, inStack)
	}
}

func TestSelfLinksAuxvRlimits(t *testing.T) {
	pid := os.Getpid()
	exe, err := Exe(pid)
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := os.Executable(); exe != want {
		t.Errorf("Exe = %q, want %q", exe, want)
	}
	cwd, err := Cwd(pid)
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := os.Getwd(); cwd != want {
		t.Errorf("Cwd = %q, want %q", cwd, want)
	}
	if root, err := Root(pid); err != nil || root != "/" {
		t.Errorf("Root = %q, %v", root, err)
	}
	args, err := Cmdline(pid)
	if err != nil || !slices.Equal(args, os.Args) {
		t.Errorf("Cmdline = %q, %v; want %q", args, err, os.Args)
	}

	aux, err := Auxv(pid)
	if err != nil {
		t.Fatal(err)
	}
	n := len(aux)
	if n < 4 || aux[n-2] != 0 || aux[n-1] != 0 {
		t.Fatalf("auxv does not end in AT_NULL: %v", aux)
	}
	kv := map[uint64]uint64{}
	for i := 0; i < n; i += 2 {
		kv[aux[i]] = aux[i+1]
	}
	const atPagesz, atSysinfoEhdr = 6, 33 // linux/auxvec.h
	if kv[atPagesz] != uint64(os.Getpagesize()) {
		t.Errorf("AT_PAGESZ = %d", kv[atPagesz])
	}
	maps, err := Maps(pid)
	if err != nil {
		t.Fatal(err)
	}
	var vdso []Mapping
	for _, m := range maps {
		if m.Path == "[vdso]" {
			vdso = append(vdso, m)
		}
	}
	if len(vdso) != 1 || !vdso[0].IsSpecial() || vdso[0].IsAnon() || vdso[0].IsFile() || !vdso[0].Exec {
		t.Fatalf("[vdso] mappings: %+v", vdso)
	}
	if kv[atSysinfoEhdr] != vdso[0].Start {
		t.Errorf("AT_SYSINFO_EHDR %#x != [vdso] start %#x", kv[atSysinfoEhdr], vdso[0].Start)
	}

	lims, err := Rlimits(pid)
	if err != nil {
		t.Fatal(err)
	}
	if len(lims) != NumRlimits {
		t.Fatalf("%d rlimits", len(lims))
	}
	for res := range lims {
		var want unix.Rlimit
		if err := unix.Getrlimit(res, &want); err != nil {
			t.Fatal(err)
		}
		if lims[res] != want {
			t.Errorf("rlimit %d = %+v, want %+v", res, lims[res], want)
		}
	}
}

func TestChildSleep(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	cmd := startSleep(t, dir)
	pid := cmd.Process.Pid

	st, err := ReadStat(pid)
	if err != nil {
		t.Fatal(err)
	}
	if st.Comm != "sleep" || st.State != 'T' || st.PPid != os.Getpid() || st.StartCode >= st.EndCode || st.StartBrk == 0 || st.NumThreads != 1 {
		t.Errorf("stat: %+v", st)
	}
	status, err := ReadStatus(pid, pid)
	if err != nil {
		t.Fatal(err)
	}
	if status.Name != "sleep" || status.State != "T (stopped)" || status.PPid != os.Getpid() || status.Threads != 1 {
		t.Errorf("status: %+v", status)
	}
	if tids, err := Threads(pid); err != nil || !slices.Equal(tids, []int{pid}) {
		t.Errorf("Threads = %v, %v", tids, err)
	}
	path, _ := exec.LookPath("sleep")
	wantExe, _ := filepath.EvalSymlinks(path)
	if exe, err := Exe(pid); err != nil || exe != wantExe {
		t.Errorf("Exe = %q, %v; want %q", exe, err, wantExe)
	}
	if args, err := Cmdline(pid); err != nil || !slices.Equal(args, []string{"sleep", "1000"}) {
		t.Errorf("Cmdline = %q, %v", args, err)
	}
	if cwd, err := Cwd(pid); err != nil || cwd != dir {
		t.Errorf("Cwd = %q, %v; want %q", cwd, err, dir)
	}

	maps, err := Maps(pid)
	if err != nil {
		t.Fatal(err)
	}
	var text, stack, vdso bool
	for _, m := range maps {
		switch {
		case m.Path == wantExe && m.Exec && m.IsFile():
			text = m.Start <= st.StartCode && st.StartCode < m.End
		case m.Path == "[stack]":
			stack = m.IsAnon() && m.Rss > 0 && m.HasFlag("gd")
		case m.Path == "[vdso]":
			vdso = true
		}
	}
	if !text || !stack || !vdso {
		t.Errorf("sleep maps: text %v stack %v vdso %v", text, stack, vdso)
	}

	// Lower one soft limit of the child and read it back.
	var nofile unix.Rlimit
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, nil, &nofile); err != nil {
		t.Fatal(err)
	}
	set := unix.Rlimit{Cur: 77, Max: nofile.Max}
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &set, nil); err != nil {
		t.Fatal(err)
	}
	lims, err := Rlimits(pid)
	if err != nil {
		t.Fatal(err)
	}
	if lims[unix.RLIMIT_NOFILE] != set {
		t.Errorf("RLIMIT_NOFILE = %+v, want %+v", lims[unix.RLIMIT_NOFILE], set)
	}

	// exec.Cmd gives a child without Stdin/Stdout/Stderr /dev/null. (It
	// may hold more: fds this test binary inherited without O_CLOEXEC, and
	// whatever ld.so has open if it was stopped while loading.)
	fds, err := Fds(pid)
	if err != nil {
		t.Fatal(err)
	}
	null := unix.Mkdev(1, 3)
	if len(fds) < 3 {
		t.Fatalf("sleep fds: %+v", fds)
	}
	for i, fd := range fds[:3] {
		if fd.Num != i || fd.Target != "/dev/null" || fd.Kind() != FdCharDev || fd.Rdev != null {
			t.Errorf("fd %d: %+v", i, fd)
		}
	}
	if fds[0].Flags&unix.O_ACCMODE != unix.O_RDONLY || fds[1].Flags&unix.O_ACCMODE != unix.O_WRONLY {
		t.Errorf("stdin flags %#o, stdout flags %#o", fds[0].Flags, fds[1].Flags)
	}

	// Once reaped, every reader reports ErrNotFound.
	cmd.Process.Kill()
	cmd.Wait()
	checks := map[string]func() error{
		"Threads": func() error { _, err := Threads(pid); return err },
		"Maps":    func() error { _, err := Maps(pid); return err },
		"Status":  func() error { _, err := ReadStatus(pid, pid); return err },
		"Stat":    func() error { _, err := ReadStat(pid); return err },
		"Auxv":    func() error { _, err := Auxv(pid); return err },
		"Exe":     func() error { _, err := Exe(pid); return err },
		"Cmdline": func() error { _, err := Cmdline(pid); return err },
		"Rlimits": func() error { _, err := Rlimits(pid); return err },
		"Fds":     func() error { _, err := Fds(pid); return err },
		"Inet":    func() error { _, err := InetSockets(pid); return err },
		"Unix":    func() error { _, err := UnixSockets(pid); return err },
		"Pagemap": func() error { _, err := OpenPagemap(pid); return err },
		"Backlog": func() error { _, err := ListenBacklog(pid, 1); return err },
	}
	for name, f := range checks {
		if err := f(); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s after exit: err = %v, want ErrNotFound", name, err)
		}
	}
}
