package checkpoint

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
)

// stubCode is the restore stub: the whole program, position independent.
// It is pid 1 of the restore's pid namespace and reaps children. When the
// child whose pid the restorer wrote into stubRoot exits, the stub exits
// with that child's status (128+signal if killed), which ends the
// namespace with the clone:
//
//	_start:	sub $16,%rsp			// status word
//	loop:	wait4(-1, %rsp, __WALL, NULL)	// mov $61,%eax; mov $-1,%rdi; mov %rsp,%rsi;
//						// mov $0x40000000,%edx; xor %r10d,%r10d; syscall
//		test %rax,%rax; js idle
//		cmp root(%rip),%eax; jne loop
//		mov (%rsp),%edi; mov %edi,%ecx; and $0x7f,%ecx; jz exited
//		lea 128(%rcx),%edi; jmp out
//	exited:	shr $8,%edi; and $0xff,%edi
//	out:	exit_group(%edi)		// mov $231,%eax; syscall
//	idle:	nanosleep({0, 1ms}, NULL)	// push $1000000; push $0; mov %rsp,%rdi;
//		jmp loop			// xor %esi,%esi; mov $35,%eax; syscall; add $16,%rsp
//	root:	.long 0
//
// The restorer clones the checkpointed process out of it (clone3 with
// set_tid) and morphs that child; the stub links no libc, so it holds no
// rseq registration and no signal handlers. Assembled with GNU as from the
// listing above (objcopy -O binary -j .text).
var stubCode = []byte{
	0x48, 0x83, 0xec, 0x10, 0xb8, 0x3d, 0x00, 0x00, 0x00, 0x48, 0xc7, 0xc7,
	0xff, 0xff, 0xff, 0xff, 0x48, 0x89, 0xe6, 0xba, 0x00, 0x00, 0x00, 0x40,
	0x45, 0x31, 0xd2, 0x0f, 0x05, 0x48, 0x85, 0xc0, 0x78, 0x2a, 0x3b, 0x05,
	0x3d, 0x00, 0x00, 0x00, 0x75, 0xda, 0x8b, 0x3c, 0x24, 0x89, 0xf9, 0x83,
	0xe1, 0x7f, 0x74, 0x08, 0x8d, 0xb9, 0x80, 0x00, 0x00, 0x00, 0xeb, 0x09,
	0xc1, 0xef, 0x08, 0x81, 0xe7, 0xff, 0x00, 0x00, 0x00, 0xb8, 0xe7, 0x00,
	0x00, 0x00, 0x0f, 0x05, 0x68, 0x40, 0x42, 0x0f, 0x00, 0x6a, 0x00, 0x48,
	0x89, 0xe7, 0x31, 0xf6, 0xb8, 0x23, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48,
	0x83, 0xc4, 0x10, 0xeb, 0x9f, 0x00, 0x00, 0x00, 0x00,
}

// stubRootOff is the offset of the root pid word ("root") in stubCode.
const stubRootOff = 0x65

// stubBase is where the stub's single PT_LOAD segment is mapped.
const stubBase = 0x400000

// stubRoot is the address of the root pid word in the running stub.
const stubRoot = stubBase + 64 + 56 + stubRootOff

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
