package image

import (
	"fmt"
	"strings"
)

// Limits a valid image stays within.
const (
	maxProcesses = 1 << 15
	maxThreads   = 1 << 15
	maxVmas      = 1 << 20
	maxFds       = 1 << 20
	maxAddr      = 1 << 47 // x86_64 user address space (4-level paging)
	maxXState    = 1 << 16
	maxPid       = 1 << 22 // PID_MAX_LIMIT
)

// Validate checks every count, address, size and offset of img against the
// limits of the format and pagesLen, the length of pages.img.
func (img *Image) Validate(pagesLen int64) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrBadImage, fmt.Sprintf(format, a...))
	}
	if img.Version != FormatVersion {
		return bad("version %d", img.Version)
	}
	if !img.Mode.Valid() {
		return bad("mode %q", img.Mode)
	}
	if img.Arch != "x86_64" {
		return bad("arch %q", img.Arch)
	}
	if img.Mode == ModeLive && (img.Endpoint == "" || len(img.Token) != 32) {
		return bad("live image without page-server endpoint or 32-byte token")
	}
	if len(img.Processes) == 0 || len(img.Processes) > maxProcesses {
		return bad("%d processes", len(img.Processes))
	}
	ids := map[uint32]bool{}
	pids := map[int]bool{}
	for i := range img.Processes {
		p := &img.Processes[i]
		if ids[p.ID] || pids[p.Pid] {
			return bad("duplicate process id %d / pid %d", p.ID, p.Pid)
		}
		ids[p.ID], pids[p.Pid] = true, true
		if err := p.validate(img, pagesLen); err != nil {
			return bad("process %d: %v", p.Pid, err)
		}
	}
	return nil
}

func (p *Process) validate(img *Image, pagesLen int64) error {
	if p.Pid <= 0 || p.Pid >= maxPid {
		return fmt.Errorf("pid %d", p.Pid)
	}
	if len(p.Threads) == 0 || len(p.Threads) > maxThreads {
		return fmt.Errorf("%d threads", len(p.Threads))
	}
	if p.Threads[0].Tid != p.Pid {
		return fmt.Errorf("first thread %d is not the leader", p.Threads[0].Tid)
	}
	tids := map[int]bool{}
	for _, t := range p.Threads {
		if t.Tid <= 0 || t.Tid >= maxPid || tids[t.Tid] {
			return fmt.Errorf("thread id %d", t.Tid)
		}
		tids[t.Tid] = true
		if len(t.XState) > maxXState || (img.XSaveSize != 0 && len(t.XState) != img.XSaveSize) {
			return fmt.Errorf("thread %d: xstate size %d", t.Tid, len(t.XState))
		}
		if len(t.Comm) > 15 {
			return fmt.Errorf("thread %d: comm of %d bytes", t.Tid, len(t.Comm))
		}
		for _, si := range t.Pending {
			if err := si.validate(); err != nil {
				return fmt.Errorf("thread %d: %v", t.Tid, err)
			}
		}
		if t.Regs.Rip >= maxAddr || t.Regs.Rsp >= maxAddr {
			return fmt.Errorf("thread %d: rip/rsp outside user space", t.Tid)
		}
	}
	if len(p.Vmas) == 0 || len(p.Vmas) > maxVmas {
		return fmt.Errorf("%d mappings", len(p.Vmas))
	}
	var prevEnd uint64
	for i, v := range p.Vmas {
		if v.Start%PageSize != 0 || v.End%PageSize != 0 || v.Start >= v.End || v.Start < prevEnd {
			return fmt.Errorf("mapping %d %#x-%#x: bad bounds or order", i, v.Start, v.End)
		}
		if v.End > maxAddr && v.Kind != VmaVsyscall {
			return fmt.Errorf("mapping %#x-%#x beyond user space", v.Start, v.End)
		}
		prevEnd = v.End
		switch v.Kind {
		case VmaAnon, VmaShmem, VmaVDSO, VmaVVar, VmaVVarVclock, VmaVsyscall:
		case VmaFile:
			if !strings.HasPrefix(v.Path, "/") || strings.ContainsRune(v.Path, 0) {
				return fmt.Errorf("mapping %#x: bad path %q", v.Start, v.Path)
			}
			if v.Offset%PageSize != 0 {
				return fmt.Errorf("mapping %#x: unaligned file offset", v.Start)
			}
		default:
			return fmt.Errorf("mapping %#x: kind %q", v.Start, v.Kind)
		}
		if v.Prot&^7 != 0 {
			return fmt.Errorf("mapping %#x: prot %#x", v.Start, v.Prot)
		}
		prevRun := v.Start
		for _, r := range v.Runs {
			if r.NPages == 0 || r.Addr%PageSize != 0 || r.Addr < prevRun || r.NPages > (v.End-r.Addr)/PageSize {
				return fmt.Errorf("mapping %#x: run %#x+%d pages outside the mapping", v.Start, r.Addr, r.NPages)
			}
			prevRun = r.End()
			switch r.Where {
			case InPages:
				if r.Off%PageSize != 0 || r.Off > uint64(pagesLen) || r.NPages*PageSize > uint64(pagesLen)-r.Off {
					return fmt.Errorf("run %#x: pages.img offset %d+%d beyond its %d bytes", r.Addr, r.Off, r.NPages*PageSize, pagesLen)
				}
			case OnServer:
				if img.Mode != ModeLive {
					return fmt.Errorf("run %#x on a page server in a %s image", r.Addr, img.Mode)
				}
				if v.Kind != VmaAnon {
					return fmt.Errorf("run %#x: lazy pages in a %s mapping", r.Addr, v.Kind)
				}
			default:
				return fmt.Errorf("run %#x: where %q", r.Addr, r.Where)
			}
		}
	}
	if len(p.Fds) > maxFds {
		return fmt.Errorf("%d fds", len(p.Fds))
	}
	nums := map[int]bool{}
	for _, f := range p.Fds {
		if f.Num < 0 || f.Num >= maxFds || nums[f.Num] {
			return fmt.Errorf("fd %d", f.Num)
		}
		nums[f.Num] = true
		switch f.Kind {
		case FdFile, FdFIFO:
			if !strings.HasPrefix(f.Path, "/") || strings.ContainsRune(f.Path, 0) {
				return fmt.Errorf("fd %d: bad path %q", f.Num, f.Path)
			}
		case FdPipe, FdStdio:
		case FdSocket:
			if f.Sock == nil || len(f.Sock.Addr) > 128 {
				return fmt.Errorf("fd %d: bad socket", f.Num)
			}
		default:
			return fmt.Errorf("fd %d: kind %q", f.Num, f.Kind)
		}
	}
	for _, si := range p.SharedPending {
		if err := si.validate(); err != nil {
			return err
		}
	}
	for _, s := range p.Sigacts {
		if s.Signo < 1 || s.Signo > 64 {
			return fmt.Errorf("sigaction for signal %d", s.Signo)
		}
	}
	for _, r := range p.Rlimits {
		if r.Resource < 0 || r.Resource > 15 {
			return fmt.Errorf("rlimit %d", r.Resource)
		}
	}
	if len(p.MM.Auxv) > 1024 {
		return fmt.Errorf("auxv of %d words", len(p.MM.Auxv))
	}
	return nil
}

func (s Siginfo) validate() error {
	if s.Signo < 1 || s.Signo > 64 || len(s.Raw) != 128 {
		return fmt.Errorf("pending signal %d with %d bytes of siginfo", s.Signo, len(s.Raw))
	}
	return nil
}
