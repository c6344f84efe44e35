# gokvm-ft: see README.md.
GO       ?= go
BIN      := bin/gokvm-ft
GOFLAGS  ?=
# Tests that touch /dev/kvm run one package at a time: the lab has 2 cores
# and timing-sensitive guests should not fight each other for them.
TESTFLAGS ?= -p 1 -count=1 -timeout 20m
# The bounded fuzz runs (virtio descriptor chains, snapshot, log and sync-point decoders) in make test.
FUZZTIME ?= 30s

.PHONY: all build images run test race vet fmt bench bench-boot bench-net demo clean

all: build

build:
	$(GO) build $(GOFLAGS) -o $(BIN) ./cmd/gokvm-ft

# The bundled guest: Linux 6.1 + u-root initramfs in images/out (cached
# outside the repo, so a second run takes seconds).
images:
	$(MAKE) -C images

# The main job: boot the bundled kernel + initramfs to a shell.
run: build images
	./$(BIN)

# The whole test suite, as CI runs it (one test boots the bundled images).
test: vet images
	$(GO) test $(TESTFLAGS) ./...
	$(GO) test $(TESTFLAGS) -race ./machine/... ./kvm/... ./virtio/... ./tap/... ./snapshot/... ./migrate/... ./ft/...
	$(GO) test -run '^$$' -fuzz '^FuzzChain$$' -fuzztime $(FUZZTIME) ./virtio/
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 3s ./snapshot/
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 3s ./ft/ftlog/
	$(GO) test -run '^$$' -fuzz '^FuzzSyncPoint$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 3s ./machine/
	$(MAKE) -C images test

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

fmt:
	gofmt -w $$(git ls-files '*.go')

# Exit round trip of gokvm-ft against a minimal C VMM (see BENCHMARKS.md).
bench:
	$(GO) run ./cmd/exitbench

# Start -> first userspace output, gokvm-ft vs QEMU on the same images.
bench-boot: images
	$(GO) run ./cmd/bootbench

# TCP throughput host<->guest, gokvm-ft vs QEMU virtio-net on the same
# images (needs root: network namespaces and taps).
bench-net: images
	$(GO) run ./cmd/netbench

# The FT lab as a one-command demonstration (needs root: network
# namespaces, a bridge, taps): a protected Linux guest serving a client, its
# primary killed mid-stream, the backup live, re-protection and a planned
# switchover, printed as a timeline.
demo: images
	GOKVM_FT_DEMO=1 $(GO) test -count=1 -run '^TestLinuxPairFailover$$' -v ./cmd/gokvm-ft

clean:
	rm -rf bin
