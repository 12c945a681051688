package ctrtest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cowmig/cowmig/internal/testworkload"
)

// ImageRef is the reference BuildImage gives the kvserver image.
const ImageRef = "docker.io/cowmig/kvserver:test"

// DefaultPort is the port the image's default command listens on.
const DefaultPort = 7070

// DefaultCmd returns the image's default Cmd (arguments to /kvserver):
// 256 MiB of state, one writer, port DefaultPort.
func DefaultCmd() []string { return []string{"-mib", "256", "-port", "7070"} }

// kvCflags are the compiler flags of kvserver.c; they are part of the
// cache key. -static: the image holds nothing but the binary.
const kvCflags = "-static -O2 -pthread -Wall -Wextra"

//go:embed testdata/kvserver.c
var kvserverC string

// OCI media types and annotations of the archive WriteImage produces.
const (
	mediaTypeIndex    = "application/vnd.oci.image.index.v1+json"
	mediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	mediaTypeLayerGz  = "application/vnd.oci.image.layer.v1.tar+gzip"
	// annotationImageName is containerd's full-name annotation; ctr
	// import and nerdctl load name the image after it.
	annotationImageName = "io.containerd.image.name"
	// annotationRefName is the OCI one, conventionally the tag only.
	annotationRefName = "org.opencontainers.image.ref.name"
)

// BuildKVServer compiles testdata/kvserver.c statically and returns the
// binary's path. Like testworkload.BuildC it caches the binary under the
// user cache directory (~/.cache/cowmig/ctrtest), named by a hash of the
// source and flags; without a cache directory it builds into t.TempDir().
func BuildKVServer(t testing.TB) string {
	t.Helper()
	dir, err := cacheDir()
	if err != nil {
		t.Logf("build kvserver without a cache: %v", err)
		dir = t.TempDir()
	}
	path, err := buildKVServer(dir)
	if err != nil {
		t.Fatalf("build kvserver.c: %v", err)
	}
	return path
}

// BuildKVServerIn compiles testdata/kvserver.c into dir (cached by a
// hash of the source and flags) for callers without a testing.TB, such as
// the demo's image builder.
func BuildKVServerIn(dir string) (string, error) { return buildKVServer(dir) }

// BuildImage builds kvserver and writes an OCI image archive of it to
// dir/kvserver.tar, named ImageRef, with Entrypoint ["/kvserver"] and Cmd
// DefaultCmd(). The archive imports with `ctr image import` and
// `nerdctl load`.
func BuildImage(t testing.TB, dir string) (tarPath, ref string) {
	t.Helper()
	bin := BuildKVServer(t)
	tarPath = filepath.Join(dir, "kvserver.tar")
	if err := WriteImage(tarPath, ImageRef, bin, DefaultCmd()); err != nil {
		t.Fatalf("write image: %v", err)
	}
	return tarPath, ImageRef
}

