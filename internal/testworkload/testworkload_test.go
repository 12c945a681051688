package testworkload

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// waitCounters polls the workload's counters until ok accepts them. The
// poll interval only bounds the signal rate; the condition is what the
// test waits for.
func waitCounters(t *testing.T, p *Proc, what string, ok func(map[string]uint64) bool) map[string]uint64 {
	t.Helper()
	deadline := time.Now().Add(DefaultTimeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		c, err := p.Counters(DefaultTimeout)
		if err != nil {
			t.Fatalf("counters: %v", err)
		}
		if ok(c) {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still not there, last counters %v", what, c)
		}
		<-tick.C
	}
}

func mustCounter(t *testing.T, line, key string) uint64 {
	t.Helper()
	n, err := Counter(line, key)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestCWorkloadAllOptions(t *testing.T) {
	bin := BuildC(t)
	mapped := filepath.Join(t.TempDir(), "filemap")
	p := Start(t, []string{bin, "-mem", "32", "-threads", "2", "-thp", "-churn", "-fork",
		"-filemap", mapped, "-quiet"}, nil)
	if p.ReadyPid != p.Pid {
		t.Errorf("ready line says pid %d, started %d", p.ReadyPid, p.Pid)
	}
	first := p.Verify(t)
	c1, err := p.Counters(DefaultTimeout)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"w0", "w1", "thp", "file", "churn", "munmap", "dontneed", "mremap", "free", "forks"} {
		if _, ok := c1[k]; !ok {
			t.Fatalf("counters %v lack %q", c1, k)
		}
	}
	// Wait for every writer to go round its whole region at least once
	// more (so every page has been rewritten since the first verify), and
	// for a few forks.
	c2 := waitCounters(t, p, "writers, churn and forks progress", func(c map[string]uint64) bool {
		return c["w0"] >= c1["w0"]+4096 && c["w1"] >= c1["w1"]+4096 && c["thp"] >= c1["thp"]+4096 &&
			c["file"] >= c1["file"]+256 && c["churn"] >= c1["churn"]+32 && c["forks"] >= c1["forks"]+2
	})
	second := p.Verify(t)
	t.Logf("first: %s\nsecond: %s\ncounters: %v", first, second, c2)
	// Huge pages are up to the kernel (fragmentation, THP settings); show
	// what the THP writer got without depending on it.
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", p.Pid)); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "AnonHugePages:") {
				t.Log(l)
			}
		}
	}

	steps1, steps2 := mustCounter(t, first, "steps"), mustCounter(t, second, "steps")
	if steps2 <= steps1 {
		t.Errorf("steps did not grow: %d then %d", steps1, steps2)
	}
	// 2 writers of 16 MiB, a 16 MiB THP region, 1 MiB of file, and 16
	// churn slots of at least 64 KiB each.
	const minPages = 2*4096 + 4096 + 256 + 16*16
	if pages := mustCounter(t, second, "pages"); pages < minPages {
		t.Errorf("verified %d pages, want at least %d", pages, minPages)
	}
	// The file itself must be untouched: the mapping is private.
	if b, err := os.ReadFile(mapped); err != nil || len(b) != 1<<20 || strings.Trim(string(b), "\x00") != "" {
		t.Errorf("file behind the private mapping changed (len %d, err %v)", len(b), err)
	}
	if err := p.Terminate(DefaultTimeout); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
}

func TestCWorkloadChurns(t *testing.T) {
	bin := BuildC(t)
	p := Start(t, []string{bin, "-mem", "4", "-threads", "1", "-churn", "-quiet"}, nil)
	c1, err := p.Counters(DefaultTimeout)
	if err != nil {
		t.Fatal(err)
	}
	// Every kind of operation must run on every slot a few times: 3 rounds
	// of 16 slots are 12 of each kind.
	waitCounters(t, p, "churn progress", func(c map[string]uint64) bool {
		for _, k := range []string{"munmap", "dontneed", "mremap", "free"} {
			if c[k] < c1[k]+12 {
				return false
			}
		}
		return c["churn"] >= c1["churn"]+48
	})
	p.Verify(t)
}

