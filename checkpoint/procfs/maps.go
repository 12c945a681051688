package procfs

import (
	"bufio"
	"bytes"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// Mapping is one VMA of /proc/PID/smaps.
type Mapping struct {
	Start, End uint64
	// Read, Write, Exec and Shared come from the perms column; Shared is
	// 's' (VM_MAYSHARE), private is 'p'.
	Read, Write, Exec, Shared bool
	// Offset is the file offset in bytes (0 for anonymous memory).
	Offset       uint64
	Major, Minor uint32
	Inode        uint64
	// Path is the raw path column: "" for anonymous memory, "[heap]",
	// "[stack]", "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]",
	// "[anon:NAME]", "[anon_shmem:NAME]", "/dev/zero (deleted)" for shared
	// anonymous memory, "/memfd:NAME (deleted)", "/SYSV%08x (deleted)",
	// "/path" or "/path (deleted)". The kernel escapes only '\n' (as
	// "\012") and nothing else, so the column is kept as printed.
	Path string
	// VmFlags are the two-letter mnemonics of smaps' "VmFlags:" line.
	VmFlags []string
	// Rss and AnonHugePages are in bytes.
	Rss, AnonHugePages uint64
}

const deletedSuffix = " (deleted)"

// Len is the size of the mapping in bytes.
func (m Mapping) Len() uint64 { return m.End - m.Start }

// HasFlag reports whether VmFlags contains f (e.g. "wr", "dd", "hg").
func (m Mapping) HasFlag(f string) bool { return slices.Contains(m.VmFlags, f) }

// IsAnon reports private anonymous memory with no backing file: unnamed,
// [heap], [stack] or named with PR_SET_VMA_ANON_NAME ("[anon:NAME]").
// Shared anonymous memory is shmem and reported by IsSharedAnon instead.
func (m Mapping) IsAnon() bool {
	switch {
	case m.Path == "", m.Path == "[heap]", m.Path == "[stack]":
		return true
	case strings.HasPrefix(m.Path, "[anon:"), strings.HasPrefix(m.Path, "[stack:"):
		return true
	}
	return false
}

// IsSharedAnon reports MAP_SHARED|MAP_ANONYMOUS memory. The kernel backs it
// with an unlinked shmem file it names "dev/zero", or "[anon_shmem:NAME]"
// once named (mm/shmem.c shmem_zero_setup).
func (m Mapping) IsSharedAnon() bool {
	return m.Path == "/dev/zero (deleted)" || strings.HasPrefix(m.Path, "[anon_shmem:")
}

// IsSpecial reports the kernel-provided mappings that cannot be dumped as
// memory: [vdso], [vvar], [vvar_vclock], [vsyscall], [uprobes].
func (m Mapping) IsSpecial() bool {
	switch m.Path {
	case "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]":
		return true
	}
	return false
}

// IsMemfd reports a mapping of a memfd_create(2) file.
func (m Mapping) IsMemfd() bool { return strings.HasPrefix(m.Path, "/memfd:") }

// IsSysV reports a System V shared memory segment.
func (m Mapping) IsSysV() bool { return strings.HasPrefix(m.Path, "/SYSV") }

// IsFile reports a mapping of a real file reachable by path (possibly
// unlinked, see Deleted): not anonymous, shmem, memfd or SysV.
func (m Mapping) IsFile() bool {
	return m.Inode != 0 && strings.HasPrefix(m.Path, "/") &&
		!m.IsMemfd() && !m.IsSysV() && !m.IsSharedAnon()
}

// Deleted reports that the backing file was unlinked (memfd, SysV and shared
// anonymous memory always are).
func (m Mapping) Deleted() bool { return strings.HasSuffix(m.Path, deletedSuffix) }

// FilePath is Path without the " (deleted)" suffix.
func (m Mapping) FilePath() string { return strings.TrimSuffix(m.Path, deletedSuffix) }

// Maps reads /proc/PID/smaps.
func Maps(pid int) ([]Mapping, error) {
	path := procPath(pid, "smaps")
	b, err := readFile(path)
	if err != nil {
		return nil, err
	}
	return ParseSmaps(b)
}

// ParseSmaps parses the contents of /proc/PID/smaps. Lines of plain
// /proc/PID/maps are accepted too (the fields from smaps stay zero).
func ParseSmaps(b []byte) ([]Mapping, error) {
	var out []Mapping
	sc := bufio.NewScanner(bytes.NewReader(b))
	// A header line holds a path of up to PATH_MAX bytes, escaped.
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		key, rest, isKey := smapsKey(line)
		if !isKey {
			m, err := ParseMapsLine(line)
			if err != nil {
				return nil, err
			}
			out = append(out, m)
			continue
		}
		if len(out) == 0 {
			return nil, parseErr("smaps line before the first mapping", line)
		}
		if err := applySmapsField(&out[len(out)-1], key, rest, line); err != nil {
			return nil, err
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("scan smaps: %w: %w", ErrParse, err)
	}
	return out, nil
}

// smapsKey splits "Key:   value" lines. A mapping header never has a colon
// at the end of its first token (the range is "start-end"), a field line
// always does.
func smapsKey(line string) (key, rest string, ok bool) {
	i := strings.IndexAny(line, " \t")
	if i < 0 {
		i = len(line)
	}
	tok := line[:i]
	if !strings.HasSuffix(tok, ":") {
		return "", "", false
	}
	return strings.TrimSuffix(tok, ":"), line[i:], true
}

func applySmapsField(m *Mapping, key, rest, line string) error {
	switch key {
	case "VmFlags":
		m.VmFlags = strings.Fields(rest)
	case "Rss", "AnonHugePages":
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return parseErr("smaps "+key, line)
		}
		kb, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil || kb > (1<<54) {
			return parseErr("smaps "+key, line)
		}
		if key == "Rss" {
			m.Rss = kb << 10
		} else {
			m.AnonHugePages = kb << 10
		}
	}
	return nil
}

