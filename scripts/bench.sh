#!/usr/bin/env bash
# bench.sh: run cowmig's benchmarks. Placeholder: runs every Go benchmark
# three times; the real benchmark driver replaces it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
GO=${GO:-/usr/local/go/bin/go}
exec "$GO" test -run '^$' -bench . -benchtime 3x ./...
