package procfs

import (
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func TestParseMapsLine(t *testing.T) {
	tests := []struct {
		name string
		line string
		want Mapping
	}{
		{
			name: "file",
			line: "5590abaaf000-5590abab1000 r--p 00002000 fe:00 247278                     /usr/bin/head",
			want: Mapping{Start: 0x5590abaaf000, End: 0x5590abab1000, Read: true, Offset: 0x2000, Major: 0xfe, Inode: 247278, Path: "/usr/bin/head"},
		},
		{
			name: "anon with trailing space",
			line: "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 ",
			want: Mapping{Start: 0x7f0000000000, End: 0x7f0000001000, Read: true, Write: true},
		},
		{
			name: "anon without trailing space",
			line: "7f0000000000-7f0000001000 ---p 00000000 00:00 0",
			want: Mapping{Start: 0x7f0000000000, End: 0x7f0000001000},
		},
		{
			name: "spaces and deleted",
			line: "00400000-00401000 rwxs 00000000 08:01 42                         /tmp/a b  (c) (deleted)",
			want: Mapping{Start: 0x400000, End: 0x401000, Read: true, Write: true, Exec: true, Shared: true, Major: 8, Minor: 1, Inode: 42, Path: "/tmp/a b  (c) (deleted)"},
		},
		{
			name: "trailing space in file name is kept",
			line: "00400000-00401000 r--p 00000000 08:01 42 /tmp/x ",
			want: Mapping{Start: 0x400000, End: 0x401000, Read: true, Major: 8, Minor: 1, Inode: 42, Path: "/tmp/x "},
		},
		{
			name: "vsyscall at the top, large major",
			line: "ffffffffff600000-ffffffffff601000 --xp 00000000 103:0f 0                  [vsyscall]",
			want: Mapping{Start: 0xffffffffff600000, End: 0xffffffffff601000, Exec: true, Major: 0x103, Minor: 0xf, Path: "[vsyscall]"},
		},
		{
			name: "max offset and inode",
			line: "1000-2000 r--s ffffffffffff0000 00:05 18446744073709551615 /memfd:x y (deleted)",
			want: Mapping{Start: 0x1000, End: 0x2000, Read: true, Shared: true, Offset: 0xffffffffffff0000, Minor: 5, Inode: 1<<64 - 1, Path: "/memfd:x y (deleted)"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseMapsLine(tc.line)
			if err != nil {
				t.Fatalf("ParseMapsLine: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestParseMapsLineMalformed(t *testing.T) {
	for _, line := range []string{
		"",
		" ",
		"garbage",
		"1000-2000",
		"1000-2000 rw-p",
		"1000-2000 rw-p 0 00:00",
		"1000-2000 rw-p 00000000 00:00 x",
		"1000 rw-p 00000000 00:00 0",
		"2000-1000 rw-p 00000000 00:00 0",
		"1000-1000 rw-p 00000000 00:00 0",
		"1000-2000 rw-q 00000000 00:00 0",
		"1000-2000 rw- 00000000 00:00 0",
		"1000-2000 rw-pp 00000000 00:00 0",
		"1000-2000 wr-p 00000000 00:00 0",
		"1000-2000 rw-p 0000000g 00:00 0",
		"1000-2000 rw-p 00000000 0000 0",
		"1000-2000 rw-p 00000000 00:zz 0",
		"1000-2000 rw-p 00000000 100000000:00 0",
		"1000-2000 rw-p 00000000 00:00 -1",
		"10000000000000000-10000000000000001 rw-p 00000000 00:00 0",
		"g000-2000 rw-p 00000000 00:00 0",
	} {
		if m, err := ParseMapsLine(line); !errors.Is(err, ErrParse) {
			t.Errorf("ParseMapsLine(%q) = %+v, %v; want ErrParse", line, m, err)
		}
	}
}

const smapsSample = `55a0a0000000-55a0a0002000 r--p 00000000 fe:00 247278                     /usr/bin/my prog (deleted)
Size:                  8 kB
Rss:                   8 kB
AnonHugePages:         0 kB
THPeligible:           0
VmFlags: rd mr mw me dw 
7f0000000000-7f0000400000 rw-p 00000000 00:00 0 
Size:               4096 kB
Rss:                4096 kB
AnonHugePages:      4096 kB
VmFlags: rd wr mr mw me ac hg 
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  12 kB
VmFlags: rd wr mr mw me gd ac 
`

func TestParseSmaps(t *testing.T) {
	got, err := ParseSmaps([]byte(smapsSample))
	if err != nil {
		t.Fatalf("ParseSmaps: %v", err)
	}
	want := []Mapping{
		{Start: 0x55a0a0000000, End: 0x55a0a0002000, Read: true, Major: 0xfe, Inode: 247278, Path: "/usr/bin/my prog (deleted)",
			VmFlags: []string{"rd", "mr", "mw", "me", "dw"}, Rss: 8 << 10},
		{Start: 0x7f0000000000, End: 0x7f0000400000, Read: true, Write: true,
			VmFlags: []string{"rd", "wr", "mr", "mw", "me", "ac", "hg"}, Rss: 4 << 20, AnonHugePages: 4 << 20},
		{Start: 0x7ffc00000000, End: 0x7ffc00021000, Read: true, Write: true, Path: "[stack]",
			VmFlags: []string{"rd", "wr", "mr", "mw", "me", "gd", "ac"}, Rss: 12 << 10},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got  %+v\nwant %+v", got, want)
	}
	if !got[0].IsFile() || !got[0].Deleted() || got[0].FilePath() != "/usr/bin/my prog" || got[0].IsAnon() {
		t.Errorf("mapping 0 classification wrong: %+v", got[0])
	}
	if !got[1].IsAnon() || !got[1].HasFlag("hg") || got[1].HasFlag("h") || got[1].Len() != 4<<20 {
		t.Errorf("mapping 1 classification wrong: %+v", got[1])
	}
	if !got[2].IsAnon() || got[2].IsSpecial() {
		t.Errorf("mapping 2 classification wrong: %+v", got[2])
	}

	// Boundaries: empty input, plain maps (no field lines).
	if m, err := ParseSmaps(nil); err != nil || len(m) != 0 {
		t.Errorf("ParseSmaps(nil) = %v, %v", m, err)
	}
	m, err := ParseSmaps([]byte("1000-2000 r--p 00000000 00:00 0 [vdso]\n3000-4000 r--p 00000000 00:00 0"))
	if err != nil || len(m) != 2 || m[0].Path != "[vdso]" || m[1].End != 0x4000 {
		t.Errorf("ParseSmaps(maps) = %+v, %v", m, err)
	}
}

func TestParseSmapsMalformed(t *testing.T) {
	for name, in := range map[string]string{
		"field before header": "Rss: 4 kB\n1000-2000 r--p 00000000 00:00 0\n",
		"bad rss":             "1000-2000 r--p 00000000 00:00 0\nRss: 4 MB\n",
		"rss not a number":    "1000-2000 r--p 00000000 00:00 0\nRss: x kB\n",
		"rss missing unit":    "1000-2000 r--p 00000000 00:00 0\nRss: 4\n",
		"huge rss":            "1000-2000 r--p 00000000 00:00 0\nAnonHugePages: 99999999999999999999 kB\n",
		"garbage line":        "1000-2000 r--p 00000000 00:00 0\nwhat is this\n",
		"long line":           "1000-2000 r--p 00000000 00:00 0 /" + strings.Repeat("a", 2<<20) + "\n",
	} {
		if m, err := ParseSmaps([]byte(in)); !errors.Is(err, ErrParse) {
			t.Errorf("%s: ParseSmaps = %+v, %v; want ErrParse", name, m, err)
		}
	}
}

func TestMappingClassification(t *testing.T) {
	tests := []struct {
		path                                              string
		inode                                             uint64
		anon, sharedAnon, special, file, memfd, sysv, del bool
	}{
		{path: "", anon: true},
		{path: "[heap]", anon: true},
		{path: "[stack]", anon: true},
		{path: "[anon:my arena]", anon: true},
		{path: "[anon_shmem:x]", sharedAnon: true},
		{path: "/dev/zero (deleted)", inode: 7, sharedAnon: true, del: true},
		{path: "[vdso]", special: true},
		{path: "[vvar]", special: true},
		{path: "[vvar_vclock]", special: true},
		{path: "[vsyscall]", special: true},
		{path: "[uprobes]", special: true},
		{path: "/memfd:x (deleted)", inode: 5, memfd: true, del: true},
		{path: "/SYSV0000002a (deleted)", inode: 5, sysv: true, del: true},
		{path: "/usr/lib/libc.so.6", inode: 9, file: true},
		{path: "/tmp/gone (deleted)", inode: 9, file: true, del: true},
		{path: "/weird", inode: 0}, // no inode: not a real file
	}
	for _, tc := range tests {
		m := Mapping{Path: tc.path, Inode: tc.inode}
		got := [...]bool{m.IsAnon(), m.IsSharedAnon(), m.IsSpecial(), m.IsFile(), m.IsMemfd(), m.IsSysV(), m.Deleted()}
		want := [...]bool{tc.anon, tc.sharedAnon, tc.special, tc.file, tc.memfd, tc.sysv, tc.del}
		if got != want {
			t.Errorf("%q: anon,sharedAnon,special,file,memfd,sysv,deleted = %v, want %v", tc.path, got, want)
		}
	}
}

const statusSample = "Name:\tmy\\nproc\\\\x\nUmask:\t0027\nState:\tt (tracing stop)\nTgid:\t100\nNgid:\t0\nPid:\t101\nPPid:\t1\nTracerPid:\t55\n" +
	"Uid:\t1000\t1001\t1002\t1003\nGid:\t2000\t2001\t2002\t2003\nFDSize:\t64\nGroups:\t4 24 27 \nNStgid:\t100\t1\nNSpid:\t101\t2\n" +
	"Threads:\t3\nSigQ:\t0/96364\nSigPnd:\t0000000000000100\nShdPnd:\t0000000000004000\nSigBlk:\tfffffffe7ffbfeff\nSigIgn:\t0000000000001000\n" +
	"SigCgt:\t0000000180000000\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001fffeffffff\nCapBnd:\t000001ffffffffff\n" +
	"CapAmb:\t0000000000000001\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t3\nSpeculation_Store_Bypass:\tthread vulnerable\n"

func TestParseStatus(t *testing.T) {
	got, err := ParseStatus(statusSample)
	if err != nil {
		t.Fatalf("ParseStatus: %v", err)
	}
	want := &Status{
		Name: "my\nproc\\x", State: "t (tracing stop)", Tgid: 100, Pid: 101, PPid: 1, TracerPid: 55,
		NSpid: []int{101, 2}, Threads: 3,
		Uid: [4]uint32{1000, 1001, 1002, 1003}, Gid: [4]uint32{2000, 2001, 2002, 2003}, Groups: []uint32{4, 24, 27},
		CapInh: 0, CapPrm: 0x1ffffffffff, CapEff: 0x1fffeffffff, CapBnd: 0x1ffffffffff, CapAmb: 1,
		NoNewPrivs: true, Seccomp: 2, SeccompFilters: 3,
		SigPnd: 0x100, ShdPnd: 0x4000, SigBlk: 0xfffffffe7ffbfeff, SigIgn: 0x1000, SigCgt: 0x180000000,
		Umask: 0o027,
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got  %+v\nwant %+v", got, want)
	}

	// Minimal input: only the required lines; empty Groups.
	min := "Name:\tx\nTgid:\t1\nPid:\t1\nPPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t \n"
	st, err := ParseStatus(min)
	if err != nil || st.Name != "x" || len(st.Groups) != 0 || st.Umask != 0 {
		t.Errorf("ParseStatus(minimal) = %+v, %v", st, err)
	}
}

func TestParseStatusMalformed(t *testing.T) {
	base := "Name:\tx\nTgid:\t1\nPid:\t1\nPPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n"
	for name, in := range map[string]string{
		"empty":                "",
		"missing gid":          "Name:\tx\nTgid:\t1\nPid:\t1\nPPid:\t0\nUid:\t0\t0\t0\t0\n",
		"repeated not missing": "Name:\tx\nName:\tx\nTgid:\t1\nPid:\t1\nPPid:\t0\nUid:\t0\t0\t0\t0\n",
		"no colon":             base + "garbage\n",
		"bad pid":              "Name:\tx\nTgid:\t1\nPid:\tone\nPPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n",
		"three uids":           "Name:\tx\nTgid:\t1\nPid:\t1\nPPid:\t0\nUid:\t0\t0\t0\nGid:\t0\t0\t0\t0\n",
		"uid overflow":         "Name:\tx\nTgid:\t1\nPid:\t1\nPPid:\t0\nUid:\t0\t0\t0\t4294967296\nGid:\t0\t0\t0\t0\n",
		"cap too long":         base + "CapEff:\t10000000000000000\n",
		"cap empty":            base + "CapEff:\t\n",
		"sig not hex":          base + "SigBlk:\txyz\n",
		"umask not octal":      base + "Umask:\t0089\n",
		"groups bad":           base + "Groups:\t1 two\n",
		"nspid bad":            base + "NSpid:\t1 x\n",
	} {
		if st, err := ParseStatus(in); !errors.Is(err, ErrParse) {
			t.Errorf("%s: ParseStatus = %+v, %v; want ErrParse", name, st, err)
		}
	}
}

// statTail is fields 3..52 of a real stat line.
const statTail = "R 7396 7396 1674 0 -1 4194304 98 0 0 0 0 0 0 0 20 0 1 0 59242 3133440 349 18446744073709551615 94264338558976 94264338578857 140732403936688 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 94264338594864 94264338596480 94264395087872 140732403944130 140732403944150 140732403944150 140732403945451 0"

func TestParseStat(t *testing.T) {
	for _, comm := range []string{"cat", "a) (b) R 1 2", "", " ", "((", "))", "x\ny"} {
		t.Run(comm, func(t *testing.T) {
			st, err := ParseStat("7404 (" + comm + ") " + statTail + "\n")
			if err != nil {
				t.Fatalf("ParseStat: %v", err)
			}
			want := &Stat{
				Pid: 7404, Comm: comm, State: 'R', PPid: 7396, Pgrp: 7396, Session: 1674, TtyNr: 0, Tpgid: -1,
				Flags: 4194304, Priority: 20, Nice: 0, NumThreads: 1, StartTime: 59242,
				StartCode: 94264338558976, EndCode: 94264338578857, StartStack: 140732403936688,
				ExitSignal: 17, RtPriority: 0, Policy: 0,
				StartData: 94264338594864, EndData: 94264338596480, StartBrk: 94264395087872,
				ArgStart: 140732403944130, ArgEnd: 140732403944150, EnvStart: 140732403944150, EnvEnd: 140732403945451,
				ExitCode: 0,
			}
			if !reflect.DeepEqual(st, want) {
				t.Fatalf("got  %+v\nwant %+v", st, want)
			}
		})
	}
}

func TestParseStatMalformed(t *testing.T) {
	f := strings.Fields(statTail)
	for name, in := range map[string]string{
		"empty":           "",
		"no parens":       "1 cat " + statTail,
		"no space before": "1(cat) " + statTail,
		"no pid":          " (cat) " + statTail,
		"bad pid":         "x (cat) " + statTail,
		"no space after":  "1 (cat)" + statTail,
		"truncated":       "1 (cat) " + strings.Join(f[:len(f)-1], " "),
		"long state":      "1 (cat) RR" + statTail[1:],
		"bad number":      "1 (cat) " + strings.Replace(statTail, "7396", "73x6", 1),
		"negative code":   "1 (cat) " + strings.Replace(statTail, "94264338558976", "-1", 1),
		"only open":       "1 (cat " + statTail,
	} {
		if st, err := ParseStat(in); !errors.Is(err, ErrParse) {
			t.Errorf("%s: ParseStat = %+v, %v; want ErrParse", name, st, err)
		}
	}
}

func TestParseFdinfo(t *testing.T) {
	in := "pos:\t123\nflags:\t02102002\nmnt_id:\t29\nino:\t4242\neventfd-count:                5\neventfd-id: 3\n" +
		"tfd:        5 events:       19 data:                5  pos:0 ino:61 sdev:7\n" +
		"tfd:        6 events:       19 data:                6  pos:0 ino:62 sdev:7\n"
	fd, err := ParseFdinfo(in)
	if err != nil {
		t.Fatalf("ParseFdinfo: %v", err)
	}
	if fd.Pos != 123 || fd.Flags != 0o2102002 || fd.MntID != 29 || fd.Ino != 4242 {
		t.Errorf("got %+v", fd)
	}
	wantInfo := map[string]string{
		"eventfd-count": "5",
		"eventfd-id":    "3",
		"tfd": "5 events:       19 data:                5  pos:0 ino:61 sdev:7\n" +
			"6 events:       19 data:                6  pos:0 ino:62 sdev:7",
	}
	if !reflect.DeepEqual(fd.Info, wantInfo) {
		t.Errorf("Info = %q, want %q", fd.Info, wantInfo)
	}
	// Minimal: pos and flags only, no Info.
	fd, err = ParseFdinfo("pos:\t0\nflags:\t0\n")
	if err != nil || fd.Info != nil || fd.Pos != 0 {
		t.Errorf("ParseFdinfo(minimal) = %+v, %v", fd, err)
	}
	for name, in := range map[string]string{
		"empty":       "",
		"no flags":    "pos:\t0\n",
		"flags octal": "pos:\t0\nflags:\t09\n",
		"pos bad":     "pos:\tx\nflags:\t0\n",
		"no colon":    "pos:\t0\nflags:\t0\nxyz\n",
		"ino bad":     "pos:\t0\nflags:\t0\nino:\t-1\n",
	} {
		if fd, err := ParseFdinfo(in); !errors.Is(err, ErrParse) {
			t.Errorf("%s: ParseFdinfo = %+v, %v; want ErrParse", name, fd, err)
		}
	}
}

func TestFdKind(t *testing.T) {
	tests := []struct {
		target string
		mode   uint32
		want   FdKind
	}{
		{"/tmp/x", 0o100644, FdFile},
		{"/memfd:a (deleted)", 0o100777, FdFile},
		{"/", 0o40755, FdDir},
		{"/dev/null", 0o20666, FdCharDev},
		{"/dev/sda", 0o60660, FdBlockDev},
		{"pipe:[12]", 0o10600, FdPipe},
		{"/tmp/fifo", 0o10644, FdFIFO},
		{"socket:[3]", 0o140777, FdSocket},
		{"anon_inode:[eventfd]", 0o600, FdAnonInode},
		{"anon_inode:[pidfd]", 0o100600, FdAnonInode},
		{"/weird", 0, FdOther},
	}
	for _, tc := range tests {
		if got := (Fd{Target: tc.target, Mode: tc.mode}).Kind(); got != tc.want {
			t.Errorf("Kind(%q, %o) = %v, want %v", tc.target, tc.mode, got, tc.want)
		}
	}
}

func TestParseInetSockets(t *testing.T) {
	tcp := "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n" +
		"   0: 0100007F:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 1588 1 0000000023a6dd12 100 0 0 10 0\n" +
		"   1: 0100007F:1F90 0100007F:C350 01 0000000A:00000000 00:00000000 00000000  1000        0 1600 1 0000000023a6dd12 20 4 30 10 -1\n" +
		"   2: 0100007F:1F90 0100007F:C351 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000\n"
	tcp6 := "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n" +
		"   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n" +
		"   1: 0000000000000000FFFF00000100007F:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 78 1 0000000000000000 100 0 0 10 0\n"
	out := map[uint64]InetSocket{}
	if err := ParseInetSockets("tcp", tcp, out); err != nil {
		t.Fatal(err)
	}
	if err := ParseInetSockets("tcp6", tcp6, out); err != nil {
		t.Fatal(err)
	}
	want := map[uint64]InetSocket{
		1588: {Inode: 1588, Proto: "tcp", Local: netip.MustParseAddrPort("127.0.0.1:8080"), Remote: netip.MustParseAddrPort("0.0.0.0:0"), State: TCPListen, RxQueue: 3},
		1600: {Inode: 1600, Proto: "tcp", Local: netip.MustParseAddrPort("127.0.0.1:8080"), Remote: netip.MustParseAddrPort("127.0.0.1:50000"), State: TCPEstablished, TxQueue: 10, UID: 1000},
		77:   {Inode: 77, Proto: "tcp6", Local: netip.MustParseAddrPort("[::1]:22"), Remote: netip.MustParseAddrPort("[::]:0"), State: TCPListen},
		78:   {Inode: 78, Proto: "tcp6", Local: netip.MustParseAddrPort("[::ffff:127.0.0.1]:80"), Remote: netip.MustParseAddrPort("[::]:0"), State: TCPListen},
	}
	if !reflect.DeepEqual(out, want) {
		t.Fatalf("got  %+v\nwant %+v", out, want)
	}
	// Header only is an empty table.
	empty := map[uint64]InetSocket{}
	if err := ParseInetSockets("udp", "  sl  local_address rem_address\n", empty); err != nil || len(empty) != 0 {
		t.Errorf("header only: %v %v", empty, err)
	}
	hdr := "header\n"
	for name, line := range map[string]string{
		"short":         "   0: 0100007F:1F90 00000000:0000 0A",
		"bad addr":      "   0: 0100007G:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1",
		"short addr":    "   0: 100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1",
		"v6 in v4":      "   0: 00000000000000000000000001000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1",
		"no port":       "   0: 0100007F 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1",
		"state too big": "   0: 0100007F:1F90 00000000:0000 100 00000000:00000000 00:00000000 00000000 0 0 1 1",
		"queues":        "   0: 0100007F:1F90 00000000:0000 0A 00000000 00:00000000 00000000 0 0 1 1",
		"inode":         "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 x 1",
		"no sl colon":   "   0 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1",
	} {
		if err := ParseInetSockets("tcp", hdr+line+"\n", map[uint64]InetSocket{}); !errors.Is(err, ErrParse) {
			t.Errorf("%s: got %v, want ErrParse", name, err)
		}
	}
}

func TestParseUnixSockets(t *testing.T) {
	in := "Num       RefCount Protocol Flags    Type St Inode Path\n" +
		"000000002f8323ba: 00000003 00000000 00000000 0001 03  1585\n" +
		"0000000000000000: 00000002 00000000 00010000 0001 01 12345 /run/my socket.sock\n" +
		"0000000000000000: 00000002 00000000 00000000 0002 01 99999 @abstract@name\n" +
		"0000000000000000: 00000002 00000000 00010000 0005 01 123456789 /x\n"
	out := map[uint64]UnixSocket{}
	if err := ParseUnixSockets(in, out); err != nil {
		t.Fatal(err)
	}
	want := map[uint64]UnixSocket{
		1585:      {Inode: 1585, Type: 1, State: 3},
		12345:     {Inode: 12345, Type: 1, State: 1, Listening: true, Path: "/run/my socket.sock"},
		99999:     {Inode: 99999, Type: 2, State: 1, Path: "@abstract@name"},
		123456789: {Inode: 123456789, Type: 5, State: 1, Listening: true, Path: "/x"},
	}
	if !reflect.DeepEqual(out, want) {
		t.Fatalf("got  %+v\nwant %+v", out, want)
	}
	for name, line := range map[string]string{
		"short":     "0000000000000000: 00000002 00000000 00010000 0001 01",
		"bad flags": "0000000000000000: 00000002 00000000 0001000g 0001 01 1",
		"bad inode": "0000000000000000: 00000002 00000000 00010000 0001 01 -1",
		"no colon":  "0000000000000000 00000002 00000000 00010000 0001 01 1",
	} {
		if err := ParseUnixSockets("header\n"+line+"\n", map[uint64]UnixSocket{}); !errors.Is(err, ErrParse) {
			t.Errorf("%s: got %v, want ErrParse", name, err)
		}
	}
}

func TestParseAuxv(t *testing.T) {
	b := make([]byte, 32)
	b[0], b[8], b[16] = 6, 0x10, 0 // AT_PAGESZ 0x10, AT_NULL 0
	got, err := parseAuxv("x", b)
	if err != nil || !reflect.DeepEqual(got, []uint64{6, 0x10, 0, 0}) {
		t.Errorf("parseAuxv = %v, %v", got, err)
	}
	if got, err := parseAuxv("x", nil); err != nil || len(got) != 0 {
		t.Errorf("parseAuxv(empty) = %v, %v", got, err)
	}
	for _, n := range []int{1, 8, 15, 17, 24} {
		if _, err := parseAuxv("x", make([]byte, n)); !errors.Is(err, ErrParse) {
			t.Errorf("parseAuxv(%d bytes) = %v, want ErrParse", n, err)
		}
	}
}

func TestSplitNul(t *testing.T) {
	for in, want := range map[string][]string{
		"":               {},
		"a\x00":          {"a"},
		"a\x00b\x00":     {"a", "b"},
		"a\x00\x00":      {"a", ""},
		"rewritten":      {"rewritten"},
		"\x00":           {""},
		"a b\x00c d\x00": {"a b", "c d"},
	} {
		if got := splitNul([]byte(in)); !reflect.DeepEqual(got, want) {
			t.Errorf("splitNul(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestAppendRegion(t *testing.T) {
	r := func(s, e uint64, c PageCategory) PageRegion { return PageRegion{s, e, c} }
	tests := []struct {
		name string
		in   []PageRegion
		want []PageRegion
	}{
		{"none", nil, nil},
		{"one", []PageRegion{r(0, 1, 8)}, []PageRegion{r(0, 1, 8)}},
		{"adjacent equal", []PageRegion{r(0, 1, 8), r(1, 3, 8), r(3, 4, 8)}, []PageRegion{r(0, 4, 8)}},
		{"adjacent different", []PageRegion{r(0, 1, 8), r(1, 2, 40)}, []PageRegion{r(0, 1, 8), r(1, 2, 40)}},
		{"gap equal", []PageRegion{r(0, 1, 8), r(2, 3, 8)}, []PageRegion{r(0, 1, 8), r(2, 3, 8)}},
		{"mixed", []PageRegion{r(0, 1, 8), r(1, 2, 8), r(2, 3, 0), r(5, 6, 0), r(6, 9, 0)}, []PageRegion{r(0, 2, 8), r(2, 3, 0), r(5, 9, 0)}},
	}
	for _, tc := range tests {
		var got []PageRegion
		for _, x := range tc.in {
			got = appendRegion(got, x)
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestPageCategoryString(t *testing.T) {
	for c, want := range map[PageCategory]string{
		0:                         "0",
		PagePresent:               "present",
		PagePresent | PagePFNZero: "present|pfnzero",
		PageAll:                   "wpallowed|written|file|present|swapped|pfnzero|huge|softdirty|guard",
		PageGuard | 1<<12:         "guard|0x1000",
	} {
		if got := c.String(); got != want {
			t.Errorf("%#x.String() = %q, want %q", uint64(c), got, want)
		}
	}
}

func TestSplitNetlink(t *testing.T) {
	msg := func(l uint32, typ uint16, seq uint32, pad int) []byte {
		b := make([]byte, 16, 16+pad)
		b[0], b[1], b[2], b[3] = byte(l), byte(l>>8), byte(l>>16), byte(l>>24)
		b[4], b[5] = byte(typ), byte(typ>>8)
		b[8] = byte(seq)
		return append(b, make([]byte, pad)...)
	}
	two := append(msg(21, 20, 1, 8), msg(16, 3, 1, 0)...) // 21 bytes, aligned to 24
	got, err := splitNetlink(two)
	if err != nil || len(got) != 2 || len(got[0].data) != 5 || got[0].typ != 20 || got[1].typ != 3 {
		t.Fatalf("splitNetlink = %+v, %v", got, err)
	}
	if got, err := splitNetlink(nil); err != nil || len(got) != 0 {
		t.Errorf("splitNetlink(nil) = %v, %v", got, err)
	}
	for name, b := range map[string][]byte{
		"len too short": msg(15, 3, 1, 0),
		"len too long":  msg(100, 3, 1, 0),
	} {
		if _, err := splitNetlink(b); !errors.Is(err, ErrParse) {
			t.Errorf("%s: err = %v, want ErrParse", name, err)
		}
	}
}
