package procfs

import (
	"errors"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Fd is one open file descriptor of a process.
type Fd struct {
	Num int
	// Target is the readlink of /proc/PID/fd/N: "/path", "/path (deleted)",
	// "pipe:[123]", "socket:[456]", "anon_inode:[eventfd]", "/dev/null", …
	Target string

	// From /proc/PID/fdinfo/N.
	Pos   int64
	Flags uint32 // open flags, O_CLOEXEC included when close-on-exec is set
	MntID int
	Ino   uint64
	// Info holds every other fdinfo line, raw, keyed by the text before the
	// first ':' and trimmed of surrounding white space (e.g. "eventfd-count",
	// "clockid", "sigmask", "lock"). Keys that repeat (epoll's "tfd",
	// inotify's "inotify", fanotify's "fanotify", "lock") have their values
	// joined with '\n' in file order.
	Info map[string]string

	// From stat(2) of /proc/PID/fd/N, which follows the link to the open
	// file itself (also for pipes, sockets and anonymous inodes).
	Mode      uint32
	Dev, Rdev uint64
	Size      int64
}

// FdKind classifies an Fd by what it refers to.
type FdKind int

// The kinds of Fd. Values are for use within one process only.
const (
	FdOther FdKind = iota
	FdFile
	FdDir
	FdCharDev
	FdBlockDev
	FdPipe // anonymous pipe, "pipe:[ino]"
	FdFIFO // named pipe: S_IFIFO opened by path
	FdSocket
	FdAnonInode // eventfd, epoll, timerfd, signalfd, inotify, pidfd, userfaultfd, …
)

func (k FdKind) String() string {
	switch k {
	case FdFile:
		return "file"
	case FdDir:
		return "dir"
	case FdCharDev:
		return "chardev"
	case FdBlockDev:
		return "blockdev"
	case FdPipe:
		return "pipe"
	case FdFIFO:
		return "fifo"
	case FdSocket:
		return "socket"
	case FdAnonInode:
		return "anon_inode"
	}
	return "other"
}

// Kind classifies f by its link target first (pipes, sockets and anonymous
// inodes have no path), then by the file type in Mode.
func (f Fd) Kind() FdKind {
	switch {
	case strings.HasPrefix(f.Target, "pipe:["):
		return FdPipe
	case strings.HasPrefix(f.Target, "socket:["):
		return FdSocket
	case strings.HasPrefix(f.Target, "anon_inode:"):
		return FdAnonInode
	}
	switch f.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		return FdFile
	case unix.S_IFDIR:
		return FdDir
	case unix.S_IFCHR:
		return FdCharDev
	case unix.S_IFBLK:
		return FdBlockDev
	case unix.S_IFIFO:
		return FdFIFO
	case unix.S_IFSOCK:
		return FdSocket
	}
	return FdOther
}

// IsMemfd reports a memfd_create(2) file ("/memfd:NAME (deleted)"), whose
// contents exist nowhere else and must be dumped.
func (f Fd) IsMemfd() bool {
	return strings.HasPrefix(f.Target, "/memfd:") && f.Mode&unix.S_IFMT == unix.S_IFREG
}

// Deleted reports that the open file was unlinked (Target ends in
// " (deleted)").
func (f Fd) Deleted() bool { return strings.HasSuffix(f.Target, deletedSuffix) }

// Fds lists the open file descriptors of pid in ascending order. A
// descriptor closed while the list is read (only possible when the process
// is not stopped) is left out.
func Fds(pid int) ([]Fd, error) {
	dir := procPath(pid, "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, wrap("list "+dir, err)
	}
	out := make([]Fd, 0, len(ents))
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil || n < 0 {
			return nil, parseErr(dir+" entry", e.Name())
		}
		fd, err := readFd(pid, n)
		if errors.Is(err, ErrNotFound) {
			if _, serr := os.Stat(procPath(pid)); serr != nil {
				return nil, wrap("stat "+procPath(pid), serr)
			}
			continue // this one descriptor was closed meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, fd)
	}
	slices.SortFunc(out, func(a, b Fd) int { return a.Num - b.Num })
	return out, nil
}

// ReadFd reads one descriptor of pid.
func ReadFd(pid, fd int) (Fd, error) { return readFd(pid, fd) }

func readFd(pid, n int) (Fd, error) {
	name := strconv.Itoa(n)
	link := procPath(pid, "fd", name)
	target, err := readLink(link)
	if err != nil {
		return Fd{}, err
	}
	info, err := readFile(procPath(pid, "fdinfo", name))
	if err != nil {
		return Fd{}, err
	}
	fd, err := ParseFdinfo(string(info))
	if err != nil {
		return Fd{}, err
	}
	fd.Num, fd.Target = n, target
	var st unix.Stat_t
	if err := unix.Stat(link, &st); err != nil {
		return Fd{}, wrap("stat "+link, err)
	}
	fd.Mode, fd.Dev, fd.Rdev, fd.Size = st.Mode, st.Dev, st.Rdev, st.Size
	return fd, nil
}

// ParseFdinfo parses the contents of /proc/PID/fdinfo/N into an Fd with
// Pos, Flags, MntID, Ino and Info set. "pos" and "flags" are required.
func ParseFdinfo(s string) (Fd, error) {
	var fd Fd
	var havePos, haveFlags bool
	for line := range strings.Lines(s) {
		line = strings.TrimSuffix(line, "\n")
		if strings.TrimSpace(line) == "" {
			continue
		}
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			return Fd{}, parseErr("fdinfo line", line)
		}
		key, val = strings.TrimSpace(key), strings.TrimSpace(val)
		var err error
		switch key {
		case "pos":
			fd.Pos, err = strconv.ParseInt(val, 10, 64)
			havePos = true
		case "flags":
			var v uint64
			v, err = strconv.ParseUint(val, 8, 32)
			fd.Flags = uint32(v)
			haveFlags = true
		case "mnt_id":
			fd.MntID, err = strconv.Atoi(val)
		case "ino":
			fd.Ino, err = strconv.ParseUint(val, 10, 64)
		default:
			if fd.Info == nil {
				fd.Info = make(map[string]string)
			}
			if prev, ok := fd.Info[key]; ok {
				val = prev + "\n" + val
			}
			fd.Info[key] = val
		}
		if err != nil {
			return Fd{}, parseErr("fdinfo "+key, line)
		}
	}
	if !havePos || !haveFlags {
		return Fd{}, parseErr("fdinfo (missing pos or flags)", s)
	}
	return fd, nil
}
