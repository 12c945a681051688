package procfs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// selfFd reads one of our own descriptors through Fds (not ReadFd), so the
// listing path is what gets tested.
func selfFd(t *testing.T, fds []Fd, n int) Fd {
	t.Helper()
	for _, fd := range fds {
		if fd.Num == n {
			return fd
		}
	}
	t.Fatalf("fd %d not listed", n)
	return Fd{}
}

func TestFdsSelf(t *testing.T) {
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}

	// A regular file opened O_APPEND, positioned at 123.
	path := filepath.Join(dir, "data file")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(bytes.Repeat([]byte{'x'}, 200)); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Seek(123, 0); err != nil {
		t.Fatal(err)
	}
	var fst unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &fst); err != nil {
		t.Fatal(err)
	}

	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()

	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// O_RDWR opens a FIFO without waiting for a peer on Linux.
	ff, err := os.OpenFile(fifo, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ff.Close()

	efd, err := unix.Eventfd(5, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)

	null, err := os.OpenFile("/dev/null", os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()

	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()

	sock, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sock)

	fds, err := Fds(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < len(fds); i++ {
		if fds[i-1].Num >= fds[i].Num {
			t.Fatalf("fds not ascending: %d then %d", fds[i-1].Num, fds[i].Num)
		}
	}

	fd := selfFd(t, fds, int(f.Fd()))
	if fd.Kind() != FdFile || fd.IsMemfd() || fd.Deleted() || fd.Target != path || fd.Pos != 123 || fd.Size != 200 ||
		fd.Ino != fst.Ino || fd.Dev != fst.Dev || fd.MntID <= 0 || fd.Mode != fst.Mode {
		t.Errorf("file fd: %+v (stat ino %d dev %d)", fd, fst.Ino, fst.Dev)
	}
	if fd.Flags&unix.O_APPEND == 0 || fd.Flags&unix.O_ACCMODE != unix.O_RDWR || fd.Flags&unix.O_CLOEXEC == 0 {
		t.Errorf("file flags %#o lack O_APPEND|O_RDWR|O_CLOEXEC", fd.Flags)
	}

	r, w := selfFd(t, fds, int(pr.Fd())), selfFd(t, fds, int(pw.Fd()))
	if r.Kind() != FdPipe || w.Kind() != FdPipe || r.Ino != w.Ino || r.Target != fmt.Sprintf("pipe:[%d]", r.Ino) ||
		r.Flags&unix.O_ACCMODE != unix.O_RDONLY || w.Flags&unix.O_ACCMODE != unix.O_WRONLY || r.Mode&unix.S_IFMT != unix.S_IFIFO {
		t.Errorf("pipe fds: %+v / %+v", r, w)
	}

	if fd := selfFd(t, fds, int(ff.Fd())); fd.Kind() != FdFIFO || fd.Target != fifo {
		t.Errorf("fifo fd: %+v", fd)
	}

	fd = selfFd(t, fds, efd)
	count, err := strconv.ParseUint(fd.Info["eventfd-count"], 16, 64)
	if fd.Kind() != FdAnonInode || fd.Target != "anon_inode:[eventfd]" || err != nil || count != 5 {
		t.Errorf("eventfd: %+v (count %d, %v)", fd, count, err)
	}

	fd = selfFd(t, fds, int(null.Fd()))
	if fd.Kind() != FdCharDev || fd.Target != "/dev/null" || fd.Rdev != unix.Mkdev(1, 3) || fd.Flags&unix.O_ACCMODE != unix.O_WRONLY {
		t.Errorf("/dev/null fd: %+v", fd)
	}

	if fd := selfFd(t, fds, int(d.Fd())); fd.Kind() != FdDir || fd.Target != dir {
		t.Errorf("dir fd: %+v", fd)
	}

	fd = selfFd(t, fds, sock)
	if fd.Kind() != FdSocket || fd.Target != fmt.Sprintf("socket:[%d]", fd.Ino) || fd.Mode&unix.S_IFMT != unix.S_IFSOCK {
		t.Errorf("socket fd: %+v", fd)
	}

	mfd, err := unix.MemfdCreate("cowmig fd", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(mfd)
	if err := unix.Ftruncate(mfd, 4096); err != nil {
		t.Fatal(err)
	}
	if fd, err := ReadFd(os.Getpid(), mfd); err != nil || fd.Kind() != FdFile || !fd.IsMemfd() || !fd.Deleted() ||
		fd.Target != "/memfd:cowmig fd (deleted)" || fd.Size != 4096 {
		t.Errorf("memfd: %+v, %v", fd, err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if fd, err := ReadFd(os.Getpid(), int(f.Fd())); err != nil || !fd.Deleted() || fd.Target != path+" (deleted)" || fd.Kind() != FdFile {
		t.Errorf("unlinked file: %+v, %v", fd, err)
	}

	// A descriptor that is not open is ErrNotFound.
	unused := fds[len(fds)-1].Num + 1000
	if _, err := ReadFd(os.Getpid(), unused); !errors.Is(err, ErrNotFound) {
		t.Errorf("ReadFd(unused fd %d) err = %v, want ErrNotFound", unused, err)
	}
}