func TestCWorkloadSelftest(t *testing.T) {
	bin := BuildC(t)
	tests := []struct {
		flag, want string
	}{
		{"-selftest-corrupt", "found magic 0 owner 0 page 0 gen 0 "},
		{"-selftest-tear", "header ok but body differs at byte 2048 "},
	}
	for _, tt := range tests {
		t.Run(tt.flag, func(t *testing.T) {
			p := Start(t, []string{bin, "-mem", "8", "-threads", "2", "-churn", "-rate", "0", "-quiet", tt.flag}, nil)
			for i := 0; i < 2; i++ { // the damage must persist, not be rewritten away
				line, err := p.VerifyLine(DefaultTimeout)
				if !errors.Is(err, ErrVerifyFailed) {
					t.Fatalf("verify %d: want ErrVerifyFailed, got line %q, err %v", i, line, err)
				}
				if !strings.HasPrefix(line, "verify FAIL w0 page ") || !strings.Contains(line, tt.want) ||
					!strings.Contains(line, "(bad=1 ") {
					t.Errorf("verify %d: failure line %q lacks %q", i, line, tt.want)
				}
				t.Log(line)
			}
			// The other writers still run.
			c1, err := p.Counters(DefaultTimeout)
			if err != nil {
				t.Fatal(err)
			}
			waitCounters(t, p, "w1 progress", func(c map[string]uint64) bool { return c["w1"] > c1["w1"] })
		})
	}
}

func TestAttach(t *testing.T) {
	bin := BuildC(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-mem", "4", "-threads", "1", "-quiet")
	cmd.Stdout = pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	p := Attach(cmd.Process.Pid, pr)
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		p.Close()
	}()
	pid, err := p.WaitReady(ReadyTimeout)
	if err != nil || pid != cmd.Process.Pid {
		t.Fatalf("ready: pid %d, err %v; want pid %d", pid, err, cmd.Process.Pid)
	}
	line := p.Verify(t)
	if mustCounter(t, line, "pages") != 1024 {
		t.Errorf("verify line %q: want pages=1024", line)
	}
}

func TestPyWorkload(t *testing.T) {
	script := PythonScript(t)
	p := Start(t, []string{Python, script, "64", "--quiet"}, nil)
	first := p.Verify(t)
	s1 := mustCounter(t, first, "step")
	// Wait until every block has been rewritten since the first verify.
	waitCounters(t, p, "python steps", func(c map[string]uint64) bool { return c["step"] >= s1+1024 })
	second := p.Verify(t)
	t.Logf("first: %s\nsecond: %s", first, second)
	if s2 := mustCounter(t, second, "step"); s2 <= s1 {
		t.Errorf("step did not grow: %d then %d", s1, s2)
	}
	for _, line := range []string{first, second} {
		if sha := Fields(line)["sha"]; len(sha) != 64 {
			t.Errorf("line %q: sha is not 64 hex digits", line)
		}
	}
	if Fields(first)["sha"] == Fields(second)["sha"] {
		t.Errorf("state checksum did not change between verifies")
	}
	if err := p.Terminate(DefaultTimeout); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
}

func TestPyWorkloadSelftestCorrupt(t *testing.T) {
	script := PythonScript(t)
	p := Start(t, []string{Python, script, "16", "--quiet", "--selftest-corrupt"}, nil)
	line, err := p.VerifyLine(DefaultTimeout)
	if !errors.Is(err, ErrVerifyFailed) {
		t.Fatalf("want ErrVerifyFailed, got line %q, err %v", line, err)
	}
	if !strings.Contains(line, "content is not generation") || !strings.HasSuffix(line, "(bad=1)") {
		t.Errorf("unexpected failure line %q", line)
	}
	t.Log(line)
}

func TestFields(t *testing.T) {
	tests := []struct {
		line, key string
		want      uint64
		wantErr   bool
	}{
		{"verify ok pages=3 steps=9", "steps", 9, false},
		{"verify ok pages=3 steps=9", "pages", 3, false},
		{"counters w0=18446744073709551615", "w0", 1<<64 - 1, false},
		{"verify ok step=5 sha=ab12", "sha", 0, true},
		{"verify ok", "steps", 0, true},
		{"", "x", 0, true},
		{"counters =7 x=", "x", 0, true},
	}
	for _, tt := range tests {
		got, err := Counter(tt.line, tt.key)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("Counter(%q, %q) = %d, %v; want %d, error %v", tt.line, tt.key, got, err, tt.want, tt.wantErr)
		}
	}
	if _, err := Counter("verify ok", "steps"); !errors.Is(err, ErrNoField) {
		t.Errorf("missing field: want ErrNoField, got %v", err)
	}
}