// WriteImage writes an OCI image archive (oci-layout, index.json,
// blobs/sha256/...) for linux/amd64 to path. The image has one gzip layer
// holding binary as /kvserver plus empty /etc and /tmp directories, the
// entrypoint ["/kvserver"] and the given default cmd. ref must be a full
// reference ("docker.io/cowmig/kvserver:test"): index.json names the
// manifest with it (io.containerd.image.name) and with its tag
// (org.opencontainers.image.ref.name).
func WriteImage(path, ref, binary string, cmd []string) error {
	colon := strings.LastIndex(ref, ":")
	if colon < 0 || strings.Contains(ref[colon:], "/") || !strings.Contains(ref, "/") {
		return fmt.Errorf("image ref %q: want a full reference like %s", ref, ImageRef)
	}
	exe, err := os.ReadFile(binary)
	if err != nil {
		return fmt.Errorf("read binary: %w", err)
	}
	layer, err := layerTar(exe)
	if err != nil {
		return fmt.Errorf("make layer: %w", err)
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := zw.Write(layer); err != nil {
		return fmt.Errorf("gzip layer: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("gzip layer: %w", err)
	}

	type descriptor struct {
		MediaType   string            `json:"mediaType"`
		Digest      string            `json:"digest"`
		Size        int               `json:"size"`
		Annotations map[string]string `json:"annotations,omitempty"`
		Platform    map[string]string `json:"platform,omitempty"`
	}
	blobs := map[string][]byte{}
	describe := func(mediaType string, b []byte) descriptor {
		d := digest(b)
		blobs[d] = b
		return descriptor{MediaType: mediaType, Digest: d, Size: len(b)}
	}
	created := time.Unix(0, 0).UTC().Format(time.RFC3339)
	config, err := json.Marshal(map[string]any{
		"created":      created,
		"architecture": "amd64",
		"os":           "linux",
		"config": map[string]any{
			"Entrypoint": []string{"/kvserver"},
			"Cmd":        cmd,
			"Env":        []string{"PATH=/"},
			"WorkingDir": "/",
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{digest(layer)}},
		"history": []map[string]string{
			{"created": created, "created_by": "cowmig internal/ctrtest WriteImage"},
		},
	})
	if err != nil {
		return fmt.Errorf("encode config: %w", err)
	}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaTypeManifest,
		"config":        describe(mediaTypeConfig, config),
		"layers":        []descriptor{describe(mediaTypeLayerGz, gz.Bytes())},
	})
	if err != nil {
		return fmt.Errorf("encode manifest: %w", err)
	}
	md := describe(mediaTypeManifest, manifest)
	md.Annotations = map[string]string{annotationImageName: ref, annotationRefName: ref[colon+1:]}
	md.Platform = map[string]string{"architecture": "amd64", "os": "linux"}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaTypeIndex,
		"manifests":     []descriptor{md},
	})
	if err != nil {
		return fmt.Errorf("encode index: %w", err)
	}

	var out bytes.Buffer
	tw := tar.NewWriter(&out)
	files := []tarEntry{
		{name: "oci-layout", data: []byte(`{"imageLayoutVersion":"1.0.0"}`), mode: 0o644},
		{name: "index.json", data: index, mode: 0o644},
		{name: "blobs/", dir: true, mode: 0o755},
		{name: "blobs/sha256/", dir: true, mode: 0o755},
	}
	for _, d := range []string{md.Digest, digest(config), digest(gz.Bytes())} {
		files = append(files, tarEntry{name: "blobs/sha256/" + strings.TrimPrefix(d, "sha256:"), data: blobs[d], mode: 0o644})
	}
	if err := writeTar(tw, files); err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("close archive: %w", err)
	}
	// Write then rename, so a reader never sees half an archive.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, out.Bytes(), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s: %w", tmp, err)
	}
	return nil
}

type tarEntry struct {
	name string
	data []byte
	mode int64
	dir  bool
}

// layerTar returns the uncompressed layer: /kvserver and empty /etc and
// /tmp (runc and nerdctl bind files into /etc; /tmp is sticky, as usual).
func layerTar(exe []byte) ([]byte, error) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	err := writeTar(tw, []tarEntry{
		{name: "etc/", dir: true, mode: 0o755},
		{name: "tmp/", dir: true, mode: 0o1777},
		{name: "kvserver", data: exe, mode: 0o755},
	})
	if err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close layer: %w", err)
	}
	return b.Bytes(), nil
}

// writeTar writes entries with a fixed owner and time, so equal inputs
// give byte-identical archives (and digests).
func writeTar(tw *tar.Writer, entries []tarEntry) error {
	for _, e := range entries {
		h := &tar.Header{
			Name:    e.name,
			Mode:    e.mode,
			ModTime: time.Unix(0, 0),
			Format:  tar.FormatPAX,
		}
		if e.dir {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return fmt.Errorf("tar header %s: %w", e.name, err)
		}
		if !e.dir {
			if _, err := tw.Write(e.data); err != nil {
				return fmt.Errorf("tar %s: %w", e.name, err)
			}
		}
	}
	return nil
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func cacheDir() (string, error) { return testworkload.CacheDir("ctrtest") }

// buildKVServer returns kvserver's binary in dir, compiling it if missing.
func buildKVServer(dir string) (string, error) {
	return testworkload.CompileC(dir, "kvserver", kvserverC, kvCflags)
}
