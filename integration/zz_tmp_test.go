package integration

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cowmig/cowmig/internal/testworkload"
)

func TestTmpForkLoop(t *testing.T) {
	for i := 0; i < 8; i++ {
		t.Run("", func(t *testing.T) {
			h := newHarness(t)
			bin := testworkload.BuildC(t)
			src := testworkload.Start(t, []string{bin, "-mem", "128", "-threads", "2", "-thp", "-churn", "-fork", "-quiet"}, nil)
			dmesg0, _ := exec.Command("dmesg").Output()
			dir := filepath.Join(t.TempDir(), "image")
			h.checkpoint(src.Pid, dir, "live")
			c := h.restore(dir, runOpts{})
			line, err := c.VerifyLine(testworkload.DefaultTimeout)
			t.Logf("verify: %q %v", line, err)
			if err == nil {
				waitExit(c.st.PagerPid, pagerTimeout)
				line, err = c.VerifyLine(testworkload.DefaultTimeout)
				t.Logf("verify2: %q %v", line, err)
			}
			dmesg1, _ := exec.Command("dmesg").Output()
			if len(dmesg1) > len(dmesg0) {
				t.Logf("NEW DMESG: %s", strings.TrimSpace(string(dmesg1[len(dmesg0):])))
			}
			if err != nil {
				t.Logf("%s", c.diagnosis())
			}
		})
	}
}
