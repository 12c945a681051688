package procfs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Rlimit is one resource limit as prlimit(2) reports it.
type Rlimit = unix.Rlimit

// NumRlimits is the number of resource limits Rlimits reads (RLIM_NLIMITS on
// Linux: RLIMIT_CPU 0 .. RLIMIT_RTTIME 15).
const NumRlimits = 16

// procPath joins /proc/PID and the given elements.
func procPath(pid int, elem ...string) string {
	return "/proc/" + strconv.Itoa(pid) + "/" + strings.Join(elem, "/")
}

// taskPath is /proc/PID/task/TID/elem.
func taskPath(pid, tid int, elem string) string {
	return procPath(pid, "task", strconv.Itoa(tid), elem)
}

// wrap names the step and, when the errno says the process is gone, adds
// ErrNotFound to the chain.
func wrap(step string, err error) error {
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("%s: %w: %w", step, ErrNotFound, err)
	}
	return fmt.Errorf("%s: %w", step, err)
}

// parseErr builds an ErrParse error that quotes the offending input.
func parseErr(what, input string) error {
	if len(input) > 120 {
		input = input[:120] + "…"
	}
	return fmt.Errorf("parse %s %q: %w", what, input, ErrParse)
}

func readFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, wrap("read "+path, err)
	}
	return b, nil
}

func readLink(path string) (string, error) {
	s, err := os.Readlink(path)
	if err != nil {
		return "", wrap("readlink "+path, err)
	}
	return s, nil
}

// Threads lists the thread ids of pid's thread group from /proc/PID/task:
// pid itself first (the leader, when pid is the tgid), then the others in
// ascending order.
func Threads(pid int) ([]int, error) {
	path := procPath(pid, "task")
	ents, err := os.ReadDir(path)
	if err != nil {
		return nil, wrap("list "+path, err)
	}
	tids := make([]int, 0, len(ents))
	for _, e := range ents {
		tid, err := strconv.Atoi(e.Name())
		if err != nil || tid <= 0 {
			return nil, parseErr(path+" entry", e.Name())
		}
		tids = append(tids, tid)
	}
	slices.Sort(tids)
	if i := slices.Index(tids, pid); i > 0 {
		copy(tids[1:i+1], tids[:i])
		tids[0] = pid
	}
	return tids, nil
}

// Exe is the target of /proc/PID/exe (with " (deleted)" appended by the
// kernel if the executable was unlinked).
func Exe(pid int) (string, error) { return readLink(procPath(pid, "exe")) }

// Cwd is the target of /proc/PID/cwd, as seen from the caller's root.
func Cwd(pid int) (string, error) { return readLink(procPath(pid, "cwd")) }

// Root is the target of /proc/PID/root, as seen from the caller's root.
func Root(pid int) (string, error) { return readLink(procPath(pid, "root")) }

// Cmdline splits /proc/PID/cmdline at its NUL bytes. A process that rewrote
// its argument area without terminating NULs yields one element per
// NUL-separated piece of what the kernel returns. Kernel threads and zombies
// give an empty slice.
func Cmdline(pid int) ([]string, error) {
	b, err := readFile(procPath(pid, "cmdline"))
	if err != nil {
		return nil, err
	}
	return splitNul(b), nil
}

// splitNul splits b at NUL bytes, dropping the terminator of the last element.
func splitNul(b []byte) []string {
	if len(b) == 0 {
		return []string{}
	}
	s := strings.TrimSuffix(string(b), "\x00")
	return strings.Split(s, "\x00")
}

// Auxv returns /proc/PID/auxv as raw words: key, value, key, value, …,
// including the closing AT_NULL pair when the kernel reports one.
func Auxv(pid int) ([]uint64, error) {
	path := procPath(pid, "auxv")
	b, err := readFile(path)
	if err != nil {
		return nil, err
	}
	return parseAuxv(path, b)
}

func parseAuxv(path string, b []byte) ([]uint64, error) {
	if len(b)%16 != 0 {
		return nil, fmt.Errorf("parse %s: %d bytes is not a whole number of pairs: %w", path, len(b), ErrParse)
	}
	words := make([]uint64, len(b)/8)
	for i := range words {
		words[i] = binary.NativeEndian.Uint64(b[i*8:])
	}
	return words, nil
}

// Rlimits reads every resource limit of pid with prlimit(2) (which needs the
// caller to be allowed to ptrace-read pid). Index i holds resource i.
func Rlimits(pid int) ([]Rlimit, error) {
	out := make([]Rlimit, NumRlimits)
	for res := range out {
		if err := unix.Prlimit(pid, res, nil, &out[res]); err != nil {
			return nil, wrap(fmt.Sprintf("prlimit pid %d resource %d", pid, res), err)
		}
	}
	return out, nil
}
