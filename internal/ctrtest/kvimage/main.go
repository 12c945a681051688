// Command kvimage writes the OCI image archive of the kvserver workload
// (internal/ctrtest) for scripts: go run ./internal/ctrtest/kvimage -o FILE.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cowmig/cowmig/internal/ctrtest"
)

func main() {
	out := flag.String("o", "kvserver.tar", "archive to write")
	ref := flag.String("ref", ctrtest.ImageRef, "image reference")
	flag.Parse()
	dir, err := os.UserCacheDir()
	if err == nil {
		dir = filepath.Join(dir, "cowmig", "ctrtest")
		err = os.MkdirAll(dir, 0o755)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "kvimage: cache dir: %v\n", err)
		os.Exit(1)
	}
	bin, err := ctrtest.BuildKVServerIn(dir)
	if err == nil {
		err = ctrtest.WriteImage(*out, *ref, bin, ctrtest.DefaultCmd())
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "kvimage: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(*ref)
}
