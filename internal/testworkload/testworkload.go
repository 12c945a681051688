// Package testworkload provides self-verifying workloads for snapshot tests
// and the helpers that build, start and question them.
//
// A workload checks its own memory against counters kept in that same
// memory, so a clone restored from a snapshot taken at any instant T0 can
// prove that its memory is the source's memory at T0 ("verify ok") or show
// the first page that is not ("verify FAIL ..."). Two workloads exist:
//
//   - testdata/workload.c (BuildC; in testdata because the go tool refuses
//     .c files in a package without cgo): pthread writers over anonymous, THP and private
//     file mappings, a churn thread doing munmap/mmap, MADV_DONTNEED,
//     mremap and MADV_FREE, and a thread that forks children writing to
//     COW copies of the memory. Options: -mem MiB, -threads N, -thp,
//     -churn, -fork, -filemap PATH, -rate PAGES/S (0 = unlimited),
//     -quiet, -selftest-corrupt (zero a page after ready: verify must
//     fail), -selftest-tear (mix two generations in a page: likewise).
//   - pyworkload.py (PythonScript): a CPython process with a large
//     bytearray and ~200k dict objects. Arguments: [MiB] [--rate STEPS/S]
//     [--quiet] [--selftest-corrupt].
//
// Line protocol on stdout, one line per event:
//
//	ready <pid>                          after the initial fill
//	verify ok pages=<n> steps=<sum>      on SIGUSR1 (C)
//	verify ok step=<s> sha=<hex>         on SIGUSR1 (Python)
//	verify FAIL <first failure> (bad=<n> ...)
//	counters <name>=<n> ...              on SIGUSR2
//
// The C workload's counters line has w0..w<N-1>, then thp, file, churn,
// munmap, dontneed, mremap, free and forks as the options enable them. The
// Python one has step and dictstep. SIGTERM makes both exit 0.
package testworkload

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// Python is the interpreter pyworkload.py is written for (Debian 12's
// python3, standard library only).
const Python = "/usr/bin/python3"

// cflags are the compiler flags of workload.c; they are part of the cache key.
const cflags = "-O2 -pthread -Wall -Wextra"

//go:embed testdata/workload.c
var workloadC string

//go:embed pyworkload.py
var pyWorkload string

// BuildC compiles testdata/workload.c with gcc and returns the binary's path.
//
// The binary is cached under the user cache directory (~/.cache/cowmig/
// testworkload), named by a hash of the source and flags: a cache that
// lives on the file system needs no package state, is shared by parallel
// test binaries (each build is renamed into place atomically), and keeps
// the executable at a stable path, which a clone restored from a snapshot
// of the workload may need to map again after the test that built it has
// ended. Without a cache directory it builds into t.TempDir().
func BuildC(t testing.TB) string {
	t.Helper()
	dir, err := cacheDir()
	if err != nil {
		t.Logf("build workload without a cache: %v", err)
		dir = t.TempDir()
	}
	path, err := buildC(dir)
	if err != nil {
		t.Fatalf("build workload.c: %v", err)
	}
	return path
}

// PythonScript writes pyworkload.py into t.TempDir() and returns its path.
// It skips the test if Python is missing.
func PythonScript(t testing.TB) string {
	t.Helper()
	if _, err := os.Stat(Python); err != nil {
		t.Skipf("pyworkload needs %s (scripts/deps.sh installs python3): %v", Python, err)
	}
	path := filepath.Join(t.TempDir(), "pyworkload.py")
	if err := os.WriteFile(path, []byte(pyWorkload), 0o755); err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
	return path
}

// Fields returns the key=value tokens of a workload line; other tokens
// ("verify", "ok", "counters") are left out.
func Fields(line string) map[string]string {
	m := make(map[string]string)
	for _, tok := range strings.Fields(line) {
		if k, v, ok := strings.Cut(tok, "="); ok && k != "" {
			m[k] = v
		}
	}
	return m
}

// Counter returns the unsigned integer value of field key in a workload
// line, e.g. Counter("verify ok pages=3 steps=9", "steps") = 9.
func Counter(line, key string) (uint64, error) {
	v, ok := Fields(line)[key]
	if !ok {
		return 0, fmt.Errorf("field %q in %q: %w", key, line, ErrNoField)
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("field %q in %q: %w", key, line, err)
	}
	return n, nil
}

// ErrNoField reports that a workload line lacks the asked field.
var ErrNoField = errors.New("no such field")

// CacheDir is the user cache directory for builds of test programs,
// ~/.cache/cowmig/<sub>, created if missing.
func CacheDir(sub string) (string, error) {
	base, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("user cache dir: %w", err)
	}
	dir := filepath.Join(base, "cowmig", sub)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", dir, err)
	}
	return dir, nil
}

func cacheDir() (string, error) { return CacheDir("testworkload") }

// buildC returns the workload's binary in dir, compiling it if missing.
func buildC(dir string) (string, error) { return CompileC(dir, "workload", workloadC, cflags) }

// CompileC returns dir/<name>-<hash of src and cflags>, compiling the C
// program src with gcc first if it is missing; a warning is an error.
// Each build is renamed into place, so parallel test binaries share the
// cache safely.
func CompileC(dir, name, src, cflags string) (string, error) {
	h := sha256.New()
	h.Write([]byte(cflags + "\x00" + src))
	out := filepath.Join(dir, name+"-"+hex.EncodeToString(h.Sum(nil))[:16])
	if fi, err := os.Stat(out); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o100 != 0 {
		return out, nil
	}
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		return "", fmt.Errorf("find gcc (scripts/deps.sh installs it): %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".build-*")
	if err != nil {
		return "", fmt.Errorf("create temp binary: %w", err)
	}
	tmpName := tmp.Name()
	tmp.Close()
	defer os.Remove(tmpName) // gone already after a successful rename

	args := append(strings.Fields(cflags), "-x", "c", "-o", tmpName, "-")
	cmd := exec.Command(gcc, args...)
	cmd.Stdin = strings.NewReader(src)
	var diag bytes.Buffer
	cmd.Stdout = &diag
	cmd.Stderr = &diag
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("gcc %s: %w\n%s", strings.Join(args, " "), err, diag.String())
	}
	if diag.Len() > 0 {
		return "", fmt.Errorf("gcc %s: warnings in %s.c:\n%s", strings.Join(args, " "), name, diag.String())
	}
	if err := os.Chmod(tmpName, 0o755); err != nil {
		return "", fmt.Errorf("chmod %s: %w", tmpName, err)
	}
	if err := os.Rename(tmpName, out); err != nil {
		return "", fmt.Errorf("install %s: %w", out, err)
	}
	return out, nil
}
