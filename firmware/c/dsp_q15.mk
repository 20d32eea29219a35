# Host builds of the fixed-point DSP front end (dsp_q15.c), into build/ (git-ignored):
#   make -f dsp_q15.mk libdsp_q15.so         the library firmware/dsp_q15.py loads with ctypes
#   make -f dsp_q15.mk libdsp_q15_split.so   the same with ARMv6-M's 16-bit-half multiplies
#                                            (-DDSPQ_SPLIT_MUL), to check they are bit-identical
CC = gcc
CFLAGS = -O2 -std=c99 -pedantic -Wall -Wextra -Werror -Wdouble-promotion -Wconversion -Wshadow -fPIC
BUILD = build

.PHONY: all libdsp_q15.so libdsp_q15_split.so
all: libdsp_q15.so libdsp_q15_split.so

libdsp_q15.so: $(BUILD)/libdsp_q15.so
libdsp_q15_split.so: $(BUILD)/libdsp_q15_split.so

# written under a per-process name, then renamed: a concurrent loader never sees half a library
$(BUILD)/libdsp_q15.so: dsp_q15.c dsp_q15.h dsp_q15.mk
	mkdir -p $(BUILD)
	$(CC) $(CFLAGS) -shared -o $@.$$$$.tmp dsp_q15.c -lm && mv -f $@.$$$$.tmp $@

$(BUILD)/libdsp_q15_split.so: dsp_q15.c dsp_q15.h dsp_q15.mk
	mkdir -p $(BUILD)
	$(CC) $(CFLAGS) -DDSPQ_SPLIT_MUL -shared -o $@.$$$$.tmp dsp_q15.c -lm && mv -f $@.$$$$.tmp $@
