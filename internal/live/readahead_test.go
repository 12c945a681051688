package live

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"
)

// TestReadaheadReleaseUnlocked checks that every path that drops chunks
// (take, view, stop) releases them after unlocking ra.mu: a release may
// write to the page server's socket, and faults must not wait behind it.
func TestReadaheadReleaseUnlocked(t *testing.T) {
	const size = 4096
	ra := &readahead{finished: make(chan struct{}), started: true}
	ra.cond = sync.NewCond(&ra.mu)
	released := map[uint64]int{}
	for i := range uint64(4) {
		addr := i * size
		data := bytes.Repeat([]byte{byte(i + 1)}, size)
		ra.chunks = append(ra.chunks, &chunk{addr: addr, data: data, release: func() {
			// Releases run on the test's goroutine: a held ra.mu
			// would make TryLock fail.
			if !ra.mu.TryLock() {
				t.Errorf("chunk %#x released with ra.mu held", addr)
			} else {
				ra.mu.Unlock()
			}
			released[addr]++
		}})
		ra.buffered += size
		ra.head = addr + size
	}

	// take at chunk 1 drops chunk 0 and copies chunk 1.
	buf := make([]byte, size)
	if !ra.take(size, buf) || !bytes.Equal(buf, bytes.Repeat([]byte{2}, size)) {
		t.Fatal("take of chunk 1 failed or copied the wrong bytes")
	}
	if released[0] != 1 {
		t.Fatalf("chunk 0 released %d times after take above it, want 1", released[0])
	}

	// view at chunk 2 drops chunk 1; while fn runs, chunk 2 is pinned, so
	// dropping it (stop) defers its release to view's end.
	var inside []byte
	ok, err := ra.view(2*size, size, func(b []byte) error {
		inside = append(inside, b...)
		ra.mu.Lock()
		free := ra.dropBelowLocked(nil, 3*size) // drops chunk 2, pinned
		ra.mu.Unlock()
		if len(free) != 0 {
			t.Errorf("a pinned chunk was handed out for release")
		}
		return nil
	})
	if !ok || err != nil || !bytes.Equal(inside, bytes.Repeat([]byte{3}, size)) {
		t.Fatalf("view of chunk 2: %v %v, %d bytes", ok, err, len(inside))
	}
	if released[size] != 1 || released[2*size] != 1 {
		t.Fatalf("after view: chunk 1 released %d times, chunk 2 %d times, want 1 and 1", released[size], released[2*size])
	}

	// stop releases what is left; it was never started, so it does not
	// wait for the stream.
	ra.started = false
	_, cancel := context.WithCancel(context.Background())
	ra.stop(cancel)
	if released[3*size] != 1 || len(released) != 4 {
		t.Fatalf("after stop: releases %v, want each of 4 chunks once", released)
	}
}

// A fault that waits for the stream must first release the chunks it
// dropped: their ring slots are what the stream needs to send more. With
// two slots, a take two chunks ahead deadlocked (the CLI's lazy restores
// hung with every clone thread in handle_userfault).
func TestReadaheadWaitReleasesFirst(t *testing.T) {
	const size = 4096
	ra := &readahead{finished: make(chan struct{}), started: true}
	ra.cond = sync.NewCond(&ra.mu)
	slots := make(chan struct{}, 2) // a ring of two slots, both in use
	rel := func() { slots <- struct{}{} }
	for i := range uint64(2) {
		ra.chunks = append(ra.chunks, &chunk{addr: i * size, data: bytes.Repeat([]byte{byte(i + 1)}, size), release: rel})
		ra.buffered += size
		ra.head = (i + 1) * size
	}
	go func() { // the stream: a chunk per freed slot
		for i := uint64(2); i < 4; i++ {
			<-slots
			if err := ra.add(i*size, bytes.Repeat([]byte{byte(i + 1)}, size), rel); err != nil {
				t.Errorf("add chunk %d: %v", i, err)
			}
		}
	}()
	done := make(chan bool, 1)
	buf := make([]byte, size)
	go func() { done <- ra.take(3*size, buf) }()
	select {
	case ok := <-done:
		if !ok || !bytes.Equal(buf, bytes.Repeat([]byte{4}, size)) {
			t.Fatalf("take of chunk 3: %v", ok)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("take waited for the stream while holding the chunks it dropped")
	}
}
