package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cowmig/cowmig/checkpoint/image"
	"github.com/cowmig/cowmig/checkpoint/procfs"
)

// COW is how a live or full snapshot keeps the pages the process
// overwrites after the snapshot instant.
//
//   - COWUffd (the default): the anonymous memory is write-protected with
//     userfaultfd and every populated page pinned in pipes while frozen; a
//     write fault saves the page before the write goes on, and a drain
//     copies the rest into the page server's memory. The copies belong to
//     the page server: the process's memory cgroup does not pay for them.
//   - COWFork: while frozen, the process is forked into a shadow (a child
//     stopped under ptrace before its first instruction, see
//     inject.Process.Shadow). The kernel's own copy-on-write keeps the
//     shadow's memory as it was at the fork, and the page server reads it
//     from there. The freeze costs a page-table copy instead of a
//     protection pass and a pin (about 2x shorter at 4 KiB pages, far
//     shorter with huge pages); a first write to a page costs a kernel COW fault
//     instead of a round trip to the page server; nothing is copied that
//     the process does not overwrite. But the copies are the process's
//     own, charged to its memory cgroup; the shadow is a process in its
//     pid namespace and cgroup (named cowmig-shadow, counted by pids.max)
//     until the snapshot is released; and it dies with the pid namespace:
//     a container whose init exits loses the snapshot (the restore then
//     fails closed).
type COW string

// Copy-on-write methods.
const (
	COWUffd COW = "uffd"
	COWFork COW = "fork"
)

// Valid reports whether c is a known method.
func (c COW) Valid() bool { return c == COWUffd || c == COWFork }

// shadowName is the comm of a shadow process.
const shadowName = "cowmig-shadow"

// IsShadow reports whether pid is the shadow process of a fork snapshot
// (see COW): not part of the workload. A shadow is named shadowName and
// has exit signal 0 (a workload's child would rarely have both).
func IsShadow(pid int) bool {
	st, err := procfs.ReadStat(pid)
	return err == nil && st.Comm == shadowName && st.ExitSignal == 0
}

// shadowSnapshot forks the frozen target into a shadow that holds runs and
// records them in p. It runs while the target is frozen, last; pm is the
// target's page map.
func (d *dumper) shadowSnapshot(p *image.Process, runs []pinRun, pm *procfs.Pagemap) (_ *Snapshot, err error) {
	s := &Snapshot{proc: p.ID, stop: make(chan struct{}), windowEnd: make(chan struct{})}
	var at uint64
	for _, r := range runs {
		n := r.npages * image.PageSize
		s.segs = append(s.segs, pinSeg{addr: r.addr, end: r.addr + n, at: at})
		at += n
	}
	sh, err := d.tr.Shadow(shadowName)
	if err != nil {
		return nil, fmt.Errorf("fork shadow of pid %d (copy-on-write method fork; uffd does not need one): %w", d.pid, err)
	}
	s.shadow = sh
	s.shadowPidfd, s.watchStop = -1, -1
	s.lost = make(chan struct{})
	if err := s.watchShadow(); err != nil {
		s.killShadow()
		return nil, err
	}
	defer func() {
		if err != nil {
			s.Release()
		}
	}()
	if err := checkInherited(p, runs, pm, sh.Pid()); err != nil {
		return nil, err
	}
	d.recordRuns(s, p)
	d.mark("fork")
	return s, nil
}

