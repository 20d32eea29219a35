# Third-party C sources fetched at build time, never committed (FIRMWARE.md, "Sources").
#
# Monocypher (BSD-2-Clause / CC0) comes from the pymonocypher sdist on the package index, pinned
# by version and sha256 so a changed archive fails the build instead of entering the image. The
# sdist carries monocypher.c/.h only (not the optional monocypher-ed25519.c): ed25519_verify.c
# supplies the SHA-512 that standard Ed25519 needs.
#
# Include from any makefile; it defines MONOCYPHER_DIR, MONOCYPHER_SRC, MONOCYPHER_HDR,
# MONOCYPHER_CFLAGS (warnings for code we do not edit) and the rule that fetches them.
THIRD_PARTY_MK_DIR := $(dir $(lastword $(MAKEFILE_LIST)))
THIRD_PARTY_DIR ?= $(THIRD_PARTY_MK_DIR)build/third_party
PIP ?= $(firstword $(wildcard $(THIRD_PARTY_MK_DIR)../../.venv/bin/pip) pip)

PYMONOCYPHER_VERSION = 4.0.3.4
PYMONOCYPHER_SHA256 = 5e56e3d3eb770a53e0b9f6274146663c11a11f3d0de5cd48e3be0428d1b07a4a
PYMONOCYPHER_SDIST = $(THIRD_PARTY_DIR)/dl/pymonocypher-$(PYMONOCYPHER_VERSION).tar.gz

MONOCYPHER_DIR = $(THIRD_PARTY_DIR)/monocypher
MONOCYPHER_SRC = $(MONOCYPHER_DIR)/monocypher.c
MONOCYPHER_HDR = $(MONOCYPHER_DIR)/monocypher.h
MONOCYPHER_CFLAGS = -I$(MONOCYPHER_DIR) -Wno-unused-parameter

# --no-deps and no build: only the archive is wanted; the sha256 check rejects any other file.
$(PYMONOCYPHER_SDIST):
	mkdir -p $(dir $@)
	$(PIP) download --disable-pip-version-check --quiet --no-binary :all: --no-deps --no-build-isolation \
	    -d $(dir $@) pymonocypher==$(PYMONOCYPHER_VERSION)
	echo "$(PYMONOCYPHER_SHA256)  $@" | sha256sum -c --quiet

# Unpacked into a private directory and renamed: parallel builds never see half a tree.
$(MONOCYPHER_SRC) $(MONOCYPHER_HDR) &: $(PYMONOCYPHER_SDIST)
	rm -rf $(MONOCYPHER_DIR).$$$$ && mkdir -p $(MONOCYPHER_DIR).$$$$ && \
	tar -xzf $< -C $(MONOCYPHER_DIR).$$$$ --strip-components=1 \
	    pymonocypher-$(PYMONOCYPHER_VERSION)/monocypher.c pymonocypher-$(PYMONOCYPHER_VERSION)/monocypher.h \
	    pymonocypher-$(PYMONOCYPHER_VERSION)/LICENSE.txt && \
	rm -rf $(MONOCYPHER_DIR) && mv -T $(MONOCYPHER_DIR).$$$$ $(MONOCYPHER_DIR) && touch $(MONOCYPHER_SRC) $(MONOCYPHER_HDR)
