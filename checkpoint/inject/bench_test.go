package inject

import (
	"fmt"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkSyscall measures one injected getpid through the exported API
// (channel to the tracer thread, SETREGS, step, waitpid, GETREGS).
func BenchmarkSyscall(b *testing.B) {
	for _, m := range []struct {
		name string
		opts Options
	}{{"singlestep", Options{}}, {"syscallstops", Options{SyscallStops: true}}} {
		b.Run(m.name, func(b *testing.B) {
			needTarget(b)
			tg := startTarget(b, "cmd", nil)
			p, err := Seize(tg.pid, m.opts)
			if err != nil {
				b.Fatal(err)
			}
			defer p.Detach()
			for b.Loop() {
				if got, err := p.Syscall(0, unix.SYS_GETPID); err != nil || int(got) != tg.pid {
					b.Fatalf("getpid: %d, %v", got, err)
				}
			}
		})
	}
}

// BenchmarkSyscallBatch measures one injected getpid inside Process.Batch:
// the cost of the injection itself, without the hand-off to the tracer
// thread.
func BenchmarkSyscallBatch(b *testing.B) {
	needTarget(b)
	tg := startTarget(b, "cmd", nil)
	p, err := Seize(tg.pid, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Detach()
	err = p.Batch(func(bt *Batch) error {
		for b.Loop() {
			if got, err := bt.Syscall(0, unix.SYS_GETPID); err != nil || int(got) != tg.pid {
				return fmt.Errorf("getpid: %d, %v", got, err)
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}
