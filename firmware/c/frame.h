/*
 * UART framing between the device and its gateway (firmware/FIRMWARE.md, "UART frames").
 *
 * A frame: sync 0xA5 0x5A, u8 type, u8 flags (0), u16 seq, u16 length (<= FRAME_MAX_PAYLOAD),
 * the payload, then the CRC-32 (zlib) of bytes 2 .. 8 + length; all integers little-endian.
 *
 * The parser is fed one byte at a time and drained with frame_parser_next(): bytes are kept in
 * one frame-sized buffer, so after any error (bad CRC, oversize length, truncation by a timeout)
 * it drops only the first sync byte and searches the bytes it already holds for the next sync:
 * a real frame that arrived inside a bogus one (garbage that looked like a sync) is still found.
 * A frame whose seq equals the previous accepted one is a replay and is dropped. Errors are
 * counted by kind for the device's status frames. C99, no heap, no stdio.
 */
#ifndef FRAME_H
#define FRAME_H

#include <stddef.h>
#include <stdint.h>

#define FRAME_SYNC0 0xA5u
#define FRAME_SYNC1 0x5Au
#define FRAME_HEADER_BYTES 8u
#define FRAME_CRC_BYTES 4u
#define FRAME_MAX_PAYLOAD 4352u
#define FRAME_MAX_BYTES (FRAME_HEADER_BYTES + FRAME_MAX_PAYLOAD + FRAME_CRC_BYTES)
/* A frame that stops arriving for this long is dropped as truncated: at 115200 baud one byte
 * takes 87 us, so 200 ms is a stalled sender, not a slow one. */
#define FRAME_TIMEOUT_MS 200u

/* Host -> device types */
#define FRAME_MANIFEST 0x01u
#define FRAME_CHUNK 0x02u
#define FRAME_WINDOW 0x03u
#define FRAME_SUMMARY_NOW 0x04u
#define FRAME_PING 0x05u
/* Device -> host types */
#define FRAME_HELLO 0x81u
#define FRAME_REQUEST 0x82u
#define FRAME_STATUS 0x83u
#define FRAME_SCORES 0x84u
#define FRAME_SUMMARY 0x85u
#define FRAME_LOG 0x86u
#define FRAME_PONG 0x87u
#define FRAME_ERROR 0x88u

/* Results of frame_parser_next/tick: FRAME_NONE, FRAME_READY, or minus an error kind. */
#define FRAME_NONE 0
#define FRAME_READY 1

/* Error kinds: the FRAME_ERROR codes and the indices of frame_parser_t.errors. The parser
 * detects the first four; the application reports the last two through frame_parser_count. */
typedef enum {
    FRAME_ERR_CRC = 1,
    FRAME_ERR_LENGTH = 2,
    FRAME_ERR_TRUNCATED = 3,
    FRAME_ERR_REPLAY = 4,
    FRAME_ERR_TYPE = 5,     /* unknown frame type */
    FRAME_ERR_MALFORMED = 6 /* payload does not match its type's layout */
} frame_error_t;
#define FRAME_N_ERRORS 7 /* errors[1..6] used */

typedef struct {
    uint8_t type;
    uint8_t flags;
    uint16_t seq;            /* for an error: the seq of the dropped frame, 0 when its header was incomplete */
    uint16_t length;
    const uint8_t *payload;  /* valid until the next feed/next/tick call */
} frame_t;

typedef struct {
    uint8_t buf[FRAME_MAX_BYTES]; /* the candidate frame, starting at a sync byte */
    size_t used;
    size_t consumed;        /* bytes of the frame last returned, dropped at the next call */
    uint32_t last_byte_ms;
    uint16_t last_seq;
    int has_last_seq;
    uint16_t errors[FRAME_N_ERRORS]; /* saturating counts by frame_error_t */
} frame_parser_t;

void frame_parser_init(frame_parser_t *p);
/* Append one byte; -1 when the buffer is full (frame_parser_next was not drained first). */
int frame_parser_feed(frame_parser_t *p, uint8_t byte, uint32_t now_ms);
/* The next event in the buffered bytes; call until FRAME_NONE after every feed. */
int frame_parser_next(frame_parser_t *p, frame_t *out);
/* -FRAME_ERR_TRUNCATED when a partial frame has had no byte for FRAME_TIMEOUT_MS (then drain
 * frame_parser_next: the remaining bytes are searched again); FRAME_NONE otherwise. */
int frame_parser_tick(frame_parser_t *p, uint32_t now_ms, frame_t *out);
/* Count an error the application found in a frame the parser accepted. */
void frame_parser_count(frame_parser_t *p, frame_error_t kind);

/* Write header and CRC around a payload: out gets FRAME_HEADER_BYTES + len + FRAME_CRC_BYTES
 * bytes; payload may already sit at out + FRAME_HEADER_BYTES. Returns the frame size, 0 when
 * len > FRAME_MAX_PAYLOAD or cap is too small. */
size_t frame_encode(uint8_t type, uint16_t seq, const uint8_t *payload, size_t len, uint8_t *out, size_t cap);

/* Little-endian payload writer with one overflow flag checked at the end (no check per field). */
typedef struct {
    uint8_t *buf;
    size_t cap;
    size_t len;
    int overflow;
} frame_writer_t;

void frame_writer_init(frame_writer_t *w, uint8_t *buf, size_t cap);
void frame_put_u8(frame_writer_t *w, uint8_t v);
void frame_put_u16(frame_writer_t *w, uint16_t v);
void frame_put_u32(frame_writer_t *w, uint32_t v);
void frame_put_u64(frame_writer_t *w, uint64_t v);
void frame_put_f32(frame_writer_t *w, float v);
void frame_put_bytes(frame_writer_t *w, const uint8_t *data, size_t len);
/* str8: u8 length then the bytes; longer than 255 bytes sets overflow. */
void frame_put_str8(frame_writer_t *w, const char *text);

/* Little-endian payload reader: reading past the end sets overflow and yields zeros. */
typedef struct {
    const uint8_t *buf;
    size_t len;
    size_t pos;
    int overflow;
} frame_reader_t;

void frame_reader_init(frame_reader_t *r, const uint8_t *buf, size_t len);
uint8_t frame_get_u8(frame_reader_t *r);
uint16_t frame_get_u16(frame_reader_t *r);
uint32_t frame_get_u32(frame_reader_t *r);
float frame_get_f32(frame_reader_t *r);
/* Pointer to the next n bytes (NULL and overflow when fewer remain). */
const uint8_t *frame_get_bytes(frame_reader_t *r, size_t n);

#endif /* FRAME_H */