// checkInherited checks that the shadow (pid) got every mapping of runs
// with its pages. The mappings with MADV_DONTFORK or MADV_WIPEONFORK were
// copied instead, but their VmFlags were read before the freeze: one that
// got either advice since, on the whole mapping (which leaves its bounds
// as they were), would be missing from the shadow or empty there, and the
// snapshot would serve zeros. A mapping where the frozen target has a
// page and the shadow has none fails the dump. One page-map lookup that
// stops at the first page per mapping, two for a mapping the shadow has
// no page of.
func checkInherited(p *image.Process, runs []pinRun, pm *procfs.Pagemap, pid int) error {
	spm, err := procfs.OpenPagemap(pid)
	if err != nil {
		return fmt.Errorf("open shadow page map: %w", err)
	}
	defer spm.Close()
	hasPage := func(m *procfs.Pagemap, v image.Vma) (bool, error) {
		regs, err := m.ScanAll(procfs.ScanArgs{Start: v.Start, End: v.End, CategoryAnyOf: procfs.PagePresent | procfs.PageSwapped,
			ReturnMask: procfs.PagePresent | procfs.PageSwapped, MaxPages: 1})
		return len(regs) > 0, err
	}
	last := -1
	for _, r := range runs {
		if r.vma == last {
			continue
		}
		last = r.vma
		v := p.Vmas[r.vma]
		sh, serr := hasPage(spm, v)
		if serr == nil && sh {
			continue
		}
		// Empty in the shadow: the runs came from the target's page map
		// (or, for a mapping wholly resident before the freeze, from
		// its size alone), so look at the frozen target only now.
		has, err := hasPage(pm, v)
		if err != nil {
			return fmt.Errorf("scan page map %#x-%#x: %w", v.Start, v.End, err)
		}
		if has {
			return fmt.Errorf("mapping %#x-%#x was not inherited by the shadow with its pages (%v): MADV_DONTFORK or MADV_WIPEONFORK set since the snapshot began; retry, or use copy-on-write method uffd: %w",
				v.Start, v.End, serr, ErrUnsupported)
		}
	}
	return nil
}

// watchShadow reaps the shadow as soon as it dies before its release (a
// SIGKILL, or the end of its pid namespace when a container's init
// exits). It must: a dead tracee stays a zombie until its tracer waits for
// it, and its parent's exit (zap_pid_ns_processes for a namespace's init)
// would wait for it too. The snapshot is lost then; Lost says so.
func (s *Snapshot) watchShadow() error {
	fd, err := unix.PidfdOpen(s.shadow.Pid(), unix.PIDFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("watch shadow %d: pidfd_open: %w", s.shadow.Pid(), err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("watch shadow %d: eventfd: %w", s.shadow.Pid(), err)
	}
	// Both are closed by closeAll, once this goroutine ended.
	s.shadowPidfd, s.watchStop = fd, efd
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		// The pidfd is readable once the shadow has exited; Release
		// kills it, and also writes the eventfd in case the kill failed.
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(efd), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); err == nil || err != unix.EINTR {
				break
			}
		}
		s.shadowMu.RLock()
		gone := s.shadowGone
		s.shadowMu.RUnlock()
		if !gone {
			s.setErr(fmt.Errorf("shadow process %d of the snapshot died: %w", s.shadow.Pid(), ErrSnapshotLost))
		}
		s.killShadow() // reaps it
		close(s.lost)
	}()
	return nil
}

// ErrSnapshotLost is the error of a fork snapshot whose shadow died
// before the snapshot was released.
var ErrSnapshotLost = errors.New("snapshot lost")

// Lost is closed when the snapshot can no longer serve pages it did not
// copy already: a fork snapshot's shadow is dead (Err says why, unless
// Release killed it). It is nil (never ready) for a uffd snapshot.
func (s *Snapshot) Lost() <-chan struct{} { return s.lost }

