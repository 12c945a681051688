package procfs

import (
	"strconv"
	"strings"
)

// Stat holds the fields of /proc/PID/stat the engine needs. Field numbers
// are those of proc(5). The memory-layout fields read as 0 for kernel
// threads, zombies, and readers without PTRACE_MODE_READ access.
type Stat struct {
	Pid        int    // 1
	Comm       string // 2, raw (may contain spaces and ')')
	State      byte   // 3
	PPid       int    // 4
	Pgrp       int    // 5
	Session    int    // 6
	TtyNr      int    // 7
	Tpgid      int    // 8
	Flags      uint32 // 9, PF_*
	Priority   int    // 18
	Nice       int    // 19
	NumThreads int    // 20
	StartTime  uint64 // 22, clock ticks after boot
	StartCode  uint64 // 26
	EndCode    uint64 // 27
	StartStack uint64 // 28
	ExitSignal int    // 38
	RtPriority uint32 // 40
	Policy     uint32 // 41
	StartData  uint64 // 45
	EndData    uint64 // 46
	StartBrk   uint64 // 47
	ArgStart   uint64 // 48
	ArgEnd     uint64 // 49
	EnvStart   uint64 // 50
	EnvEnd     uint64 // 51
	ExitCode   int    // 52
}

// ReadStat reads /proc/PID/stat.
func ReadStat(pid int) (*Stat, error) {
	b, err := readFile(procPath(pid, "stat"))
	if err != nil {
		return nil, err
	}
	return ParseStat(string(b))
}

// statFields is how many fields proc(5) documents (exit_code is field 52,
// present since Linux 3.5).
const statFields = 52

// ParseStat parses the contents of a stat file. The comm field may contain
// anything, including ") ", so the fields after it are found from the last
// ')' of the line.
func ParseStat(s string) (*Stat, error) {
	s = strings.TrimSuffix(s, "\n")
	open := strings.IndexByte(s, '(')
	closing := strings.LastIndexByte(s, ')')
	if open < 1 || closing < open || s[open-1] != ' ' {
		return nil, parseErr("stat", s)
	}
	pid, err := strconv.Atoi(s[:open-1])
	if err != nil {
		return nil, parseErr("stat pid", s)
	}
	rest := s[closing+1:]
	if !strings.HasPrefix(rest, " ") {
		return nil, parseErr("stat", s)
	}
	// f[i] is field i+3.
	f := strings.Fields(rest)
	if len(f) < statFields-2 {
		return nil, parseErr("stat (too few fields)", s)
	}
	if len(f[0]) != 1 {
		return nil, parseErr("stat state", s)
	}
	p := statParser{f: f}
	st := &Stat{
		Pid:        pid,
		Comm:       s[open+1 : closing],
		State:      f[0][0],
		PPid:       p.int(4),
		Pgrp:       p.int(5),
		Session:    p.int(6),
		TtyNr:      p.int(7),
		Tpgid:      p.int(8),
		Flags:      uint32(p.uint(9, 32)),
		Priority:   p.int(18),
		Nice:       p.int(19),
		NumThreads: p.int(20),
		StartTime:  p.uint(22, 64),
		StartCode:  p.uint(26, 64),
		EndCode:    p.uint(27, 64),
		StartStack: p.uint(28, 64),
		ExitSignal: p.int(38),
		RtPriority: uint32(p.uint(40, 32)),
		Policy:     uint32(p.uint(41, 32)),
		StartData:  p.uint(45, 64),
		EndData:    p.uint(46, 64),
		StartBrk:   p.uint(47, 64),
		ArgStart:   p.uint(48, 64),
		ArgEnd:     p.uint(49, 64),
		EnvStart:   p.uint(50, 64),
		EnvEnd:     p.uint(51, 64),
		ExitCode:   p.int(52),
	}
	if p.bad != 0 {
		return nil, parseErr("stat field "+strconv.Itoa(p.bad), s)
	}
	return st, nil
}

// statParser converts fields by proc(5) number and remembers the first one
// that did not parse.
type statParser struct {
	f   []string
	bad int
}

func (p *statParser) int(n int) int {
	v, err := strconv.Atoi(p.f[n-3])
	if err != nil && p.bad == 0 {
		p.bad = n
	}
	return v
}

func (p *statParser) uint(n, bits int) uint64 {
	v, err := strconv.ParseUint(p.f[n-3], 10, bits)
	if err != nil && p.bad == 0 {
		p.bad = n
	}
	return v
}
