#!/usr/bin/env bash
# demo.sh: the end-to-end demo. Placeholder until the demo exists.
set -euo pipefail
echo "demo: not built yet" >&2
exit 1
