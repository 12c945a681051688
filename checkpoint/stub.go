package checkpoint

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
)

// stubCode is the restore stub: the whole program, position independent.
// It is pid 1 of the restore's pid namespace and only reaps children; it
// exits once it has reaped one and none is left, which ends the namespace
// with the clone:
//
//	_start:	xor %r12d,%r12d			// r12: reaped a child
//	loop:	wait4(-1, NULL, __WALL, NULL)	// mov $61,%eax; mov $-1,%rdi; xor %esi,%esi;
//						// mov $0x40000000,%edx; xor %r10d,%r10d; syscall
//		test %rax,%rax; js nochild
//		mov $1,%r12d; jmp loop
//	nochild: cmp $-10,%rax; jne loop	// only ECHILD
//		test %r12d,%r12d; jz idle
//		exit_group(0)			// mov $231,%eax; xor %edi,%edi; syscall
//	idle:	nanosleep({0, 1ms}, NULL)	// push $1000000; push $0; mov %rsp,%rdi;
//		jmp loop			// xor %esi,%esi; mov $35,%eax; syscall; add $16,%rsp
//
// The restorer clones the checkpointed process out of it (clone3 with
// set_tid) and morphs that child; the stub links no libc, so it holds no
// rseq registration and no signal handlers. Assembled with GNU as from the
// listing above (objcopy -O binary -j .text).
var stubCode = []byte{
	0x45, 0x31, 0xe4, 0xb8, 0x3d, 0x00, 0x00, 0x00, 0x48, 0xc7, 0xc7, 0xff,
	0xff, 0xff, 0xff, 0x31, 0xf6, 0xba, 0x00, 0x00, 0x00, 0x40, 0x45, 0x31,
	0xd2, 0x0f, 0x05, 0x48, 0x85, 0xc0, 0x78, 0x08, 0x41, 0xbc, 0x01, 0x00,
	0x00, 0x00, 0xeb, 0xdb, 0x48, 0x83, 0xf8, 0xf6, 0x75, 0xd5, 0x45, 0x85,
	0xe4, 0x74, 0x09, 0xb8, 0xe7, 0x00, 0x00, 0x00, 0x31, 0xff, 0x0f, 0x05,
	0x68, 0x40, 0x42, 0x0f, 0x00, 0x6a, 0x00, 0x48, 0x89, 0xe7, 0x31, 0xf6,
	0xb8, 0x23, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x83, 0xc4, 0x10, 0xeb,
	0xae,
}

// stubBase is where the stub's single PT_LOAD segment is mapped.
const stubBase = 0x400000

// StubELF returns the restore stub as a static x86_64 ELF executable.
func StubELF() []byte {
	const ehsize, phsize = 64, 56
	var b bytes.Buffer
	le := binary.LittleEndian
	total := uint64(ehsize + phsize + len(stubCode))
	// ELF header.
	b.Write([]byte{0x7f, 'E', 'L', 'F', 2 /* 64-bit */, 1 /* LE */, 1 /* version */, 0 /* SYSV */})
	b.Write(make([]byte, 8))
	binary.Write(&b, le, uint16(2))                      // e_type ET_EXEC
	binary.Write(&b, le, uint16(0x3e))                   // e_machine x86_64
	binary.Write(&b, le, uint32(1))                      // e_version
	binary.Write(&b, le, uint64(stubBase+ehsize+phsize)) // e_entry
	binary.Write(&b, le, uint64(ehsize))                 // e_phoff
	binary.Write(&b, le, uint64(0))                      // e_shoff
	binary.Write(&b, le, uint32(0))                      // e_flags
	binary.Write(&b, le, uint16(ehsize))                 // e_ehsize
	binary.Write(&b, le, uint16(phsize))                 // e_phentsize
	binary.Write(&b, le, uint16(1))                      // e_phnum
	binary.Write(&b, le, uint16(64))                     // e_shentsize
	binary.Write(&b, le, uint16(0))                      // e_shnum
	binary.Write(&b, le, uint16(0))                      // e_shstrndx
	// Program header: one R+X PT_LOAD covering the file.
	binary.Write(&b, le, uint32(1))        // p_type PT_LOAD
	binary.Write(&b, le, uint32(5))        // p_flags R|X
	binary.Write(&b, le, uint64(0))        // p_offset
	binary.Write(&b, le, uint64(stubBase)) // p_vaddr
	binary.Write(&b, le, uint64(stubBase)) // p_paddr
	binary.Write(&b, le, total)            // p_filesz
	binary.Write(&b, le, total)            // p_memsz
	binary.Write(&b, le, uint64(0x1000))   // p_align
	b.Write(stubCode)
	return b.Bytes()
}

// WriteStub writes the stub executable into dir and returns its path.
func WriteStub(dir string) (string, error) {
	p := filepath.Join(dir, "cowmig-stub")
	if err := os.WriteFile(p, StubELF(), 0o755); err != nil {
		return "", fmt.Errorf("write restore stub: %w", err)
	}
	return p, nil
}