// ParseMapsLine parses one header line of /proc/PID/maps or smaps:
//
//	start-end perms offset major:minor inode [padding path]
//
// The path is everything after the inode and the padding spaces, kept
// verbatim (it may contain spaces and end in " (deleted)").
func ParseMapsLine(line string) (Mapping, error) {
	var m Mapping
	bad := func() (Mapping, error) { return Mapping{}, parseErr("maps line", line) }

	rng, rest, ok1 := strings.Cut(line, " ")
	perms, rest, ok2 := strings.Cut(rest, " ")
	off, rest, ok3 := strings.Cut(rest, " ")
	dev, rest, ok4 := strings.Cut(rest, " ")
	if !ok1 || !ok2 || !ok3 || !ok4 {
		return bad()
	}
	ino, path, _ := strings.Cut(rest, " ")
	m.Path = strings.TrimLeft(path, " ")

	s, e, ok := strings.Cut(rng, "-")
	if !ok {
		return bad()
	}
	var err error
	if m.Start, err = strconv.ParseUint(s, 16, 64); err != nil {
		return bad()
	}
	if m.End, err = strconv.ParseUint(e, 16, 64); err != nil || m.End <= m.Start {
		return bad()
	}
	if len(perms) != 4 {
		return bad()
	}
	for i, want := range [...][2]byte{{'r', '-'}, {'w', '-'}, {'x', '-'}, {'s', 'p'}} {
		if perms[i] != want[0] && perms[i] != want[1] {
			return bad()
		}
	}
	m.Read, m.Write, m.Exec, m.Shared = perms[0] == 'r', perms[1] == 'w', perms[2] == 'x', perms[3] == 's'
	if m.Offset, err = strconv.ParseUint(off, 16, 64); err != nil {
		return bad()
	}
	maj, min, ok := strings.Cut(dev, ":")
	if !ok {
		return bad()
	}
	v, err := strconv.ParseUint(maj, 16, 32)
	if err != nil {
		return bad()
	}
	m.Major = uint32(v)
	if v, err = strconv.ParseUint(min, 16, 32); err != nil {
		return bad()
	}
	m.Minor = uint32(v)
	if m.Inode, err = strconv.ParseUint(ino, 10, 64); err != nil {
		return bad()
	}
	return m, nil
}
