package uffd

import (
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkCopy measures UFFDIO_COPY throughput: 1 MiB per operation into a
// 256 MiB MISSING-registered region, discarded (outside the timer) each
// time it is full. The MB/s column is the result.
func BenchmarkCopy(b *testing.B) {
	requireRoot(b)
	const (
		chunk  = 1 << 20
		region = 256 << 20
	)
	mem := mmapAnon(b, region/PageSize)
	base := addrOf(mem)
	u := openAPI(b, 0, 0)
	if _, err := u.Register(base, region, ModeMissing); err != nil {
		b.Fatalf("Register: %v", err)
	}
	src := pattern(chunk, 1)
	b.SetBytes(chunk)
	b.ResetTimer()
	off := uint64(0)
	for i := 0; i < b.N; i++ {
		if off == region {
			b.StopTimer()
			if err := unix.Madvise(mem, unix.MADV_DONTNEED); err != nil {
				b.Fatalf("madvise: %v", err)
			}
			off = 0
			b.StartTimer()
		}
		if n, err := u.Copy(base+off, src, 0); n != chunk || err != nil {
			b.Fatalf("Copy at %#x = %d, %v", off, n, err)
		}
		off += chunk
	}
}
