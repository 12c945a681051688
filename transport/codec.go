package transport

import (
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/runtime/protoiface"

	pagesvc "github.com/cowmig/cowmig/transport/pagesvc/v1"
)

// This file gives the two messages that carry page data (PageChunk and
// GetPagesResponse) hand-written encodings, plugged into protobuf-go through
// protoiface.Methods. The generated code allocates a fresh zeroed slice and
// copies the data on every marshal and every unmarshal; at gigabytes per
// second on two cores that is most of the budget. Here:
//
//   - the server reads pages into a buffer with headroom in front, and
//     marshalling writes the few header bytes into the headroom and returns
//     the buffer itself (no copy, no allocation);
//   - the client decodes the data field straight into a buffer it owns: a
//     reused one for Stream, the caller's for GetPages.
//
// The bytes on the wire are those the generated code produces (tests decode
// each side with the generated types), so either peer may use either.

// headroom is the space reserved in front of page data for a message's
// header: the largest is PageChunk's, a tag and a 10-byte varint for addr
// and a tag and a 5-byte varint for the data's length.
const headroom = 1 + 10 + 1 + 5

// Field numbers of the page-carrying messages, from pages.proto.
const (
	fieldChunkAddr protowire.Number = 1 // PageChunk.addr
	fieldChunkData protowire.Number = 2 // PageChunk.data
	fieldPagesData protowire.Number = 1 // GetPagesResponse.data
)

// dataOut is an outgoing PageChunk (addrField set) or GetPagesResponse whose
// data sits in buf after headroom bytes.
type dataOut struct {
	// view is the generated message with the same content (its Data aliases
	// buf), answering reflection for anyone who asks.
	view      proto.Message
	addrField protowire.Number // 0: no addr field
	addr      uint64
	dataField protowire.Number
	buf       []byte // headroom, then the data
	methods   protoiface.Methods
}

func newChunkOut() *dataOut {
	o := &dataOut{view: &pagesvc.PageChunk{}, addrField: fieldChunkAddr, dataField: fieldChunkData}
	o.methods = protoiface.Methods{Marshal: o.marshal, CheckInitialized: checkNothing}
	return o
}

func newPagesOut(buf []byte) *dataOut {
	o := &dataOut{view: &pagesvc.GetPagesResponse{Data: buf[headroom:]}, dataField: fieldPagesData, buf: buf}
	o.methods = protoiface.Methods{Marshal: o.marshal, CheckInitialized: checkNothing}
	return o
}

// setChunk points the chunk at addr and buf (headroom plus data).
func (o *dataOut) setChunk(addr uint64, buf []byte) {
	o.addr, o.buf = addr, buf
	v := o.view.(*pagesvc.PageChunk)
	v.Addr, v.Data = addr, buf[headroom:]
}

func (o *dataOut) ProtoReflect() protoreflect.Message {
	return reflectWith{Message: o.view.ProtoReflect(), iface: o, methods: &o.methods}
}

// marshal builds the header right in front of the data and returns the
// buffer from the header's first byte. Size is deliberately not provided:
// protobuf-go would then allocate an output buffer to append to.
func (o *dataOut) marshal(in protoiface.MarshalInput) (protoiface.MarshalOutput, error) {
	var hdr [headroom]byte
	h := hdr[:0]
	if o.addrField != 0 && o.addr != 0 { // proto3 leaves out a zero scalar
		h = protowire.AppendTag(h, o.addrField, protowire.VarintType)
		h = protowire.AppendVarint(h, o.addr)
	}
	data := o.buf[headroom:]
	h = protowire.AppendTag(h, o.dataField, protowire.BytesType)
	h = protowire.AppendVarint(h, uint64(len(data)))
	if len(in.Buf) > 0 {
		// Appending to a caller's buffer (proto.MarshalAppend): copy.
		return protoiface.MarshalOutput{Buf: append(append(in.Buf, h...), data...)}, nil
	}
	start := headroom - len(h)
	copy(o.buf[start:], h)
	return protoiface.MarshalOutput{Buf: o.buf[start:]}, nil
}

// dataIn is an incoming PageChunk or GetPagesResponse decoded into a buffer
// the receiver owns.
type dataIn struct {
	view      proto.Message
	addrField protowire.Number
	dataField protowire.Number
	addr      uint64
	// dst receives the data. With grow set it is enlarged as needed (and
	// reused across messages); otherwise data beyond it sets overflow.
	dst      []byte
	grow     bool
	n        int // data bytes received
	overflow bool
	methods  protoiface.Methods
}

// newChunkIn returns a PageChunk receiver that reuses one growing buffer.
func newChunkIn() *dataIn {
	i := &dataIn{view: &pagesvc.PageChunk{}, addrField: fieldChunkAddr, dataField: fieldChunkData, grow: true}
	i.methods = protoiface.Methods{Unmarshal: i.unmarshal, CheckInitialized: checkNothing}
	return i
}

// newPagesIn returns a GetPagesResponse receiver that decodes into dst.
func newPagesIn(dst []byte) *dataIn {
	i := &dataIn{view: &pagesvc.GetPagesResponse{}, dataField: fieldPagesData, dst: dst}
	i.methods = protoiface.Methods{Unmarshal: i.unmarshal, CheckInitialized: checkNothing}
	return i
}

// data returns the received data; valid until the next message.
func (i *dataIn) data() []byte { return i.dst[:i.n] }

func (i *dataIn) ProtoReflect() protoreflect.Message {
	return reflectWith{Message: i.view.ProtoReflect(), iface: i, methods: &i.methods}
}

// Reset empties the message but keeps the buffer (proto.Unmarshal calls it).
func (i *dataIn) Reset() {
	i.addr, i.n, i.overflow = 0, 0, false
}

func (i *dataIn) unmarshal(in protoiface.UnmarshalInput) (protoiface.UnmarshalOutput, error) {
	b := in.Buf
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protoiface.UnmarshalOutput{}, fmt.Errorf("decode tag: %w", protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case i.addrField != 0 && num == i.addrField && typ == protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return protoiface.UnmarshalOutput{}, fmt.Errorf("decode addr: %w", protowire.ParseError(n))
			}
			i.addr, b = v, b[n:]
		case num == i.dataField && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return protoiface.UnmarshalOutput{}, fmt.Errorf("decode data: %w", protowire.ParseError(n))
			}
			i.put(v)
			b = b[n:]
		default: // unknown field: skip, as protobuf does
			n := protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return protoiface.UnmarshalOutput{}, fmt.Errorf("decode field %d: %w", num, protowire.ParseError(n))
			}
			b = b[n:]
		}
	}
	return protoiface.UnmarshalOutput{Flags: protoiface.UnmarshalInitialized}, nil
}

// put stores v as the data (a repeated scalar field: the last one wins).
func (i *dataIn) put(v []byte) {
	if len(v) > len(i.dst) {
		if !i.grow {
			i.n, i.overflow = 0, true
			return
		}
		i.dst = make([]byte, len(v))
	}
	i.n = copy(i.dst, v)
	i.overflow = false
}

func checkNothing(protoiface.CheckInitializedInput) (protoiface.CheckInitializedOutput, error) {
	return protoiface.CheckInitializedOutput{}, nil // proto3: nothing is required
}

// reflectWith is the reflection view of a generated message with our own
// codec and Go value put in front.
type reflectWith struct {
	protoreflect.Message
	iface   protoreflect.ProtoMessage
	methods *protoiface.Methods
}

func (r reflectWith) Interface() protoreflect.ProtoMessage { return r.iface }
func (r reflectWith) ProtoMethods() *protoiface.Methods    { return r.methods }
