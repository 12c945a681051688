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

// BenchmarkCopyFresh is BenchmarkCopy into a region never used before, as a
// restore's fill sees it, from a source in a shared memfd mapping (a bulk
// stream's ring) or private memory.
func BenchmarkCopyFresh(b *testing.B) {
	requireRoot(b)
	const chunk = 2 << 20
	for _, shared := range []bool{false, true} {
		name := "src=private"
		if shared {
			name = "src=memfd"
		}
		b.Run(name, func(b *testing.B) {
			region := b.N * chunk
			mem := mmapAnon(b, region/PageSize)
			base := addrOf(mem)
			u := openAPI(b, 0, 0)
			if _, err := u.Register(base, uint64(region), ModeMissing); err != nil {
				b.Fatalf("Register: %v", err)
			}
			src := pattern(chunk, 1)
			if shared {
				fd, err := unix.MemfdCreate("bench", unix.MFD_CLOEXEC)
				if err != nil {
					b.Fatal(err)
				}
				defer unix.Close(fd)
				if err := unix.Ftruncate(fd, chunk); err != nil {
					b.Fatal(err)
				}
				m, err := unix.Mmap(fd, 0, chunk, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
				if err != nil {
					b.Fatal(err)
				}
				defer unix.Munmap(m)
				copy(m, src)
				src = m
			}
			b.SetBytes(chunk)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				off := uint64(i) * chunk
				if n, err := u.Copy(base+off, src, 0); n != chunk || err != nil {
					b.Fatalf("Copy at %#x = %d, %v", off, n, err)
				}
			}
		})
	}
}
