// Package image owns cowmig's checkpoint image: the model of a checkpointed
// process tree and its on-disk encoding.
//
// An image is a directory holding two files:
//
//	cowmig.img   header and metadata
//	pages.img    raw page contents referenced by offset from the metadata
//
// cowmig.img is laid out as
//
//	+--------------------------------------------------------+
//	| magic (8 bytes): "COWMIG" 0x00 0x01                    |
//	| format version (4 bytes, little endian)                |
//	| metadata length (8 bytes, little endian)               |
//	| metadata (JSON encoding of Image)                      |
//	| CRC-32C of the metadata (4 bytes, little endian)       |
//	+--------------------------------------------------------+
//
// pages.img has no header: each eager page run names its offset and length.
// Nothing in an image is trusted on decode: Validate checks every size,
// address, count and offset before a restore uses them.
package image

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
)

// Wire constants. They are part of the format: never renumber.
const (
	Magic         = "COWMIG\x00\x01"
	FormatVersion = 1
	MetaFile      = "cowmig.img"
	PagesFile     = "pages.img"
	PageSize      = 4096
	// MaxMetadata bounds the metadata a decoder accepts.
	MaxMetadata = 1 << 30
)

// ErrBadImage is the kind of every decode and validation error.
var ErrBadImage = errors.New("bad image")

// Mode is how the snapshot's memory is taken and where it lives.
type Mode string

// Modes (DESIGN §5).
const (
	ModeLive Mode = "live" // COW snapshot; lazy pages served by the source's page server
	ModeFull Mode = "full" // COW snapshot drained into pages.img; no source needed
	ModeStop Mode = "stop" // freeze, copy everything, thaw: the baseline
)

// Valid reports whether m is a known mode.
func (m Mode) Valid() bool { return m == ModeLive || m == ModeFull || m == ModeStop }

// Image is the whole checkpoint.
type Image struct {
	Version    int    `json:"version"`
	Mode       Mode   `json:"mode"`
	SnapshotID string `json:"snapshot_id"`
	CreatedNs  int64  `json:"created_ns"`
	// Endpoint and Token reach the source's page server (live mode only).
	Endpoint string `json:"endpoint,omitempty"`
	// EndpointTLS says the page server speaks TLS (on TCP).
	EndpointTLS bool   `json:"endpoint_tls,omitempty"`
	Token       []byte `json:"token,omitempty"`
	// Arch and VDSO describe the source host for compatibility checks.
	Arch      string    `json:"arch"`
	VDSO      []Vma     `json:"vdso,omitempty"` // [vvar], [vvar_vclock], [vdso] as mapped on the source
	XSaveSize int       `json:"xsave_size"`
	Processes []Process `json:"processes"`
	Stats     Stats     `json:"stats"`
}

// Stats are figures of the checkpoint itself.
type Stats struct {
	FreezeNs   int64  `json:"freeze_ns"`
	PagesTotal uint64 `json:"pages_total"` // populated pages in the snapshot
	PagesEager uint64 `json:"pages_eager"` // pages stored in pages.img
	PagesLazy  uint64 `json:"pages_lazy"`  // pages served by the page server
	// COW is how the snapshot kept the pages overwritten after it
	// (live and full): "uffd" or "fork".
	COW string `json:"cow,omitempty"`
}

// Process is one checkpointed process.
type Process struct {
	ID      uint32      `json:"id"` // page-server process id
	Pid     int         `json:"pid"`
	PPid    int         `json:"ppid"`
	Pgid    int         `json:"pgid"`
	Sid     int         `json:"sid"`
	Comm    string      `json:"comm"`
	Exe     string      `json:"exe"`
	Cmdline []string    `json:"cmdline,omitempty"`
	Cwd     string      `json:"cwd"`
	Root    string      `json:"root"`
	Umask   uint32      `json:"umask"`
	Creds   Creds       `json:"creds"`
	Rlimits []Rlimit    `json:"rlimits"`
	MM      MM          `json:"mm"`
	Vmas    []Vma       `json:"vmas"`
	Threads []Thread    `json:"threads"`
	Sigacts []Sigaction `json:"sigactions"`
	// SharedPending are the process-wide pending signals.
	SharedPending []Siginfo `json:"shared_pending,omitempty"`
	Fds           []Fd      `json:"fds"`
}

// Creds are a process's credentials.
type Creds struct {
	Uid        [4]uint32 `json:"uid"` // real, effective, saved, fs
	Gid        [4]uint32 `json:"gid"`
	Groups     []uint32  `json:"groups"`
	CapInh     uint64    `json:"cap_inh"`
	CapPrm     uint64    `json:"cap_prm"`
	CapEff     uint64    `json:"cap_eff"`
	CapBnd     uint64    `json:"cap_bnd"`
	CapAmb     uint64    `json:"cap_amb"`
	NoNewPrivs bool      `json:"no_new_privs"`
	Seccomp    int       `json:"seccomp"`
}

// Rlimit is one resource limit.
type Rlimit struct {
	Resource int    `json:"resource"`
	Cur      uint64 `json:"cur"`
	Max      uint64 `json:"max"`
}

