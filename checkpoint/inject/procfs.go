package inject

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// procStatus holds the fields of /proc/pid/status this package needs.
type procStatus struct {
	tgid, ppid int
	sigIgn     uint64
}

func readStatus(pid int) (procStatus, error) {
	var st procStatus
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return st, err
	}
	found := 0
	for line := range bytes.Lines(b) {
		k, v, ok := strings.Cut(strings.TrimSpace(string(line)), ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "Tgid":
			st.tgid, err = strconv.Atoi(v)
		case "PPid":
			st.ppid, err = strconv.Atoi(v)
		case "SigIgn":
			st.sigIgn, err = strconv.ParseUint(v, 16, 64)
		default:
			continue
		}
		if err != nil {
			return st, fmt.Errorf("parse /proc/%d/status %s: %w", pid, k, err)
		}
		found++
	}
	if found != 3 {
		return st, fmt.Errorf("parse /proc/%d/status: %d of 3 fields: %w", pid, found, unix.EINVAL)
	}
	return st, nil
}

// listTasks returns the thread ids in /proc/pid/task, sorted.
func listTasks(pid int) ([]int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return nil, err
	}
	tids := make([]int, 0, len(ents))
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		tids = append(tids, tid)
	}
	slices.Sort(tids)
	return tids, nil
}

// threadExited reports whether thread tid of pid is gone or a zombie.
func threadExited(pid, tid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/stat", pid, tid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	return b[i+2] == 'Z' || b[i+2] == 'X'
}

// findMapping returns the range of the first mapping of pid whose name
// (the last field of /proc/pid/maps) is name, e.g. "[vdso]".
func findMapping(pid int, name string) (start, end uint64, ok bool, err error) {
	err = scanMaps(pid, func(lo, hi uint64, perms, n string) bool {
		if n == name {
			start, end, ok = lo, hi, true
			return false
		}
		return true
	})
	return start, end, ok, err
}

// mappingPerms returns the permissions ("r-xp") of the mapping of pid that
// holds [addr, addr+size).
func mappingPerms(pid int, addr, size uint64) (perms string, ok bool, err error) {
	err = scanMaps(pid, func(lo, hi uint64, pm, _ string) bool {
		if lo <= addr && addr+size <= hi {
			perms, ok = pm, true
			return false
		}
		return true
	})
	return perms, ok, err
}

// scanMaps calls f for each line of /proc/pid/maps until f returns false.
func scanMaps(pid int, f func(lo, hi uint64, perms, name string) bool) error {
	file, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return err
	}
	defer file.Close()
	sc := bufio.NewScanner(file)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		los, his, ok := strings.Cut(fields[0], "-")
		if !ok {
			return fmt.Errorf("parse maps line %q: %w", sc.Text(), unix.EINVAL)
		}
		lo, err := strconv.ParseUint(los, 16, 64)
		if err != nil {
			return fmt.Errorf("parse maps line %q: %w", sc.Text(), err)
		}
		hi, err := strconv.ParseUint(his, 16, 64)
		if err != nil {
			return fmt.Errorf("parse maps line %q: %w", sc.Text(), err)
		}
		name := ""
		if len(fields) >= 6 {
			name = fields[5]
		}
		if !f(lo, hi, fields[1], name) {
			return nil
		}
	}
	return sc.Err()
}

// pidfdSendSignal sends sig through the pidfd, so a recycled pid cannot be
// hit.
func pidfdSendSignal(pidfd *os.File, sig unix.Signal) error {
	rc, err := pidfd.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.PidfdSendSignal(int(fd), sig, nil, 0)
	}); err != nil {
		return err
	}
	return serr
}
