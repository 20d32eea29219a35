/*
 * Differential fuzz driver for frame.c, built with AddressSanitizer and UBSan by device.mk:
 * tests/test_device_firmware_c.py streams cases through stdin and compares the events with
 * firmware/frames.py's FrameParser; a memory error aborts this process, not pytest.
 *
 * stdin, repeated: 'B' u16 n, n bytes (fed one at a time, draining after each, as the device
 * does) | 'T' (the line stays silent past FRAME_TIMEOUT_MS) | 'E' (end of case: write the events
 * and reset) | 'Q'. stdout per case: u32 n_events, then per event i8 result (FRAME_READY or
 * minus the error kind), u8 type, u16 seq, u16 length, the payload; then u16 errors[1..6].
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "frame.h"

#define MAX_EVENTS 65536
#define OUT_BYTES (16u * 1024u * 1024u)

static frame_parser_t parser;
static unsigned char out[OUT_BYTES];
static size_t out_len;
static unsigned n_events;

static void emit(const void *data, size_t len) {
    if (len > OUT_BYTES - out_len) {
        fprintf(stderr, "driver: output buffer full\n");
        exit(2);
    }
    memcpy(out + out_len, data, len);
    out_len += len;
}

static void emit16(unsigned v) {
    unsigned char b[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
    emit(b, 2);
}

static void record(int event, const frame_t *f) {
    signed char code = (signed char)event;
    emit(&code, 1);
    emit(event == FRAME_READY ? &f->type : (const uint8_t *)"\0", 1);
    emit16(f->seq);
    emit16(event == FRAME_READY ? f->length : 0u);
    if (event == FRAME_READY) {
        emit(f->payload, f->length);
    }
    n_events++;
}

static void drain(int event, frame_t *f) {
    while (event != FRAME_NONE) {
        record(event, f);
        event = frame_parser_next(&parser, f);
    }
}

static int read_exact(void *buf, size_t n) { return fread(buf, 1, n, stdin) == n; }

int main(void) {
    uint32_t now = 0;
    frame_parser_init(&parser);
    for (;;) {
        int op = getchar();
        frame_t f;
        if (op == EOF || op == 'Q') {
            return 0;
        }
        if (op == 'B') {
            unsigned char len_le[2];
            static unsigned char data[65536];
            if (!read_exact(len_le, 2)) return 1;
            size_t n = (size_t)len_le[0] | (size_t)len_le[1] << 8;
            if (!read_exact(data, n)) return 1;
            for (size_t i = 0; i < n; i++) {
                if (frame_parser_feed(&parser, data[i], now) != 0) {
                    fprintf(stderr, "driver: parser buffer full after draining\n");
                    return 3;
                }
                drain(frame_parser_next(&parser, &f), &f);
            }
        } else if (op == 'T') {
            now += FRAME_TIMEOUT_MS;
            drain(frame_parser_tick(&parser, now, &f), &f);
        } else if (op == 'E') {
            unsigned char count[4] = {(unsigned char)n_events, (unsigned char)(n_events >> 8),
                                      (unsigned char)(n_events >> 16), (unsigned char)(n_events >> 24)};
            fwrite(count, 1, 4, stdout);
            fwrite(out, 1, out_len, stdout);
            for (int k = 1; k < FRAME_N_ERRORS; k++) {
                unsigned char e[2] = {(unsigned char)parser.errors[k], (unsigned char)(parser.errors[k] >> 8)};
                fwrite(e, 1, 2, stdout);
            }
            fflush(stdout);
            out_len = 0;
            n_events = 0;
            frame_parser_init(&parser);
        } else {
            fprintf(stderr, "driver: unknown op %d\n", op);
            return 1;
        }
    }
}