// readShadow copies the shadow's memory at [addr, addr+len(buf)), which
// must lie in the snapshot's runs, into buf.
func (s *Snapshot) readShadow(addr uint64, buf []byte) error {
	s.shadowMu.RLock()
	defer s.shadowMu.RUnlock()
	if s.shadowGone {
		if err := s.Err(); err != nil {
			return err
		}
		return ErrReleased
	}
	for len(buf) > 0 {
		i := s.findSeg(addr)
		if i < 0 {
			return fmt.Errorf("read %#x: %w", addr, ErrNotInSnapshot)
		}
		n := min(uint64(len(buf)), s.segs[i].end-addr)
		// Through /proc/PID/mem, not process_vm_readv: that pins the
		// pages (FOLL_PIN), and pinning a page the shadow shares with the
		// process makes the kernel give the shadow a copy of its own
		// first (GUP's unshare): a page allocation and a copy per page,
		// measured 0.4-0.9 GiB/s and the snapshot's size again in memory,
		// against 3.4-4 GiB/s and nothing for /proc/PID/mem. The file is
		// bound to the shadow's mm, so a reused pid cannot be read.
		if err := s.shadow.ReadMem(addr, buf[:n]); err != nil {
			// The shadow never runs: its mappings cannot change, so a
			// read ends early (EIO here) only once its memory is gone:
			// it was killed, and the mm goes before the exit is
			// reported. Anything else (ENOMEM bringing a page back
			// from swap) fails this read only.
			if errors.Is(err, unix.EIO) || s.shadowDead() {
				err = fmt.Errorf("read shadow %d: %w: %w", s.shadow.Pid(), ErrSnapshotLost, err)
				s.setErr(err)
				return err
			}
			return fmt.Errorf("read shadow %d: %w", s.shadow.Pid(), err)
		}
		buf = buf[n:]
		addr += n
	}
	return nil
}

// shadowDead reports whether the shadow has exited.
func (s *Snapshot) shadowDead() bool {
	fds := []unix.PollFd{{Fd: int32(s.shadowPidfd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0
}

// drainShadow copies the whole snapshot into pages.img (full mode).
func (s *Snapshot) drainShadow(ctx context.Context) error {
	const chunk = 4 << 20
	buf := make([]byte, chunk)
	for _, sg := range s.segs {
		for a := sg.addr; a < sg.end; a += chunk {
			if err := ctx.Err(); err != nil {
				return err
			}
			n := min(uint64(chunk), sg.end-a)
			if err := s.readShadow(a, buf[:n]); err != nil {
				return err
			}
			if _, err := s.pages.WriteAt(buf[:n], int64(s.pagesBase+sg.at+(a-sg.addr))); err != nil {
				return fmt.Errorf("write pages file: %w", err)
			}
		}
	}
	return nil
}

// killShadow kills and reaps the shadow (it then waits as a zombie for its
// parent, the target: see reapShadows). Idempotent.
func (s *Snapshot) killShadow() {
	if s.shadow == nil {
		return
	}
	s.shadowMu.Lock()
	defer s.shadowMu.Unlock()
	if s.shadowGone {
		return
	}
	s.shadowGone = true
	if err := s.shadow.Kill(); err != nil && !errors.Is(err, unix.ESRCH) {
		s.setErr(fmt.Errorf("kill shadow %d: %w", s.shadow.Pid(), err))
	}
}

// reapShadows collects, from inside the frozen target, the zombies the
// shadows of its earlier fork snapshots left (their parent is the target,
// and with exit signal 0 no wait(2) of the target's own sees them). Live
// shadows (snapshots still served) are left alone.
func (d *dumper) reapShadows(shadows []int) error {
	for _, pid := range shadows {
		st, err := procfs.ReadStatus(pid, pid)
		if err != nil || !strings.HasPrefix(st.State, "Z") || len(st.NSpid) == 0 {
			continue // gone, or still serving
		}
		nspid := st.NSpid[len(st.NSpid)-1]
		ret, err := d.tr.Syscall(0, unix.SYS_WAIT4, uintptr(nspid), 0, unix.WNOHANG|unix.WALL, 0)
		if err != nil {
			return fmt.Errorf("reap shadow %d: %w", pid, err)
		}
		if e := int64(ret); e < 0 && e != -int64(unix.ECHILD) {
			return fmt.Errorf("reap shadow %d: wait4: %w", pid, unix.Errno(-e))
		}
	}
	return nil
}

// ShadowPid is the pid (in the caller's namespace) of a fork snapshot's
// shadow process; 0 for a uffd snapshot.
func (s *Snapshot) ShadowPid() int {
	if s.shadow == nil {
		return 0
	}
	return s.shadow.Pid()
}
