# cowmig build entry points. Everything works from a clean checkout on
# Debian 12 with Go at /usr/local/go: `make deps` installs the rest.

GO ?= /usr/local/go/bin/go
GOFMT ?= $(dir $(GO))gofmt
PREFIX ?= /usr/local
BINDIR := bin

# Tools that go test and go generate call (gofmt, protoc plugins installed
# by go install) are found through PATH.
export PATH := $(dir $(GO)):$(PATH)

.PHONY: all deps build vet test test-short bench demo demo-process install clean generate fmt-check

all: build

# deps installs apt packages and sysctls (deps.sh), then containerd, ctr,
# the runc shim, runc and nerdctl (containerd-deps.sh).
deps:
	bash scripts/deps.sh
	GO=$(GO) bash scripts/containerd-deps.sh

# The cmd/ packages may not exist yet in a young tree; build them once they do.
build:
	@mkdir -p $(BINDIR)
	@if find cmd -name '*.go' ! -name '*_test.go' 2>/dev/null | grep -q .; then \
		echo "$(GO) build -o $(BINDIR)/ ./cmd/..."; \
		$(GO) build -o $(BINDIR)/ ./cmd/...; \
	else \
		echo "build: no Go packages under cmd/ yet, nothing to build"; \
	fi

vet:
	$(GO) vet ./...

# Tests use the real kernel and need root; CI runs as root.
test: deps build vet
	$(GO) test -count=1 -timeout 40m ./...

test-short:
	$(GO) test -short -count=1 ./...

bench: deps build
	GO=$(GO) bash scripts/bench.sh

# demo: two containerd hosts, a container migrated live with ctr.
demo: deps build
	GO=$(GO) bash scripts/demo.sh

# demo-process: the engine alone, a live clone of a Python process.
demo-process: deps build
	GO=$(GO) bash scripts/demo-process.sh

# install puts the shim and cowmig on PATH, the containerd drop-in in
# conf.d and an example shim config (kept if one exists).
SYSCONFDIR ?= /etc
install: build
	@install -d $(DESTDIR)$(PREFIX)/bin
	@set -e; for f in $(BINDIR)/*; do \
		[ -f "$$f" ] || continue; \
		echo "install $$f $(DESTDIR)$(PREFIX)/bin/"; \
		install -m 0755 "$$f" $(DESTDIR)$(PREFIX)/bin/; \
	done
	install -D -m 0644 config/cowmig.toml $(DESTDIR)$(SYSCONFDIR)/containerd/conf.d/cowmig.toml
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/cowmig/config.toml ]; then \
		echo "keep $(DESTDIR)$(SYSCONFDIR)/cowmig/config.toml"; \
	else \
		echo "install config/config.toml $(DESTDIR)$(SYSCONFDIR)/cowmig/config.toml"; \
		install -D -m 0644 config/config.toml $(DESTDIR)$(SYSCONFDIR)/cowmig/config.toml; \
	fi

clean:
	rm -rf $(BINDIR)

generate:
	$(GO) generate ./...

fmt-check:
	@out=$$($(GOFMT) -l .); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi
