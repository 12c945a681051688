#!/bin/sh
# Regenerates pages.pb.go and pages_ttrpc.pb.go from pages.proto.
# Installs the pinned code generators when they are missing; protoc itself
# comes from the system (Debian: apt-get install -y protobuf-compiler).
set -eu

PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_TTRPC_VERSION=v1.2.10

cd "$(dirname "$0")"

GOBIN="$(go env GOPATH | cut -d: -f1)/bin"
export PATH="$GOBIN:$PATH"

if ! command -v protoc >/dev/null 2>&1; then
	echo "generate.sh: protoc not found; install it (apt-get install -y protobuf-compiler)" >&2
	exit 1
fi
if ! command -v protoc-gen-go >/dev/null 2>&1; then
	go install "google.golang.org/protobuf/cmd/protoc-gen-go@${PROTOC_GEN_GO_VERSION}"
fi
if ! command -v protoc-gen-go-ttrpc >/dev/null 2>&1; then
	go install "github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc@${PROTOC_GEN_GO_TTRPC_VERSION}"
fi

protoc \
	--proto_path=. \
	--go_out=. --go_opt=paths=source_relative \
	--go-ttrpc_out=. --go-ttrpc_opt=paths=source_relative \
	pages.proto
