/* UART framing: see frame.h and firmware/FIRMWARE.md. C99, no heap, no stdio. */
#include "frame.h"

#include <string.h>

#include "ota_receiver.h" /* ota_crc32: one CRC-32 in the image */

static uint16_t get16(const uint8_t *b) { return (uint16_t)(b[0] | b[1] << 8); }

static uint32_t get32(const uint8_t *b) {
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

void frame_parser_init(frame_parser_t *p) { memset(p, 0, sizeof *p); }

void frame_parser_count(frame_parser_t *p, frame_error_t kind) {
    if ((int)kind > 0 && (int)kind < FRAME_N_ERRORS && p->errors[kind] < UINT16_MAX) {
        p->errors[kind]++;
    }
}

static void drop(frame_parser_t *p, size_t n) {
    memmove(p->buf, p->buf + n, p->used - n);
    p->used -= n;
}

/* The frame returned last is dropped only now: its payload stayed valid until this call. */
static void drop_consumed(frame_parser_t *p) {
    if (p->consumed > 0) {
        drop(p, p->consumed);
        p->consumed = 0;
    }
}

/* Keep the buffer starting at a sync (or at a lone first sync byte still waiting for the second). */
static void resync(frame_parser_t *p) {
    size_t i = 0;
    while (i < p->used && !(p->buf[i] == FRAME_SYNC0 && (i + 1 == p->used || p->buf[i + 1] == FRAME_SYNC1))) {
        i++;
    }
    if (i > 0) {
        drop(p, i);
    }
}

/* Count an error, drop the candidate's first sync byte (the rest is searched again) and report it. */
static int fail(frame_parser_t *p, frame_error_t kind, uint16_t seq, frame_t *out) {
    frame_parser_count(p, kind);
    drop(p, 1);
    memset(out, 0, sizeof *out);
    out->seq = seq;
    return -(int)kind;
}

int frame_parser_feed(frame_parser_t *p, uint8_t byte, uint32_t now_ms) {
    drop_consumed(p);
    if (p->used >= sizeof p->buf) {
        return -1;
    }
    p->buf[p->used++] = byte;
    p->last_byte_ms = now_ms;
    return 0;
}

int frame_parser_next(frame_parser_t *p, frame_t *out) {
    drop_consumed(p);
    resync(p);
    if (p->used < FRAME_HEADER_BYTES) {
        return FRAME_NONE;
    }
    uint16_t seq = get16(p->buf + 4);
    uint16_t length = get16(p->buf + 6);
    if (length > FRAME_MAX_PAYLOAD) {
        return fail(p, FRAME_ERR_LENGTH, seq, out);
    }
    size_t total = FRAME_HEADER_BYTES + length + FRAME_CRC_BYTES;
    if (p->used < total) {
        return FRAME_NONE;
    }
    if (ota_crc32(p->buf + 2, FRAME_HEADER_BYTES - 2u + length) != get32(p->buf + FRAME_HEADER_BYTES + length)) {
        return fail(p, FRAME_ERR_CRC, seq, out);
    }
    out->type = p->buf[2];
    out->flags = p->buf[3];
    out->seq = seq;
    out->length = length;
    out->payload = p->buf + FRAME_HEADER_BYTES;
    if (p->has_last_seq && seq == p->last_seq) {
        /* intact but already handled (a sender's retry after a lost reply): drop it whole */
        frame_parser_count(p, FRAME_ERR_REPLAY);
        drop(p, total);
        out->payload = NULL;
        out->length = 0;
        return -(int)FRAME_ERR_REPLAY;
    }
    p->last_seq = seq;
    p->has_last_seq = 1;
    p->consumed = total;
    return FRAME_READY;
}

int frame_parser_tick(frame_parser_t *p, uint32_t now_ms, frame_t *out) {
    drop_consumed(p);
    resync(p);
    if (p->used == 0 || (uint32_t)(now_ms - p->last_byte_ms) < FRAME_TIMEOUT_MS) {
        return FRAME_NONE;
    }
    if (p->used < 2) {
        p->used = 0; /* a lone first sync byte is no frame: nothing to report (as frames.py) */
        return FRAME_NONE;
    }
    return fail(p, FRAME_ERR_TRUNCATED, p->used >= FRAME_HEADER_BYTES ? get16(p->buf + 4) : 0, out);
}

static void put16(uint8_t *b, uint16_t v) {
    b[0] = (uint8_t)v;
    b[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *b, uint32_t v) {
    put16(b, (uint16_t)v);
    put16(b + 2, (uint16_t)(v >> 16));
}

size_t frame_encode(uint8_t type, uint16_t seq, const uint8_t *payload, size_t len, uint8_t *out, size_t cap) {
    size_t total = FRAME_HEADER_BYTES + len + FRAME_CRC_BYTES;
    if (out == NULL || (payload == NULL && len > 0) || len > FRAME_MAX_PAYLOAD || cap < total) {
        return 0;
    }
    if (len > 0) {
        memmove(out + FRAME_HEADER_BYTES, payload, len); /* may already be in place */
    }
    out[0] = FRAME_SYNC0;
    out[1] = FRAME_SYNC1;
    out[2] = type;
    out[3] = 0;
    put16(out + 4, seq);
    put16(out + 6, (uint16_t)len);
    put32(out + FRAME_HEADER_BYTES + len, ota_crc32(out + 2, FRAME_HEADER_BYTES - 2u + len));
    return total;
}

/* ---- payload writer and reader ---- */

void frame_writer_init(frame_writer_t *w, uint8_t *buf, size_t cap) {
    w->buf = buf;
    w->cap = cap;
    w->len = 0;
    w->overflow = 0;
}

void frame_put_bytes(frame_writer_t *w, const uint8_t *data, size_t len) {
    if (w->overflow || len > w->cap - w->len) {
        w->overflow = 1;
        return;
    }
    if (len > 0) {
        memcpy(w->buf + w->len, data, len);
    }
    w->len += len;
}

void frame_put_u8(frame_writer_t *w, uint8_t v) { frame_put_bytes(w, &v, 1); }

void frame_put_u16(frame_writer_t *w, uint16_t v) {
    uint8_t b[2];
    put16(b, v);
    frame_put_bytes(w, b, sizeof b);
}

void frame_put_u32(frame_writer_t *w, uint32_t v) {
    uint8_t b[4];
    put32(b, v);
    frame_put_bytes(w, b, sizeof b);
}

void frame_put_u64(frame_writer_t *w, uint64_t v) {
    frame_put_u32(w, (uint32_t)v);
    frame_put_u32(w, (uint32_t)(v >> 32));
}

void frame_put_f32(frame_writer_t *w, float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    frame_put_u32(w, bits);
}

void frame_put_str8(frame_writer_t *w, const char *text) {
    size_t n = text != NULL ? strlen(text) : 0;
    if (n > 255) {
        w->overflow = 1;
        return;
    }
    frame_put_u8(w, (uint8_t)n);
    frame_put_bytes(w, (const uint8_t *)text, n);
}

void frame_reader_init(frame_reader_t *r, const uint8_t *buf, size_t len) {
    r->buf = buf;
    r->len = len;
    r->pos = 0;
    r->overflow = 0;
}

const uint8_t *frame_get_bytes(frame_reader_t *r, size_t n) {
    if (r->overflow || n > r->len - r->pos) {
        r->overflow = 1;
        return NULL;
    }
    const uint8_t *at = r->buf + r->pos;
    r->pos += n;
    return at;
}

uint8_t frame_get_u8(frame_reader_t *r) {
    const uint8_t *b = frame_get_bytes(r, 1);
    return b != NULL ? b[0] : 0;
}

uint16_t frame_get_u16(frame_reader_t *r) {
    const uint8_t *b = frame_get_bytes(r, 2);
    return b != NULL ? get16(b) : 0;
}

uint32_t frame_get_u32(frame_reader_t *r) {
    const uint8_t *b = frame_get_bytes(r, 4);
    return b != NULL ? get32(b) : 0;
}

float frame_get_f32(frame_reader_t *r) {
    uint32_t bits = frame_get_u32(r);
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}
