package image

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func sample() *Image {
	return &Image{
		Version: FormatVersion, Mode: ModeLive, SnapshotID: "x", Arch: "x86_64",
		Endpoint: "unix:/tmp/s", Token: bytes.Repeat([]byte{7}, 32), XSaveSize: 4,
		Processes: []Process{{
			ID: 1, Pid: 42,
			Threads: []Thread{{Tid: 42, XState: []byte{1, 2, 3, 4}}},
			Vmas: []Vma{
				{Start: 0x1000, End: 0x5000, Kind: VmaAnon, Prot: 3, Runs: []Run{{Addr: 0x1000, NPages: 2, Where: OnServer}}},
				{Start: 0x5000, End: 0x7000, Kind: VmaFile, Path: "/bin/x", Prot: 1, Runs: []Run{{Addr: 0x6000, NPages: 1, Where: InPages, Off: 4096}}},
			},
			Fds: []Fd{{Num: 0, Kind: FdStdio}, {Num: 3, Kind: FdFile, Path: "/etc/hosts"}},
		}},
	}
}

func TestRoundTrip(t *testing.T) {
	dir := t.TempDir()
	if err := Write(dir, sample()); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, PagesFile), make([]byte, 8192), 0o600)
	img, err := Read(dir)
	if err != nil {
		t.Fatal(err)
	}
	if img.Processes[0].Vmas[1].Path != "/bin/x" || !bytes.Equal(img.Token, sample().Token) {
		t.Fatalf("round trip lost data: %+v", img.Processes[0].Vmas[1])
	}
}

func TestCorrupt(t *testing.T) {
	dir := t.TempDir()
	if err := Write(dir, sample()); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(filepath.Join(dir, MetaFile))
	cases := []struct {
		name string
		mut  func([]byte) []byte
	}{
		{"empty", func(b []byte) []byte { return nil }},
		{"magic", func(b []byte) []byte { b[0] ^= 1; return b }},
		{"version", func(b []byte) []byte { b[8] = 9; return b }},
		{"huge length", func(b []byte) []byte { b[19] = 0x7f; return b }},
		{"truncated 1", func(b []byte) []byte { return b[:len(b)-1] }},
		{"truncated header", func(b []byte) []byte { return b[:12] }},
		{"flipped metadata byte", func(b []byte) []byte { b[40] ^= 0x20; return b }},
		{"flipped crc", func(b []byte) []byte { b[len(b)-1] ^= 1; return b }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Decode(bytes.NewReader(c.mut(append([]byte(nil), good...))))
			if !errors.Is(err, ErrBadImage) {
				t.Fatalf("decode: %v, want ErrBadImage", err)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	cases := []struct {
		name     string
		mut      func(*Image)
		pagesLen int64
		ok       bool
	}{
		{"valid", func(*Image) {}, 8192, true},
		{"pages file too short", func(*Image) {}, 4096, false},
		{"no token", func(i *Image) { i.Token = nil }, 8192, false},
		{"bad mode", func(i *Image) { i.Mode = "x" }, 8192, false},
		{"unaligned vma", func(i *Image) { i.Processes[0].Vmas[0].Start = 0x1001 }, 8192, false},
		{"overlapping vmas", func(i *Image) { i.Processes[0].Vmas[1].Start = 0x4000 }, 8192, false},
		{"run outside vma", func(i *Image) { i.Processes[0].Vmas[0].Runs[0].NPages = 5 }, 8192, false},
		{"run overflow", func(i *Image) { i.Processes[0].Vmas[1].Runs[0].Off = ^uint64(0) &^ 4095 }, 8192, false},
		{"kernel address", func(i *Image) { i.Processes[0].Vmas[1].End = 1 << 63 }, 8192, false},
		{"relative path", func(i *Image) { i.Processes[0].Vmas[1].Path = "bin/x" }, 8192, false},
		{"lazy file pages", func(i *Image) { i.Processes[0].Vmas[1].Runs[0].Where = OnServer }, 8192, false},
		{"lazy in full image", func(i *Image) { i.Mode = ModeFull }, 8192, false},
		{"leader mismatch", func(i *Image) { i.Processes[0].Threads[0].Tid = 43 }, 8192, false},
		{"xstate size", func(i *Image) { i.Processes[0].Threads[0].XState = nil }, 8192, false},
		{"duplicate fd", func(i *Image) { i.Processes[0].Fds[1].Num = 0 }, 8192, false},
		{"bad signal", func(i *Image) { i.Processes[0].Sigacts = []Sigaction{{Signo: 65}} }, 8192, false},
		{"no processes", func(i *Image) { i.Processes = nil }, 8192, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img := sample()
			c.mut(img)
			err := img.Validate(c.pagesLen)
			if c.ok != (err == nil) {
				t.Fatalf("validate: %v, want ok=%v", err, c.ok)
			}
			if err != nil && !errors.Is(err, ErrBadImage) {
				t.Fatalf("error %v is not ErrBadImage", err)
			}
		})
	}
}
