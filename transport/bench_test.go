package transport

import (
	"bytes"
	"context"
	"syscall"
	"testing"
	"time"
)

// cpuTime returns the process's user plus system CPU time.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU adds the CPU time (both ends, all threads) spent per GiB moved:
// unlike MB/s it does not depend on what else the machine runs. On two cores,
// 2 GiB/s needs at most 1 s of CPU per GiB, perfectly spread.
func reportCPU(b *testing.B, start time.Duration, bytes int64) {
	used := cpuTime(b) - start
	b.ReportMetric(float64(used.Milliseconds())/(float64(bytes)*float64(b.N)/(1<<30)), "cpu-ms/GiB")
}

const benchSize = 256 << 20

// benchSetup serves a 256 MiB in-memory process on a unix socket.
func benchSetup(b *testing.B) (*memSource, *Client) {
	src := newMemSource(map[uint32]int{1: benchSize})
	ts := startServer(b, src, unixAddr(b), nil)
	return src, ts.dial(b, "bench", nil)
}

// BenchmarkStream measures the background fill: the whole process streamed
// over a unix socket, the callback only looking at the data.
func BenchmarkStream(b *testing.B) {
	src, c := benchSetup(b)
	ranges := []Range{{testBase, benchSize}}
	ctx := context.Background()

	// Check the content once, outside the timed loop.
	got := make([]byte, benchSize)
	if err := c.Stream(ctx, 1, ranges, 0, collect(b, ranges, got, DefaultChunkSize)); err != nil {
		b.Fatal(err)
	}
	if !bytes.Equal(got, src.procs[1]) {
		b.Fatal("streamed content differs from the source")
	}
	got = nil

	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, bc := range []struct {
		name  string
		ctx   context.Context
		chunk int
		rpc   bool
	}{
		{"bulk,chunk=256KiB", ctx, 256 << 10, false},
		{"bulk,chunk=2048KiB", ctx, 2 << 20, false},
		{"bulk,chunk=2048KiB,cancellable", cctx, 2 << 20, false},
		{"rpc,chunk=256KiB", ctx, 256 << 10, true},
		{"rpc,chunk=1024KiB", ctx, 1 << 20, true},
		{"rpc,chunk=2048KiB", ctx, 2 << 20, true},
		// A cancellable context makes each receive go through a helper
		// goroutine (window.recv).
		{"rpc,chunk=1024KiB,cancellable", cctx, 1 << 20, true},
	} {
		chunk, ctx := bc.chunk, bc.ctx
		b.Run(bc.name, func(b *testing.B) {
			c.noBulk = bc.rpc
			b.SetBytes(benchSize)
			var sum byte
			start := cpuTime(b)
			for b.Loop() {
				err := c.Stream(ctx, 1, ranges, chunk, func(_ uint64, d []byte) error {
					sum += d[len(d)-1]
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
			}
			reportCPU(b, start, benchSize)
			_ = sum
		})
	}
}

// BenchmarkGetPages measures on-demand reads: the whole process in one
// GetPages (split into ClientRequestBytes requests, ClientRequestsInFlight in
// flight), and single pages for latency.
func BenchmarkGetPages(b *testing.B) {
	src, c := benchSetup(b)
	ctx := context.Background()

	b.Run("256MiB", func(b *testing.B) {
		buf := make([]byte, benchSize)
		ranges := []Range{{testBase, benchSize}}
		b.SetBytes(benchSize)
		start := cpuTime(b)
		for b.Loop() {
			if err := c.GetPages(ctx, 1, ranges, buf); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		reportCPU(b, start, benchSize)
		if !bytes.Equal(buf, src.procs[1]) {
			b.Fatal("content differs from the source")
		}
	})
	b.Run("4KiB", func(b *testing.B) {
		buf := make([]byte, pageSz)
		b.SetBytes(pageSz)
		i := uint64(0)
		for b.Loop() {
			addr := testBase + (i*pageSz*17)%benchSize
			i++
			if err := c.GetPages(ctx, 1, []Range{{addr, pageSz}}, buf); err != nil {
				b.Fatal(err)
			}
		}
	})
	// Single pages while a background Stream runs on the same client: the
	// fault latency a restored process sees during the fill.
	b.Run("4KiB-during-stream", func(b *testing.B) {
		sctx, stop := context.WithCancel(ctx)
		streamed := make(chan error, 1)
		go func() {
			for {
				err := c.Stream(sctx, 1, []Range{{testBase, benchSize}}, 0, func(uint64, []byte) error { return nil })
				if err != nil {
					streamed <- err
					return
				}
			}
		}()
		buf := make([]byte, pageSz)
		i := uint64(0)
		for b.Loop() {
			addr := testBase + (i*pageSz*17)%benchSize
			i++
			if err := c.GetPages(ctx, 1, []Range{{addr, pageSz}}, buf); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		stop()
		<-streamed
	})
}
