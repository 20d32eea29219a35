# Host builds of the device application's pieces, for tests/test_device_firmware_c.py (the
# firmware image itself: Makefile.arm). Run from anywhere: make -f firmware/c/device.mk <target>
#   host-lib     build/libdevice_host.so: frame, slots, Ed25519 (Monocypher), OTA receiver, for ctypes
#   frame-fuzz   build/test_frame_driver: frame.c under AddressSanitizer + UBSan, a differential fuzz driver
DEVICE_MK_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
include $(DEVICE_MK_DIR)/third_party.mk

HOST_CC ?= gcc
HOST_BUILD = $(DEVICE_MK_DIR)/build
# The sources parse untrusted bytes: the strict set of the OTA receiver, as errors.
STRICT_CFLAGS = -std=c99 -Wall -Wextra -Werror -pedantic -Wconversion -Wshadow -Wcast-qual -Wdouble-promotion
HOST_SRC = $(addprefix $(DEVICE_MK_DIR)/,frame.c slots.c ed25519_verify.c ota_receiver.c)
HOST_HDR = $(wildcard $(DEVICE_MK_DIR)/*.h)

.PHONY: host-lib frame-fuzz
host-lib: $(HOST_BUILD)/libdevice_host.so
frame-fuzz: $(HOST_BUILD)/test_frame_driver

# written under a per-process name, then renamed: a concurrent loader never sees half a file
$(HOST_BUILD)/libdevice_host.so: $(HOST_SRC) $(HOST_HDR) $(MONOCYPHER_SRC) $(MONOCYPHER_HDR) $(DEVICE_MK_DIR)/device.mk
	mkdir -p $(HOST_BUILD)
	$(HOST_CC) -O2 -fPIC $(MONOCYPHER_CFLAGS) -c -o $@.monocypher.$$$$.o $(MONOCYPHER_SRC) && \
	$(HOST_CC) -O2 -fPIC -shared $(STRICT_CFLAGS) -I$(MONOCYPHER_DIR) -o $@.$$$$.tmp $(HOST_SRC) $@.monocypher.$$$$.o -lm && \
	rm -f $@.monocypher.$$$$.o && mv -f $@.$$$$.tmp $@

$(HOST_BUILD)/test_frame_driver: $(DEVICE_MK_DIR)/test_frame_driver.c $(DEVICE_MK_DIR)/frame.c $(DEVICE_MK_DIR)/ota_receiver.c $(HOST_HDR) $(DEVICE_MK_DIR)/device.mk
	mkdir -p $(HOST_BUILD)
	$(HOST_CC) -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -std=c99 -Wall -Wextra -Werror \
	    -o $@.$$$$.tmp $(DEVICE_MK_DIR)/test_frame_driver.c $(DEVICE_MK_DIR)/frame.c $(DEVICE_MK_DIR)/ota_receiver.c -lm && \
	mv -f $@.$$$$.tmp $@
