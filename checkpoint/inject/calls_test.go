package inject

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSyscalls runs a table of calls in the target in one resume (and, with
// syscall stops, one by one): every return value comes back, an errno is a
// value, writes reach our pipe in order, and the target is left as found.
func TestSyscalls(t *testing.T) {
	for _, stops := range []bool{false, true} {
		t.Run(fmt.Sprintf("SyscallStops=%v", stops), func(t *testing.T) {
			needTarget(t)
			checkFdLeak(t)
			tg := startTarget(t, "cmd", nil)
			before := takeSnapshot(t, tg.pid)
			p := seizeT(t, tg.pid, Options{SyscallStops: stops})
			scratch, err := p.Scratch()
			if err != nil {
				t.Fatal(err)
			}
			pr, pw, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer pr.Close()
			fds, err := p.InstallFds([]*os.File{pw})
			pw.Close()
			if err != nil {
				t.Fatal(err)
			}
			// Message i is at scratch+i*16; the table after them.
			const n = 200
			var want bytes.Buffer
			calls := []Call{{Nr: unix.SYS_GETPID}}
			for i := 0; i < n; i++ {
				msg := fmt.Sprintf("m%014d", i)
				if err := p.WriteMem(scratch+uint64(i*16), []byte(msg)); err != nil {
					t.Fatal(err)
				}
				want.WriteString(msg)
				calls = append(calls, Call{Nr: unix.SYS_WRITE, Args: [6]uintptr{uintptr(fds[0]), uintptr(scratch) + uintptr(i*16), 15}})
			}
			calls = append(calls, Call{Nr: unix.SYS_CLOSE, Args: [6]uintptr{^uintptr(0)}}, Call{Nr: unix.SYS_CLOSE, Args: [6]uintptr{uintptr(fds[0])}})
			table := scratch + 64<<10
			if CallTableSize(len(calls)) > ScratchUserSize-64<<10 {
				t.Fatal("table does not fit")
			}
			rets, err := p.Syscalls(0, table, calls)
			if err != nil {
				t.Fatal(err)
			}
			if int(rets[0]) != tg.pid {
				t.Errorf("getpid = %d, want %d", rets[0], tg.pid)
			}
			for i := 1; i <= n; i++ {
				if rets[i] != 15 {
					t.Fatalf("write %d returned %d", i-1, int64(rets[i]))
				}
			}
			if e := int64(rets[n+1]); e != -int64(unix.EBADF) {
				t.Errorf("close(-1) = %d, want -EBADF", e)
			}
			if rets[n+2] != 0 {
				t.Errorf("close of the pipe = %d", int64(rets[n+2]))
			}
			if _, err := p.Syscalls(0, table, []Call{{Nr: unix.SYS_CLONE3}}); err == nil {
				t.Error("a clone call was accepted")
			}
			if err := p.Detach(); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(pr) // the target's copy is closed: EOF
			if err != nil || !bytes.Equal(got, want.Bytes()) {
				t.Fatalf("pipe got %d bytes (%v), want %d in order", len(got), err, want.Len())
			}
			before.unchanged(t, tg.pid)
		})
	}
}
