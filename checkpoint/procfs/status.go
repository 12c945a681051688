package procfs

import (
	"strconv"
	"strings"
)

// Status holds the fields of /proc/PID/task/TID/status the engine needs.
type Status struct {
	// Name is the comm, with the kernel's "\n" and "\\" escapes undone.
	Name string
	// State is the raw value, e.g. "S (sleeping)" or "t (tracing stop)".
	State           string
	Tgid, Pid, PPid int
	TracerPid       int
	NSpid           []int // outermost (the /proc mount's) first
	Threads         int
	Uid, Gid        [4]uint32 // real, effective, saved, fs
	Groups          []uint32
	CapInh, CapPrm  uint64
	CapEff, CapBnd  uint64
	CapAmb          uint64
	NoNewPrivs      bool
	Seccomp         int // 0 disabled, 1 strict, 2 filter
	SeccompFilters  int
	SigPnd, ShdPnd  uint64 // thread-private and process-shared pending
	SigBlk, SigIgn  uint64
	SigCgt          uint64
	Umask           uint32
}

// ReadStatus reads /proc/PID/task/TID/status; pass tid == pid for the
// thread-group leader. Signal masks, SigPnd and capabilities are per thread.
func ReadStatus(pid, tid int) (*Status, error) {
	b, err := readFile(taskPath(pid, tid, "status"))
	if err != nil {
		return nil, err
	}
	return ParseStatus(string(b))
}

// ParseStatus parses the contents of a status file. Name, Pid, Tgid, PPid,
// Uid and Gid are required; other lines are optional (older kernels lack
// some) and unknown lines are ignored.
func ParseStatus(s string) (*Status, error) {
	st := &Status{}
	// seen has one bit per required key, so a repeated key cannot stand in
	// for a missing one.
	const required = 1<<6 - 1
	seen := 0
	for line := range strings.Lines(s) {
		line = strings.TrimSuffix(line, "\n")
		if line == "" {
			continue
		}
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			return nil, parseErr("status line", line)
		}
		val = strings.TrimLeft(val, " \t")
		var err error
		switch key {
		case "Name":
			st.Name = unescapeComm(val)
			seen |= 1 << 0
		case "State":
			st.State = val
		case "Tgid":
			st.Tgid, err = statusInt(val)
			seen |= 1 << 1
		case "Pid":
			st.Pid, err = statusInt(val)
			seen |= 1 << 2
		case "PPid":
			st.PPid, err = statusInt(val)
			seen |= 1 << 3
		case "TracerPid":
			st.TracerPid, err = statusInt(val)
		case "NSpid":
			st.NSpid, err = statusInts(val)
		case "Threads":
			st.Threads, err = statusInt(val)
		case "Uid", "Gid":
			var ids []uint32
			ids, err = statusUints(val)
			if err == nil && len(ids) != 4 {
				err = ErrParse
			}
			if err == nil {
				if key == "Uid" {
					st.Uid = [4]uint32(ids)
					seen |= 1 << 4
				} else {
					st.Gid = [4]uint32(ids)
					seen |= 1 << 5
				}
			}
		case "Groups":
			st.Groups, err = statusUints(val)
		case "CapInh":
			st.CapInh, err = statusHex(val)
		case "CapPrm":
			st.CapPrm, err = statusHex(val)
		case "CapEff":
			st.CapEff, err = statusHex(val)
		case "CapBnd":
			st.CapBnd, err = statusHex(val)
		case "CapAmb":
			st.CapAmb, err = statusHex(val)
		case "SigPnd":
			st.SigPnd, err = statusHex(val)
		case "ShdPnd":
			st.ShdPnd, err = statusHex(val)
		case "SigBlk":
			st.SigBlk, err = statusHex(val)
		case "SigIgn":
			st.SigIgn, err = statusHex(val)
		case "SigCgt":
			st.SigCgt, err = statusHex(val)
		case "NoNewPrivs":
			var v int
			v, err = statusInt(val)
			st.NoNewPrivs = v != 0
		case "Seccomp":
			st.Seccomp, err = statusInt(val)
		case "Seccomp_filters":
			st.SeccompFilters, err = statusInt(val)
		case "Umask":
			var v uint64
			v, err = strconv.ParseUint(val, 8, 32)
			st.Umask = uint32(v)
		}
		if err != nil {
			return nil, parseErr("status "+key, line)
		}
	}
	if seen != required {
		return nil, parseErr("status (missing one of Name, Tgid, Pid, PPid, Uid, Gid)", s)
	}
	return st, nil
}

func statusInt(v string) (int, error) { return strconv.Atoi(v) }

func statusHex(v string) (uint64, error) {
	if len(v) == 0 || len(v) > 16 {
		return 0, ErrParse
	}
	return strconv.ParseUint(v, 16, 64)
}

func statusInts(v string) ([]int, error) {
	f := strings.Fields(v)
	out := make([]int, len(f))
	for i, s := range f {
		n, err := strconv.Atoi(s)
		if err != nil {
			return nil, err
		}
		out[i] = n
	}
	return out, nil
}

func statusUints(v string) ([]uint32, error) {
	f := strings.Fields(v)
	out := make([]uint32, len(f))
	for i, s := range f {
		n, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return nil, err
		}
		out[i] = uint32(n)
	}
	return out, nil
}

// unescapeComm undoes proc_task_name's escaping: only '\n' and '\\' are
// escaped there (seq_escape_str with only="\n\\").
func unescapeComm(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			switch s[i+1] {
			case 'n':
				b.WriteByte('\n')
				i++
				continue
			case '\\':
				b.WriteByte('\\')
				i++
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
