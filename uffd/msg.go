package uffd

import (
	"encoding/binary"
	"fmt"
)

// MsgKind is the event field of struct uffd_msg (UFFD_EVENT_*). The values
// are the kernel's ABI and are pinned here.
type MsgKind uint8

// UFFD_EVENT_* from include/uapi/linux/userfaultfd.h.
const (
	MsgPagefault MsgKind = 0x12
	MsgFork      MsgKind = 0x13
	MsgRemap     MsgKind = 0x14
	MsgRemove    MsgKind = 0x15
	MsgUnmap     MsgKind = 0x16
)

func (k MsgKind) String() string {
	switch k {
	case MsgPagefault:
		return "pagefault"
	case MsgFork:
		return "fork"
	case MsgRemap:
		return "remap"
	case MsgRemove:
		return "remove"
	case MsgUnmap:
		return "unmap"
	}
	return fmt.Sprintf("event(%#x)", uint8(k))
}

// UFFD_PAGEFAULT_FLAG_* bits of Msg.Flags.
const (
	PagefaultWrite uint64 = 1 << 0 // the access was a write
	PagefaultWP    uint64 = 1 << 1 // the page is write-protected (ModeWP)
	PagefaultMinor uint64 = 1 << 2 // minor fault (ModeMinor)
)

// Msg is one decoded struct uffd_msg. Which fields are meaningful depends
// on Kind.
type Msg struct {
	Kind MsgKind

	// MsgPagefault: UFFD_PAGEFAULT_FLAG_* bits, the faulting address (page
	// aligned unless FeatureExactAddress was negotiated), and the faulting
	// thread's id (only with FeatureThreadID).
	Flags   uint64
	Address uint64
	Ptid    uint32

	// MsgFork: the uffd of the child's mm, a new fd in the table of the
	// process that read the message. Whoever receives the Msg owns it.
	ForkFD int

	// MsgRemap: [From, From+Len) moved to [To, To+Len).
	From, To, Len uint64

	// MsgRemove, MsgUnmap: the affected range [Start, End).
	Start, End uint64
}

// IsWrite reports whether a pagefault was caused by a write.
func (m Msg) IsWrite() bool { return m.Flags&PagefaultWrite != 0 }

// IsWP reports whether a pagefault hit a write-protected page.
func (m Msg) IsWP() bool { return m.Flags&PagefaultWP != 0 }

// IsMinor reports whether a pagefault is a minor fault.
func (m Msg) IsMinor() bool { return m.Flags&PagefaultMinor != 0 }

func (m Msg) String() string {
	switch m.Kind {
	case MsgPagefault:
		return fmt.Sprintf("pagefault %#x flags %#x tid %d", m.Address, m.Flags, m.Ptid)
	case MsgFork:
		return fmt.Sprintf("fork ufd %d", m.ForkFD)
	case MsgRemap:
		return fmt.Sprintf("remap %#x+%#x -> %#x", m.From, m.Len, m.To)
	case MsgRemove, MsgUnmap:
		return fmt.Sprintf("%v [%#x,%#x)", m.Kind, m.Start, m.End)
	}
	return m.Kind.String()
}

// msgSize is sizeof(struct uffd_msg): it is __packed, 8 bytes of header
// and a 24-byte union.
const msgSize = 32

// decodeMsg decodes one struct uffd_msg. Offsets from
// include/uapi/linux/userfaultfd.h (verified with offsetof in C):
// event@0, arg@8; pagefault.flags@8, address@16, feat.ptid@24;
// fork.ufd@8; remap.from@8, to@16, len@24; remove.start@8, end@16.
func decodeMsg(b []byte) Msg {
	_ = b[msgSize-1]
	le := binary.LittleEndian
	m := Msg{Kind: MsgKind(b[0])}
	switch m.Kind {
	case MsgPagefault:
		m.Flags = le.Uint64(b[8:])
		m.Address = le.Uint64(b[16:])
		m.Ptid = le.Uint32(b[24:])
	case MsgFork:
		m.ForkFD = int(le.Uint32(b[8:]))
	case MsgRemap:
		m.From = le.Uint64(b[8:])
		m.To = le.Uint64(b[16:])
		m.Len = le.Uint64(b[24:])
	case MsgRemove, MsgUnmap:
		m.Start = le.Uint64(b[8:])
		m.End = le.Uint64(b[16:])
	}
	return m
}