// MM holds the mm_struct fields restored with PR_SET_MM_MAP.
type MM struct {
	StartCode  uint64   `json:"start_code"`
	EndCode    uint64   `json:"end_code"`
	StartData  uint64   `json:"start_data"`
	EndData    uint64   `json:"end_data"`
	StartBrk   uint64   `json:"start_brk"`
	Brk        uint64   `json:"brk"`
	StartStack uint64   `json:"start_stack"`
	ArgStart   uint64   `json:"arg_start"`
	ArgEnd     uint64   `json:"arg_end"`
	EnvStart   uint64   `json:"env_start"`
	EnvEnd     uint64   `json:"env_end"`
	Auxv       []uint64 `json:"auxv"`
}

// VmaKind says how a mapping is rebuilt.
type VmaKind string

// Mapping kinds.
const (
	VmaAnon       VmaKind = "anon"        // private anonymous (incl. heap, stack)
	VmaFile       VmaKind = "file"        // file mapping (private or shared)
	VmaShmem      VmaKind = "shmem"       // shared anonymous or memfd: content copied
	VmaVDSO       VmaKind = "vdso"        // [vdso]
	VmaVVar       VmaKind = "vvar"        // [vvar]
	VmaVVarVclock VmaKind = "vvar_vclock" // [vvar_vclock]
	VmaVsyscall   VmaKind = "vsyscall"    // [vsyscall]: fixed by the kernel, not restored
)

// Vma is one mapping.
type Vma struct {
	Start  uint64  `json:"start"`
	End    uint64  `json:"end"`
	Prot   int     `json:"prot"` // PROT_*
	Shared bool    `json:"shared"`
	Kind   VmaKind `json:"kind"`
	Name   string  `json:"name,omitempty"` // [heap], [stack], [anon:x] …
	Path   string  `json:"path,omitempty"` // file mappings
	Offset uint64  `json:"offset,omitempty"`
	Inode  uint64  `json:"inode,omitempty"`
	Size   int64   `json:"file_size,omitempty"`
	// Advice re-applied with madvise after mapping (MADV_*).
	Advice    []int `json:"advice,omitempty"`
	GrowsDown bool  `json:"grows_down,omitempty"`
	// Runs lists the populated pages at the snapshot instant and where
	// their content is. Pages of anonymous mappings not in a run read as
	// zero; pages of file mappings not in a run come from the file.
	Runs []Run `json:"runs,omitempty"`
}

// Len is the mapping's length in bytes.
func (v Vma) Len() uint64 { return v.End - v.Start }

// Where says where a run's content lives.
type Where string

// Content locations.
const (
	InPages  Where = "pages"  // pages.img at Off
	OnServer Where = "server" // the source's page server
)

// Run is a run of populated pages.
type Run struct {
	Addr   uint64 `json:"addr"`
	NPages uint64 `json:"npages"`
	Where  Where  `json:"where"`
	Off    uint64 `json:"off,omitempty"` // offset in pages.img
}

// End is the address after the run.
func (r Run) End() uint64 { return r.Addr + r.NPages*PageSize }

// Thread is one thread's state.
type Thread struct {
	Comm       string    `json:"comm,omitempty"`
	Tid        int       `json:"tid"`
	Regs       Regs      `json:"regs"`
	XState     []byte    `json:"xstate"`
	SigMask    uint64    `json:"sigmask"`
	RseqAddr   uint64    `json:"rseq_addr,omitempty"`
	RseqLen    uint32    `json:"rseq_len,omitempty"`
	RseqSig    uint32    `json:"rseq_sig,omitempty"`
	AltStackSP uint64    `json:"altstack_sp,omitempty"`
	AltStackSz uint64    `json:"altstack_size,omitempty"`
	AltStackFl int32     `json:"altstack_flags,omitempty"`
	TidAddress uint64    `json:"tid_address,omitempty"` // set_tid_address / clear_child_tid
	Pending    []Siginfo `json:"pending,omitempty"`     // thread-private pending signals
}

// Siginfo is a raw 128-byte siginfo_t of a pending signal.
type Siginfo struct {
	Signo int    `json:"signo"`
	Raw   []byte `json:"raw"`
}

// Regs are the x86_64 general registers (struct user_regs_struct).
type Regs struct {
	R15, R14, R13, R12, Rbp, Rbx, R11, R10, R9, R8, Rax, Rcx, Rdx, Rsi, Rdi, OrigRax, Rip, Cs, Eflags, Rsp, Ss, FsBase, GsBase, Ds, Es, Fs, Gs uint64
}

// Sigaction is one installed signal disposition (struct kernel_sigaction).
type Sigaction struct {
	Signo    int    `json:"signo"`
	Handler  uint64 `json:"handler"`
	Flags    uint64 `json:"flags"`
	Restorer uint64 `json:"restorer"`
	Mask     uint64 `json:"mask"`
}

// FdKind says how a file descriptor is rebuilt.
type FdKind string

