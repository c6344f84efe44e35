# gokvm-ft: see README.md.
GO       ?= go
BIN      := bin/gokvm-ft
GOFLAGS  ?=
# Tests that touch /dev/kvm run one package at a time: the lab has 2 cores
# and timing-sensitive guests should not fight each other for them.
TESTFLAGS ?= -p 1 -count=1 -timeout 20m

.PHONY: all build run test race vet fmt bench clean

all: build

build:
	$(GO) build $(GOFLAGS) -o $(BIN) ./cmd/gokvm-ft

# The main job: boot the bundled kernel + initramfs to a shell.
run: build
	./$(BIN)

# The whole test suite, as CI runs it.
test: vet
	$(GO) test $(TESTFLAGS) ./...
	$(GO) test $(TESTFLAGS) -race ./machine/... ./kvm/...

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

fmt:
	gofmt -w $$(git ls-files '*.go')

# Exit round trip of gokvm-ft against a minimal C VMM (see BENCHMARKS.md).
bench:
	$(GO) run ./cmd/exitbench

clean:
	rm -rf bin
