package checkpoint

import (
	"context"
	"encoding/binary"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/checkpoint/procfs"
)

// fds rebuilds the descriptor table. The stub's 0-2 are the restorer's
// stdio and stay where the image says stdio; everything else is closed.
func (m *morph) fds(ctx context.Context) error {
	keep := map[int]bool{}
	for _, f := range m.p.Fds {
		if f.Kind == image.FdStdio {
			keep[f.Num] = true
		}
	}
	cur, err := procfs.Fds(m.tr.Pid())
	if err != nil {
		return err
	}
	for _, f := range cur {
		if !keep[f.Num] {
			if _, err := m.sys(0, unix.SYS_CLOSE, uintptr(f.Num)); err != nil {
				return fmt.Errorf("close stub fd %d: %w", f.Num, err)
			}
		}
	}
	pipes := map[uint64][2]int{} // pipe id → temporary read, write fds
	defer func() {
		for _, p := range pipes {
			m.sys(0, unix.SYS_CLOSE, uintptr(p[0]))
			m.sys(0, unix.SYS_CLOSE, uintptr(p[1]))
		}
	}()
	for _, f := range sortedFds(m.p.Fds) {
		if f.Kind == image.FdStdio {
			continue
		}
		tmp, owned, err := m.openFd(f, pipes)
		if err != nil {
			return fmt.Errorf("fd %d (%s %s): %w", f.Num, f.Kind, f.Path, err)
		}
		if err := m.place(tmp, f, owned); err != nil {
			return fmt.Errorf("fd %d: %w", f.Num, err)
		}
	}
	return nil
}

// openFd creates the object of f in the child and returns a temporary fd
// for it; owned says whether the temporary must be closed after placing.
func (m *morph) openFd(f image.Fd, pipes map[uint64][2]int) (int, bool, error) {
	switch f.Kind {
	case image.FdFile, image.FdFIFO:
		flags := f.Flags &^ (unix.O_CREAT | unix.O_TRUNC | unix.O_EXCL | unix.O_NOCTTY)
		if f.Kind == image.FdFIFO {
			// Opening one end of a FIFO blocks until the other is
			// opened: O_RDWR never blocks on Linux (fifo(7)).
			flags = flags&^unix.O_ACCMODE | unix.O_RDWR
		}
		path, err := m.str(f.Path)
		if err != nil {
			return 0, false, err
		}
		fd, err := m.sys(0, unix.SYS_OPENAT, uintptr(unix.AT_FDCWD&0xffffffff), path, uintptr(flags|unix.O_CLOEXEC), 0)
		if err != nil {
			return 0, false, fmt.Errorf("open: %w", err)
		}
		if f.Pos != 0 && f.Kind == image.FdFile {
			if _, err := m.sys(0, unix.SYS_LSEEK, fd, uintptr(f.Pos), unix.SEEK_SET); err != nil {
				m.sys(0, unix.SYS_CLOSE, fd)
				return 0, false, fmt.Errorf("seek to %d: %w", f.Pos, err)
			}
		}
		return int(fd), true, nil
	case image.FdPipe:
		p, ok := pipes[f.PipeID]
		if !ok {
			if _, err := m.sys(0, unix.SYS_PIPE2, uintptr(m.scratch), unix.O_CLOEXEC); err != nil {
				return 0, false, fmt.Errorf("pipe2: %w", err)
			}
			var b [8]byte
			if err := m.x.ReadMem(m.scratch, b[:]); err != nil {
				return 0, false, err
			}
			p = [2]int{int(le32(b[0:])), int(le32(b[4:]))}
			pipes[f.PipeID] = p
			if f.PipeSz > 0 {
				m.sys(0, unix.SYS_FCNTL, uintptr(p[1]), unix.F_SETPIPE_SZ, uintptr(f.PipeSz))
			}
		}
		if f.PipeRd {
			return p[0], false, nil
		}
		return p[1], false, nil
	case image.FdSocket:
		return m.socket(f)
	}
	return 0, false, fmt.Errorf("kind %q: %w", f.Kind, ErrUnsupported)
}

// place moves tmp to f.Num with f's status flags and close-on-exec.
func (m *morph) place(tmp int, f image.Fd, owned bool) error {
	if tmp != f.Num {
		fl := uintptr(0)
		if f.CloExec {
			fl = unix.O_CLOEXEC
		}
		if _, err := m.sys(0, unix.SYS_DUP3, uintptr(tmp), uintptr(f.Num), fl); err != nil {
			return fmt.Errorf("dup3 %d to %d: %w", tmp, f.Num, err)
		}
		if owned {
			m.sys(0, unix.SYS_CLOSE, uintptr(tmp))
		}
	} else if !f.CloExec {
		if _, err := m.sys(0, unix.SYS_FCNTL, uintptr(f.Num), unix.F_SETFD, 0); err != nil {
			return fmt.Errorf("clear close-on-exec: %w", err)
		}
	}
	// O_NONBLOCK and O_APPEND are the status flags F_SETFL can set.
	if st := f.Flags & (unix.O_NONBLOCK | unix.O_APPEND); st != 0 {
		if _, err := m.sys(0, unix.SYS_FCNTL, uintptr(f.Num), unix.F_SETFL, uintptr(st)); err != nil {
			return fmt.Errorf("set status flags: %w", err)
		}
	}
	return nil
}

// socket re-creates a socket: bound and listening ones with their address
// and options; a connected stream comes back unconnected — the peer stays
// with the source, a clone never steals a connection.
func (m *morph) socket(f image.Fd) (int, bool, error) {
	s := f.Sock
	fd, err := m.sys(0, unix.SYS_SOCKET, uintptr(s.Family), uintptr(s.Type|unix.SOCK_CLOEXEC), uintptr(s.Protocol))
	if err != nil {
		return 0, false, fmt.Errorf("socket: %w", err)
	}
	fail := func(err error) (int, bool, error) {
		m.sys(0, unix.SYS_CLOSE, fd)
		return 0, false, err
	}
	setInt := func(level, opt, v int) error {
		var b [4]byte
		binary.LittleEndian.PutUint32(b[:], uint32(v))
		if err := m.x.WriteMem(m.scratch, b[:]); err != nil {
			return err
		}
		_, err := m.sys(0, unix.SYS_SETSOCKOPT, fd, uintptr(level), uintptr(opt), uintptr(m.scratch), 4)
		return err
	}
	b2i := func(b bool) int {
		if b {
			return 1
		}
		return 0
	}
	opts := []struct {
		on         bool
		level, opt int
		v          int
	}{
		{s.ReuseAddr, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1},
		{s.ReusePort, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1},
		{s.KeepAlive, unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{s.NoDelay, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
		{s.Family == unix.AF_INET6, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, b2i(s.V6Only)},
	}
	for _, o := range opts {
		if o.on {
			if err := setInt(o.level, o.opt, o.v); err != nil {
				return fail(fmt.Errorf("setsockopt %d/%d: %w", o.level, o.opt, err))
			}
		}
	}
	bind := len(s.Addr) > 0 && (!s.Connected || s.Type == unix.SOCK_DGRAM)
	if bind {
		if err := m.x.WriteMem(m.scratch, s.Addr); err != nil {
			return fail(err)
		}
		if _, err := m.sys(0, unix.SYS_BIND, fd, uintptr(m.scratch), uintptr(len(s.Addr))); err != nil {
			return fail(fmt.Errorf("bind %s: %w", s.AddrStr, err))
		}
	}
	if s.Listening {
		if _, err := m.sys(0, unix.SYS_LISTEN, fd, uintptr(s.Backlog)); err != nil {
			return fail(fmt.Errorf("listen on %s: %w", s.AddrStr, err))
		}
	}
	return int(fd), true, nil
}

// threads re-creates every thread with its tid and per-thread state.
func (m *morph) threads(ctx context.Context) error {
	leader := m.tr.Pid()
	m.hostTids = []int{leader}
	for _, t := range m.p.Threads[1:] {
		if err := m.tr.CloneThread(leader, t.Tid); err != nil {
			return fmt.Errorf("clone thread %d: %w", t.Tid, err)
		}
		ts := m.tr.Threads()
		m.hostTids = append(m.hostTids, ts[len(ts)-1])
	}
	err := m.batch(func(context.Context) error {
		for i, t := range m.p.Threads {
			if err := m.threadSyscalls(m.hostTids[i], t); err != nil {
				return fmt.Errorf("thread %d: %w", t.Tid, err)
			}
		}
		return nil
	})(ctx)
	if err != nil {
		return err
	}
	for i, t := range m.p.Threads {
		if err := m.threadRegs(m.hostTids[i], t); err != nil {
			return fmt.Errorf("thread %d: %w", t.Tid, err)
		}
	}
	return nil
}

// threadSyscalls restores the per-thread state set by syscalls in the
// thread itself.
func (m *morph) threadSyscalls(h int, t image.Thread) error {
	if t.RseqAddr != 0 {
		if _, err := m.sys(h, unix.SYS_RSEQ, uintptr(t.RseqAddr), uintptr(t.RseqLen), 0, uintptr(t.RseqSig)); err != nil {
			return fmt.Errorf("register rseq at %#x: %w", t.RseqAddr, err)
		}
	}
	const ssDisable = 2
	if t.AltStackFl&ssDisable == 0 && t.AltStackSz != 0 {
		var b [24]byte
		binary.LittleEndian.PutUint64(b[0:], t.AltStackSP)
		binary.LittleEndian.PutUint32(b[8:], 0)
		binary.LittleEndian.PutUint64(b[16:], t.AltStackSz)
		if err := m.x.WriteMem(m.scratch, b[:]); err != nil {
			return err
		}
		if _, err := m.sys(h, unix.SYS_SIGALTSTACK, uintptr(m.scratch), 0); err != nil {
			return fmt.Errorf("sigaltstack: %w", err)
		}
	}
	if _, err := m.sys(h, unix.SYS_SET_TID_ADDRESS, uintptr(t.TidAddress)); err != nil {
		return fmt.Errorf("set_tid_address: %w", err)
	}
	if t.Comm != "" {
		name, err := m.str(t.Comm)
		if err != nil {
			return err
		}
		if _, err := m.sys(h, unix.SYS_PRCTL, unix.PR_SET_NAME, name); err != nil {
			return fmt.Errorf("set name: %w", err)
		}
	}
	return nil
}

// threadRegs restores the state set through ptrace.
func (m *morph) threadRegs(h int, t image.Thread) error {
	if err := m.tr.SetSigMask(h, t.SigMask); err != nil {
		return fmt.Errorf("sigmask: %w", err)
	}
	if err := m.tr.SetXState(h, t.XState); err != nil {
		return fmt.Errorf("xstate: %w", err)
	}
	regs := regsFromImage(t.Regs)
	restartFixup(&regs)
	if err := m.tr.SetSavedRegs(h, regs); err != nil {
		return fmt.Errorf("registers: %w", err)
	}
	return nil
}

func (m *morph) sigactions(ctx context.Context) error {
	for _, s := range m.p.Sigacts {
		var b [32]byte
		binary.LittleEndian.PutUint64(b[0:], s.Handler)
		binary.LittleEndian.PutUint64(b[8:], s.Flags)
		binary.LittleEndian.PutUint64(b[16:], s.Restorer)
		binary.LittleEndian.PutUint64(b[24:], s.Mask)
		if err := m.x.WriteMem(m.scratch, b[:]); err != nil {
			return err
		}
		if _, err := m.sys(0, unix.SYS_RT_SIGACTION, uintptr(s.Signo), uintptr(m.scratch), 0, 8); err != nil {
			return fmt.Errorf("signal %d: %w", s.Signo, err)
		}
	}
	return nil
}

// attrs restores cwd, root, umask and rlimits.
func (m *morph) attrs(ctx context.Context) error {
	if m.p.Root != "/" {
		path, err := m.str(m.p.Root)
		if err != nil {
			return err
		}
		if _, err := m.sys(0, unix.SYS_CHROOT, path); err != nil {
			return fmt.Errorf("chroot %s: %w", m.p.Root, err)
		}
	}
	path, err := m.str(m.p.Cwd)
	if err != nil {
		return err
	}
	if _, err := m.sys(0, unix.SYS_CHDIR, path); err != nil {
		return fmt.Errorf("chdir %s: %w", m.p.Cwd, err)
	}
	if _, err := m.sys(0, unix.SYS_UMASK, uintptr(m.p.Umask)); err != nil {
		return fmt.Errorf("umask: %w", err)
	}
	for _, r := range m.p.Rlimits {
		lim := unix.Rlimit{Cur: r.Cur, Max: r.Max}
		if err := unix.Prlimit(m.tr.Pid(), r.Resource, &lim, nil); err != nil {
			// Raising a hard limit needs CAP_SYS_RESOURCE; keep ours
			// then, but never leave a soft limit above the source's.
			var cur unix.Rlimit
			if unix.Prlimit(m.tr.Pid(), r.Resource, nil, &cur) == nil && cur.Cur > r.Cur {
				cur.Cur = r.Cur
				unix.Prlimit(m.tr.Pid(), r.Resource, &cur, nil)
			}
		}
	}
	return nil
}

// creds sets every thread's credentials (they are per thread in Linux):
// groups and gids first, then uids with SECBIT_NO_SETUID_FIXUP so the
// capability sets survive until capset sets them exactly.
func (m *morph) creds(ctx context.Context) error {
	c := m.p.Creds
	const (
		secbitNoSetuidFixup = 1 << 2
		prCapbsetDrop       = 24
		prSetSecurebits     = 28
		prCapAmbient        = 47
		prCapAmbientRaise   = 2
		capVersion3         = 0x20080522
		lastCap             = 40
	)
	for _, h := range m.hostTids {
		groups := make([]byte, 0, 4*len(c.Groups))
		for _, g := range c.Groups {
			groups = binary.LittleEndian.AppendUint32(groups, g)
		}
		if len(groups) > 0 {
			if err := m.x.WriteMem(m.scratch, groups); err != nil {
				return err
			}
		}
		steps := []struct {
			what string
			nr   uintptr
			args []uintptr
		}{
			{"setgroups", unix.SYS_SETGROUPS, []uintptr{uintptr(len(c.Groups)), uintptr(m.scratch)}},
			{"setresgid", unix.SYS_SETRESGID, []uintptr{uintptr(c.Gid[0]), uintptr(c.Gid[1]), uintptr(c.Gid[2])}},
			{"setfsgid", unix.SYS_SETFSGID, []uintptr{uintptr(c.Gid[3])}},
		}
		for cp := 0; cp <= lastCap; cp++ {
			if c.CapBnd&(1<<cp) == 0 {
				steps = append(steps, struct {
					what string
					nr   uintptr
					args []uintptr
				}{fmt.Sprintf("drop bounding cap %d", cp), unix.SYS_PRCTL, []uintptr{prCapbsetDrop, uintptr(cp)}})
			}
		}
		steps = append(steps, []struct {
			what string
			nr   uintptr
			args []uintptr
		}{
			{"securebits", unix.SYS_PRCTL, []uintptr{prSetSecurebits, secbitNoSetuidFixup}},
			{"setresuid", unix.SYS_SETRESUID, []uintptr{uintptr(c.Uid[0]), uintptr(c.Uid[1]), uintptr(c.Uid[2])}},
			{"setfsuid", unix.SYS_SETFSUID, []uintptr{uintptr(c.Uid[3])}},
			{"securebits", unix.SYS_PRCTL, []uintptr{prSetSecurebits, 0}},
		}...)
		for _, s := range steps {
			if s.nr == unix.SYS_PRCTL && s.args[0] == prCapbsetDrop {
				if _, err := m.sys(h, s.nr, s.args...); err != nil && err != unix.EINVAL {
					// EINVAL: a capability this kernel does not know.
					continue
				}
				continue
			}
			if _, err := m.sys(h, s.nr, s.args...); err != nil {
				return fmt.Errorf("%s: %w", s.what, err)
			}
		}
		// capset: header {version, pid} then two data words {eff, prm, inh}.
		var b [32]byte
		binary.LittleEndian.PutUint32(b[0:], capVersion3)
		binary.LittleEndian.PutUint32(b[8:], uint32(c.CapEff))
		binary.LittleEndian.PutUint32(b[12:], uint32(c.CapPrm))
		binary.LittleEndian.PutUint32(b[16:], uint32(c.CapInh))
		binary.LittleEndian.PutUint32(b[20:], uint32(c.CapEff>>32))
		binary.LittleEndian.PutUint32(b[24:], uint32(c.CapPrm>>32))
		binary.LittleEndian.PutUint32(b[28:], uint32(c.CapInh>>32))
		if err := m.x.WriteMem(m.scratch, b[:]); err != nil {
			return err
		}
		if _, err := m.sys(h, unix.SYS_CAPSET, uintptr(m.scratch), uintptr(m.scratch+8)); err != nil {
			return fmt.Errorf("capset: %w", err)
		}
		for cp := 0; cp <= lastCap; cp++ {
			if c.CapAmb&(1<<cp) != 0 {
				if _, err := m.sys(h, unix.SYS_PRCTL, prCapAmbient, prCapAmbientRaise, uintptr(cp)); err != nil {
					return fmt.Errorf("raise ambient cap %d: %w", cp, err)
				}
			}
		}
		if c.NoNewPrivs {
			if _, err := m.sys(h, unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1); err != nil {
				return fmt.Errorf("no_new_privs: %w", err)
			}
		}
	}
	return nil
}

// signals queues the checkpointed pending signals again, each from the
// thread it is for: the kernel lets a process queue any siginfo to itself
// (kernel/signal.c: do_rt_tgsigqueueinfo).
func (m *morph) signals(ctx context.Context) error {
	queue := func(h int, nr uintptr, args []uintptr, si image.Siginfo) error {
		if err := m.x.WriteMem(m.scratch, si.Raw); err != nil {
			return err
		}
		if _, err := m.sys(h, nr, append(args, uintptr(si.Signo), uintptr(m.scratch))...); err != nil {
			return fmt.Errorf("queue signal %d: %w", si.Signo, err)
		}
		return nil
	}
	for i, t := range m.p.Threads {
		for _, si := range t.Pending {
			if err := queue(m.hostTids[i], unix.SYS_RT_TGSIGQUEUEINFO, []uintptr{uintptr(m.p.Pid), uintptr(t.Tid)}, si); err != nil {
				return err
			}
		}
	}
	for _, si := range m.p.SharedPending {
		if err := queue(0, unix.SYS_RT_SIGQUEUEINFO, []uintptr{uintptr(m.p.Pid)}, si); err != nil {
			return err
		}
	}
	return nil
}