// Descriptor kinds.
const (
	FdFile   FdKind = "file"   // regular file, directory or device, reopened by path
	FdPipe   FdKind = "pipe"   // anonymous pipe end
	FdFIFO   FdKind = "fifo"   // named pipe, reopened by path
	FdStdio  FdKind = "stdio"  // fd 0-2 on a terminal or pipe: the restorer's own
	FdSocket FdKind = "socket" // inet or unix socket
)

// Fd is one open file descriptor.
type Fd struct {
	Num     int    `json:"num"`
	Kind    FdKind `json:"kind"`
	Path    string `json:"path,omitempty"`
	Flags   int    `json:"flags"` // open flags (O_*), without O_CLOEXEC
	CloExec bool   `json:"cloexec,omitempty"`
	Pos     int64  `json:"pos,omitempty"`
	// Pipes: ends of one pipe share PipeID.
	PipeID uint64  `json:"pipe_id,omitempty"`
	PipeRd bool    `json:"pipe_read,omitempty"`
	PipeSz int     `json:"pipe_size,omitempty"`
	Sock   *Socket `json:"socket,omitempty"`
}

// Socket describes a socket; connected ones are restored closed.
type Socket struct {
	Family    int    `json:"family"`
	Type      int    `json:"type"`
	Protocol  int    `json:"protocol"`
	Addr      []byte `json:"addr,omitempty"` // raw bound sockaddr
	AddrStr   string `json:"addr_str,omitempty"`
	Listening bool   `json:"listening,omitempty"`
	Backlog   int    `json:"backlog,omitempty"`
	Connected bool   `json:"connected,omitempty"`
	ReuseAddr bool   `json:"reuseaddr,omitempty"`
	ReusePort bool   `json:"reuseport,omitempty"`
	SndBuf    int    `json:"sndbuf,omitempty"`
	RcvBuf    int    `json:"rcvbuf,omitempty"`
	KeepAlive bool   `json:"keepalive,omitempty"`
	NoDelay   bool   `json:"nodelay,omitempty"`
	V6Only    bool   `json:"v6only,omitempty"`
}

// Write encodes img into dir/cowmig.img atomically (temp file + rename).
func Write(dir string, img *Image) error {
	meta, err := json.Marshal(img)
	if err != nil {
		return fmt.Errorf("encode metadata: %w", err)
	}
	var b bytes.Buffer
	b.WriteString(Magic)
	binary.Write(&b, binary.LittleEndian, uint32(FormatVersion))
	binary.Write(&b, binary.LittleEndian, uint64(len(meta)))
	b.Write(meta)
	binary.Write(&b, binary.LittleEndian, crc32.Checksum(meta, castagnoli))
	tmp := filepath.Join(dir, MetaFile+".tmp")
	if err := os.WriteFile(tmp, b.Bytes(), 0o600); err != nil {
		return fmt.Errorf("write image: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, MetaFile)); err != nil {
		return fmt.Errorf("write image: %w", err)
	}
	return nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Read decodes and validates dir/cowmig.img.
func Read(dir string) (*Image, error) {
	f, err := os.Open(filepath.Join(dir, MetaFile))
	if err != nil {
		return nil, fmt.Errorf("open image: %w", err)
	}
	defer f.Close()
	img, err := Decode(f)
	if err != nil {
		return nil, err
	}
	st, err := os.Stat(filepath.Join(dir, PagesFile))
	var pagesLen int64
	if err == nil {
		pagesLen = st.Size()
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("stat pages: %w", err)
	}
	if err := img.Validate(pagesLen); err != nil {
		return nil, err
	}
	return img, nil
}

// Decode reads one encoded image from r; it does not validate the model.
func Decode(r io.Reader) (*Image, error) {
	var hdr [20]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("%w: read header: %v", ErrBadImage, err)
	}
	if string(hdr[:8]) != Magic {
		return nil, fmt.Errorf("%w: bad magic %q", ErrBadImage, hdr[:8])
	}
	if v := binary.LittleEndian.Uint32(hdr[8:12]); v != FormatVersion {
		return nil, fmt.Errorf("%w: format version %d, want %d", ErrBadImage, v, FormatVersion)
	}
	n := binary.LittleEndian.Uint64(hdr[12:20])
	if n == 0 || n > MaxMetadata {
		return nil, fmt.Errorf("%w: metadata length %d", ErrBadImage, n)
	}
	meta := make([]byte, n+4)
	if _, err := io.ReadFull(r, meta); err != nil {
		return nil, fmt.Errorf("%w: truncated metadata: %v", ErrBadImage, err)
	}
	sum := binary.LittleEndian.Uint32(meta[n:])
	meta = meta[:n]
	if crc32.Checksum(meta, castagnoli) != sum {
		return nil, fmt.Errorf("%w: metadata checksum mismatch", ErrBadImage)
	}
	img := new(Image)
	if err := json.Unmarshal(meta, img); err != nil {
		return nil, fmt.Errorf("%w: decode metadata: %v", ErrBadImage, err)
	}
	return img, nil
}
