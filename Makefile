# bhyve-rs build entry points. `make WITH_BHYVE_SNAPSHOT=yes` turns on snapshot support, as the
# WITH_BHYVE_SNAPSHOT knob does in FreeBSD's build.

CARGO    ?= cargo
PREFIX   ?= /usr/local
BINDIR   ?= $(PREFIX)/sbin
MANDIR   ?= $(PREFIX)/share/man
FREEBSD_TARGET := x86_64-unknown-freebsd

SNAPSHOT_FEATURES := --features bhyve-rs/bhyve_snapshot,bhyvectl-rs/bhyve_snapshot
# Release binaries with snapshots live in their own target directory, so a build without them
# (`make`, `cargo build --release`) never replaces the ones `make demo` or
# `make WITH_BHYVE_SNAPSHOT=yes` made, and `bhyve -r` does not become an illegal option.
SNAPSHOT_TARGET_DIR := target/snapshot
ifneq ($(filter yes YES true 1,$(WITH_BHYVE_SNAPSHOT)),)
FEATURES := $(SNAPSHOT_FEATURES) --target-dir $(SNAPSHOT_TARGET_DIR)
RELEASE_DIR := $(SNAPSHOT_TARGET_DIR)/release
else
RELEASE_DIR := target/release
endif

MANPAGES := $(wildcard man/*.[1-9])

.PHONY: all build test fmt clippy linux-guest test-default test-snapshot link-freebsd lint-man install demo \
	bench clean

all: build

build:
	$(CARGO) build --release --workspace $(FEATURES)

test: fmt clippy linux-guest test-default test-snapshot link-freebsd lint-man

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --workspace --all-targets $(SNAPSHOT_FEATURES) -- -D warnings

# The Linux test guest of tests/linux-guest, from Debian packages: rebuilt only when its inputs
# change and cached in ~/.cache/bhyve-rs/linux-guest; the first kernel build takes about 10
# minutes of 2 cores. Without its packages the Linux tests skip, unless
# BHYVE_RS_REQUIRE_LINUX_GUEST=1 (CI), which makes a missing image an error here and there.
linux-guest:
	@status=0; bash tests/linux-guest/build.sh || status=$$?; \
	if [ $$status -eq 3 ] && [ "$${BHYVE_RS_REQUIRE_LINUX_GUEST:-}" != 1 ]; then \
		echo "linux-guest: not built, the Linux tests will skip (tests/install-deps.sh installs its packages)" >&2; \
	elif [ $$status -ne 0 ]; then \
		exit $$status; \
	fi

# --no-fail-fast: one failing test binary does not hide the others; cargo still exits non-zero.
test-default:
	$(CARGO) build --workspace
	$(CARGO) test --workspace --no-fail-fast

test-snapshot:
	$(CARGO) build --workspace $(SNAPSHOT_FEATURES)
	# The snapshot tests also talk to a bhyve built without snapshots; build it before they run
	# rather than while they run.
	$(CARGO) build -p bhyve-rs --bin bhyve --target-dir target/e2e-without-snapshot
	$(CARGO) test --workspace --no-fail-fast $(SNAPSHOT_FEATURES)

# What `make test` proves for FreeBSD without a FreeBSD machine: every target of the workspace
# (bhyve, bhyvectl, every test binary) compiles and links for x86_64-unknown-freebsd, with and
# without snapshots, through cargo-zigbuild and zig from PyPI (tests/install-deps.sh) against
# FreeBSD 14's libc; vmm-sys/tests/freebsd_link.rs then reads the bhyve and bhyvectl files and
# checks they are FreeBSD amd64 executables (ELF header, /libexec/ld-elf.so.1, FreeBSD ABI note,
# libc.so.7). The ABI check against FreeBSD's own headers from the zig wheel,
# vmm-sys/tests/zig_headers.rs, runs with the other tests. Nothing here runs on FreeBSD itself.
FREEBSD_LINK_DIR := $(CURDIR)/target/freebsd-link
FREEBSD_DEBUG_DIR := target/$(FREEBSD_TARGET)/debug
FREEBSD_LINKED := $(foreach kind,default snapshot,\
	$(FREEBSD_LINK_DIR)/$(kind)/bhyve $(FREEBSD_LINK_DIR)/$(kind)/bhyvectl)

link-freebsd:
	@command -v cargo-zigbuild >/dev/null || \
		{ echo "cargo-zigbuild not found: run tests/install-deps.sh" >&2; exit 1; }
	rustup target add $(FREEBSD_TARGET)
	# Both builds write the same binary names; each is kept before the next build replaces it.
	$(CARGO) zigbuild --workspace --all-targets --target $(FREEBSD_TARGET)
	mkdir -p $(FREEBSD_LINK_DIR)/default $(FREEBSD_LINK_DIR)/snapshot
	cp $(FREEBSD_DEBUG_DIR)/bhyve $(FREEBSD_DEBUG_DIR)/bhyvectl $(FREEBSD_LINK_DIR)/default/
	$(CARGO) zigbuild --workspace --all-targets --target $(FREEBSD_TARGET) $(SNAPSHOT_FEATURES)
	cp $(FREEBSD_DEBUG_DIR)/bhyve $(FREEBSD_DEBUG_DIR)/bhyvectl $(FREEBSD_LINK_DIR)/snapshot/
	BHYVE_RS_FREEBSD_BINARIES=$$(echo $(FREEBSD_LINKED) | tr ' ' :) \
		$(CARGO) test -p vmm-sys --test freebsd_link

lint-man:
	mandoc -T lint -W warning -I os=FreeBSD $(MANPAGES)

install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8
	install -m 0755 $(RELEASE_DIR)/bhyve $(RELEASE_DIR)/bhyvectl $(DESTDIR)$(BINDIR)/
	for page in $(MANPAGES); do \
		section=$${page##*.}; \
		install -m 0644 $$page $(DESTDIR)$(MANDIR)/man$$section/; \
	done

# The demo shows snapshots, so it always builds them in.
demo:
	$(CARGO) build --release --workspace $(SNAPSHOT_FEATURES) --target-dir $(SNAPSHOT_TARGET_DIR)
	BHYVE_BIN_DIR=$(SNAPSHOT_TARGET_DIR)/release bash tests/demo.sh

# Snapshot save/restore figures and device throughput (virtio-blk, NVMe, AHCI, virtio-net, e1000), bhyve-rs
# and QEMU with KVM on the same guest; ignored tests, so `make test` never runs them (it runs a
# short smoke run of the device benchmark). The tables are also left in target/bench/
# (snapshot.txt, devices.txt). `make bench BENCH=device_bench` (or snapshot_bench) runs one.
BENCH ?=
bench:
	$(CARGO) build --release --workspace $(SNAPSHOT_FEATURES) --target-dir $(SNAPSHOT_TARGET_DIR)
	$(CARGO) test --release -p bhyve-rs --features bhyve_snapshot --target-dir $(SNAPSHOT_TARGET_DIR) \
		--test e2e_bench -- \
		--ignored --nocapture --test-threads=1 $(BENCH)

clean:
	$(CARGO) clean
