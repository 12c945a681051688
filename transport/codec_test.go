package transport

import (
	"bytes"
	"os"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	pagesvc "github.com/cowmig/cowmig/transport/pagesvc/v1"
)

// TestCodecMatchesGenerated checks that the in-place encodings produce the
// generated code's bytes and decode what the generated code produces.
func TestCodecMatchesGenerated(t *testing.T) {
	for _, size := range []int{1, 127, 128, pageSz, 1 << 20, MaxChunkSize} {
		data := pattern(3, size+8)[:size]
		for _, addr := range []uint64{0, 1, testBase, ^uint64(0)} {
			buf := make([]byte, headroom+size)
			copy(buf[headroom:], data)
			out := newChunkOut()
			out.setChunk(addr, buf)
			got, err := proto.Marshal(out)
			if err != nil {
				t.Fatal(err)
			}
			want, err := proto.Marshal(&pagesvc.PageChunk{Addr: addr, Data: data})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("PageChunk %#x+%d: in-place encoding differs from generated", addr, size)
			}
			// Marshal does not copy: the output is the buffer itself.
			if &got[len(got)-1] != &buf[len(buf)-1] {
				t.Errorf("PageChunk %#x+%d: marshal copied the data", addr, size)
			}
			// Appending to a caller's buffer still works.
			app, err := proto.MarshalOptions{}.MarshalAppend([]byte{0xff}, out)
			if err != nil || !bytes.Equal(app, append([]byte{0xff}, want...)) {
				t.Errorf("PageChunk MarshalAppend: %v", err)
			}

			in := newChunkIn()
			if err := proto.Unmarshal(want, in); err != nil {
				t.Fatal(err)
			}
			if in.addr != addr || !bytes.Equal(in.data(), data) {
				t.Fatalf("PageChunk %#x+%d: decoded %#x+%d", addr, size, in.addr, len(in.data()))
			}
		}

		pbuf := make([]byte, headroom+size)
		copy(pbuf[headroom:], data)
		got, err := proto.Marshal(newPagesOut(pbuf))
		if err != nil {
			t.Fatal(err)
		}
		want, _ := proto.Marshal(&pagesvc.GetPagesResponse{Data: data})
		if !bytes.Equal(got, want) {
			t.Fatalf("GetPagesResponse of %d: in-place encoding differs from generated", size)
		}
		dst := make([]byte, size)
		in := newPagesIn(dst)
		if err := proto.Unmarshal(want, in); err != nil || in.overflow || !bytes.Equal(dst, data) {
			t.Fatalf("GetPagesResponse of %d: decode: %v, overflow %v", size, err, in.overflow)
		}
	}
}

func TestCodecDecodeEdges(t *testing.T) {
	data := pattern(1, 64)
	enc, _ := proto.Marshal(&pagesvc.PageChunk{Addr: 0x1000, Data: data})

	// Unknown fields (a newer peer) are skipped.
	withUnknown := protowire.AppendTag(slices.Clone(enc), 9, protowire.BytesType)
	withUnknown = protowire.AppendBytes(withUnknown, []byte("future"))
	withUnknown = protowire.AppendTag(withUnknown, 10, protowire.VarintType)
	withUnknown = protowire.AppendVarint(withUnknown, 7)
	in := newChunkIn()
	if err := proto.Unmarshal(withUnknown, in); err != nil || in.addr != 0x1000 || !bytes.Equal(in.data(), data) {
		t.Errorf("with unknown fields: %v", err)
	}

	// Reuse: a second, shorter message replaces the first entirely.
	short, _ := proto.Marshal(&pagesvc.PageChunk{Data: data[:8]})
	if err := proto.Unmarshal(short, in); err != nil || in.addr != 0 || !bytes.Equal(in.data(), data[:8]) {
		t.Errorf("reused receiver: addr %#x, %d bytes, %v", in.addr, len(in.data()), err)
	}

	// A cut inside the data field is an error, never a panic or short data.
	// (A cut between fields is a valid, shorter message.)
	dataField := len(enc) - len(data) - 2 // tag and one-byte length
	for n := 1; n < len(enc); n++ {
		err := proto.Unmarshal(enc[:n], newChunkIn())
		if n > dataField && err == nil {
			t.Errorf("truncated to %d of %d bytes: no error", n, len(enc))
		}
	}

	// GetPagesResponse bigger than the destination: overflow, not a write
	// past it.
	big, _ := proto.Marshal(&pagesvc.GetPagesResponse{Data: data})
	dst := make([]byte, 16)
	pin := newPagesIn(dst)
	if err := proto.Unmarshal(big, pin); err != nil || !pin.overflow {
		t.Errorf("oversized answer: err %v, overflow %v", err, pin.overflow)
	}
	// An empty answer (ttrpc decodes the payload of error statuses too).
	pin = newPagesIn(dst)
	if err := proto.Unmarshal(nil, pin); err != nil || pin.n != 0 {
		t.Errorf("empty answer: %v, %d bytes", err, pin.n)
	}
}

// TestServiceDesc checks that the hand-written service table serves exactly
// the RPCs of pages.proto, with the right streaming shape.
func TestServiceDesc(t *testing.T) {
	sd := pagesvc.File_pages_proto.Services().ByName("Pages")
	if string(sd.FullName()) != serviceName {
		t.Fatalf("service name %q, proto says %q", serviceName, sd.FullName())
	}
	desc := serviceDesc(handler{})
	var got, want []string
	for name := range desc.Methods {
		got = append(got, name)
	}
	for name, st := range desc.Streams {
		got = append(got, name+" stream")
		if st.StreamingClient || !st.StreamingServer {
			t.Errorf("%s: streaming client %v server %v", name, st.StreamingClient, st.StreamingServer)
		}
	}
	for i := range sd.Methods().Len() {
		m := sd.Methods().Get(i)
		name := string(m.Name())
		if m.IsStreamingServer() {
			name += " stream"
		}
		want = append(want, name)
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("served %q, proto has %q", got, want)
	}
}

// TestTTRPCVersion pins the ttrpc version on which StreamPages' buffer reuse
// was checked (server.go: a buffer is free once the next Send returns). On a
// new ttrpc version, re-read serverConn.run: the responses channel must still
// be unbuffered and each message written before the next is taken. (Test
// binaries carry no dependency versions, so this reads the module's go.mod.)
func TestTTRPCVersion(t *testing.T) {
	mod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Skipf("module file not found: %v", err)
	}
	version := ""
	for _, line := range strings.Split(string(mod), "\n") {
		f := strings.Fields(line)
		if slices.Contains(f, "replace") && slices.Contains(f, "github.com/containerd/ttrpc") {
			t.Fatalf("ttrpc is replaced (%q): re-check StreamPages' buffer reuse", line)
		}
		if i := slices.Index(f, "github.com/containerd/ttrpc"); i >= 0 && i+1 < len(f) {
			version = f[i+1]
		}
	}
	if version != "v1.2.10" {
		t.Fatalf("ttrpc %q: re-check StreamPages' buffer reuse against serverConn.run, then update this test", version)
	}
}
