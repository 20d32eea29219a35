/*
 * OTA model receiver for the MCU: the device side of firmware/OTA_PROTOCOL.md (protocol version 1).
 *
 * A state machine without I/O, heap or stdio: the application feeds it the MQTT payloads of the
 * manifest and chunk topics and publishes the chunk requests it encodes. It checks the manifest
 * (CRC-32, fields, Ed25519 signature through the platform's callback, audience, version, MCU
 * profile, DSP spec version, model size against the staging slot, tensor arena against RAM),
 * assembles chunks (CRC-32 each, duplicates and any order accepted) into the caller's staging
 * buffer, tells which chunks are still missing (resume), and checks the sha256 of the whole model
 * before the application loads it. Return codes are identical to firmware.ota.RxStatus.
 */
#ifndef OTA_RECEIVER_H
#define OTA_RECEIVER_H

#include <stddef.h>
#include <stdint.h>

#define OTA_PROTOCOL_VERSION 1
#define OTA_TYPE_MANIFEST 1
#define OTA_TYPE_CHUNK 2
#define OTA_TYPE_REQUEST 3
#define OTA_MIN_CHUNK_SIZE 256
#define OTA_MAX_CHUNK_SIZE 4096
#define OTA_MAX_CHUNKS 4096
#define OTA_MAX_REQUEST_INDICES 64
#define OTA_MAX_NAME 64
#define OTA_MAX_TARGET 32
#define OTA_MAX_AUDIENCE 71
#define OTA_MAX_KEY_ID 32
#define OTA_MAX_DSP_BLOCK 1024
#define OTA_MAX_REF_BLOCK 1024 /* reference block: inputs and the outputs the model must give */
#define OTA_REF_HEADER_BYTES 7
#define OTA_MAX_REFERENCES 4
#define OTA_MAX_REF_VALUES 256
#define OTA_MAX_TOLERANCE_LSB 16
#define OTA_TAG_BYTES 8
#define OTA_SHA256_BYTES 32
#define OTA_SIGNATURE_BYTES 64
#define OTA_MANIFEST_HEADER_BYTES 64
#define OTA_CHUNK_HEADER_BYTES 22
#define OTA_REQUEST_HEADER_BYTES 18
#define OTA_CRC_BYTES 4
#define OTA_REQUEST_MAX_BYTES (OTA_REQUEST_HEADER_BYTES + 2 * OTA_MAX_REQUEST_INDICES + OTA_CRC_BYTES)
/* The largest valid manifest and chunk: the MQTT receive buffer the application needs. */
#define OTA_MANIFEST_MAX_BYTES                                                                                  \
    (OTA_MANIFEST_HEADER_BYTES + OTA_MAX_NAME + OTA_MAX_TARGET + OTA_MAX_AUDIENCE + OTA_MAX_KEY_ID +           \
     OTA_MAX_DSP_BLOCK + OTA_MAX_REF_BLOCK + OTA_SIGNATURE_BYTES + OTA_CRC_BYTES)
#define OTA_CHUNK_MAX_BYTES (OTA_CHUNK_HEADER_BYTES + OTA_MAX_CHUNK_SIZE + OTA_CRC_BYTES)

/* Result codes: >= 0 accepted, < 0 rejected. Same names and values as firmware.ota.RxStatus. */
typedef enum {
    OTA_OK = 0,
    OTA_DONE = 1,      /* chunk stored and it was the last one missing */
    OTA_DUPLICATE = 2, /* chunk already stored: ignored */
    OTA_SAME = 3,      /* manifest byte-identical to the last accepted one: nothing to do */
    OTA_ERR_NULL = -1,
    OTA_ERR_TRUNCATED = -2,
    OTA_ERR_MAGIC = -3,
    OTA_ERR_VERSION = -4,
    OTA_ERR_TYPE = -5,
    OTA_ERR_LENGTH = -6,
    OTA_ERR_CRC = -7,
    OTA_ERR_FIELD = -8,
    OTA_ERR_BAD_SIGNATURE = -9,
    OTA_ERR_UNKNOWN_KEY = -10,
    OTA_ERR_REVOKED_KEY = -11,
    OTA_ERR_WRONG_AUDIENCE = -12,
    OTA_ERR_NOT_NEWER = -13,
    OTA_ERR_WRONG_PROFILE = -14,
    OTA_ERR_DSP_VERSION = -15,
    OTA_ERR_TOO_LARGE = -16,
    OTA_ERR_ARENA = -17,
    OTA_ERR_NO_MANIFEST = -18,
    OTA_ERR_STALE = -19,
    OTA_ERR_INDEX = -20,
    OTA_ERR_INCOMPLETE = -21,
    OTA_ERR_SHA256 = -22,
    OTA_ERR_BUFFER = -23 /* output buffer too small; or the staging write callback failed */
} ota_status_t;

/*
 * Ed25519 verification, provided by the platform (e.g. Monocypher or the vendor's crypto):
 * return OTA_OK when `sig` (64 bytes) is the signature of msg[0..len) by the trusted key
 * `key_id`, else OTA_ERR_BAD_SIGNATURE, OTA_ERR_UNKNOWN_KEY or OTA_ERR_REVOKED_KEY.
 */
typedef int (*ota_verify_fn)(const uint8_t *msg, size_t len, const uint8_t *sig, const char *key_id);

/*
 * Staging in flash: writes `len` model bytes at `offset` of the staging slot (through the board's
 * flash driver); returns 0, or nonzero when the write failed.
 */
typedef int (*ota_write_fn)(uint32_t offset, const uint8_t *data, size_t len);

typedef struct {
    const char *device_id;  /* audience "device:<id>" */
    const char *group;      /* audience "group:<name>"; NULL: no group */
    const char *profile;    /* MCU profile a manifest's target must equal */
    uint32_t ram_bytes;     /* largest tensor arena accepted */
    uint32_t dsp_versions;  /* bit v set: DSP spec version v implemented */
    ota_verify_fn verify;
} ota_config_t;

typedef struct {
    uint32_t model_version;
    uint32_t model_size;
    uint16_t chunk_size;
    uint16_t chunk_count;
    uint32_t arena_bytes;
    float threshold;
    uint8_t sha256[OTA_SHA256_BYTES];
    char model_name[OTA_MAX_NAME + 1];
    char target[OTA_MAX_TARGET + 1];
    char audience[OTA_MAX_AUDIENCE + 1];
    char key_id[OTA_MAX_KEY_ID + 1];
    uint16_t dsp_version;
    uint16_t dsp_len;
    uint8_t dsp_block[OTA_MAX_DSP_BLOCK]; /* the DSP spec block, see ota_dsp_parse */
    uint16_t ref_len;
    uint8_t ref_block[OTA_MAX_REF_BLOCK]; /* the reference block, see ota_ref_parse */
    size_t signed_len;                    /* the signature covers msg[0..signed_len) */
} ota_manifest_t;

typedef struct {
    uint32_t model_version;
    uint8_t tag[OTA_TAG_BYTES];
    uint16_t index;
    uint16_t count;
    uint16_t length;
    const uint8_t *payload; /* points into the message */
} ota_chunk_t;

/* DSP spec block version 1 or 2; the statistics stay little-endian float32 in the block. Version 2 adds the
 * speed trend (firmware.ota.encode_dsp_block): the features are normalised at mean + slope * log10(rpm / reference)
 * for a window whose rpm lies in [valid_low, valid_high], at the reference (the fallback) otherwise. */
typedef struct {
    uint16_t version;
    uint32_t sample_rate_hz;
    uint16_t window_samples;
    uint16_t n_bands;
    float f_min_hz;
    uint16_t n_stats;
    const uint8_t *mean_le;  /* n_stats float32 */
    const uint8_t *std_le;   /* n_stats float32 */
    float reference_rpm;     /* version 2: 0 = no speed data (speed-unaware); version 1: 0 */
    float valid_low_rpm;     /* version 2: usable speeds; version 1: 0 */
    float valid_high_rpm;
    const uint8_t *slope_le; /* version 2: n_stats float32 per decade of rpm (all 0: no trend); version 1: NULL */
} ota_dsp_t;

/* Reference block version 1: `count` int8 inputs of n_in values, then `count` expected int8 outputs
 * of n_out values; a loaded model must reproduce each within `tolerance` LSB (firmware.ota.ReferenceSet). */
typedef struct {
    uint8_t count;
    uint8_t tolerance;
    uint16_t n_in;
    uint16_t n_out;
    const int8_t *inputs;   /* count * n_in, in the block */
    const int8_t *expected; /* count * n_out, in the block */
} ota_ref_t;

typedef struct {
    ota_config_t config;
    uint8_t *staging;        /* the staging slot in RAM, provided by the caller; NULL with `write` */
    const uint8_t *image;    /* where the sha256 reads the model: staging, or the flash slot */
    ota_write_fn write;      /* NULL: chunks are copied into staging; else written through it */
    size_t staging_capacity; /* largest model accepted */
    uint32_t active_version;
    uint32_t highest_version;
    int downloading;
    ota_manifest_t manifest; /* the download in progress */
    ota_manifest_t scratch;  /* an incoming manifest while it is checked */
    uint8_t received[OTA_MAX_CHUNKS / 8];
    uint16_t n_received;
    uint8_t last_digest[OTA_SHA256_BYTES]; /* sha256 of the last accepted manifest message */
    int has_last_digest;
} ota_receiver_t;

typedef struct {
    uint32_t state[8];
    uint64_t bytes;
    uint8_t block[64];
    size_t used;
} ota_sha256_t;

uint32_t ota_crc32(const uint8_t *data, size_t len);
void ota_sha256_init(ota_sha256_t *ctx);
void ota_sha256_update(ota_sha256_t *ctx, const uint8_t *data, size_t len);
void ota_sha256_final(ota_sha256_t *ctx, uint8_t out[OTA_SHA256_BYTES]);
void ota_sha256(const uint8_t *data, size_t len, uint8_t out[OTA_SHA256_BYTES]);
const char *ota_status_name(int code); /* "OK", "ERR_CRC", ... as in RxStatus */

/* Decoders: integrity and field checks only (no signature, no device policy). */
int ota_parse_manifest(const uint8_t *msg, size_t len, ota_manifest_t *out);
int ota_parse_chunk(const uint8_t *msg, size_t len, ota_chunk_t *out);
int ota_dsp_parse(const uint8_t *block, size_t len, ota_dsp_t *out);
int ota_ref_parse(const uint8_t *block, size_t len, ota_ref_t *out);
float ota_f32le(const uint8_t *p);

void ota_receiver_init(ota_receiver_t *rx, const ota_config_t *config, uint8_t *staging, size_t capacity,
                       uint32_t active_version);
/* The same with the staging slot in flash: chunks go through `write`, the sha256 reads `slot`
 * (memory-mapped). A failed write makes ota_receiver_on_chunk return OTA_ERR_BUFFER, the chunk
 * not stored. To move staging to another slot later, set rx->image and redirect `write`. */
void ota_receiver_init_flash(ota_receiver_t *rx, const ota_config_t *config, const uint8_t *slot, size_t capacity,
                             uint32_t active_version, ota_write_fn write);
int ota_receiver_on_manifest(ota_receiver_t *rx, const uint8_t *msg, size_t len);
int ota_receiver_on_chunk(ota_receiver_t *rx, const uint8_t *msg, size_t len);
/* Go on with the download of the manifest last accepted, with the chunks `received` marks as already
 * in staging (bit (i & 7) of byte i / 8: chunk i; e.g. a bitmap kept in flash across a restart;
 * bits from the chunk count on are ignored); NULL: none, the download starts over. OTA_OK, or
 * OTA_DONE when no chunk is missing; OTA_ERR_NO_MANIFEST when no manifest was accepted. The final
 * sha256 (ota_receiver_finish) still checks the whole model. */
int ota_receiver_resume(ota_receiver_t *rx, const uint8_t *received, size_t len);
/* Writes up to `max` missing chunk numbers in increasing order; returns how many. */
size_t ota_receiver_missing(const ota_receiver_t *rx, uint16_t *indices, size_t max);
/* Encodes a request for the first min(limit, 64) missing chunks; *out_len 0 when none is missing. */
int ota_receiver_request(const ota_receiver_t *rx, size_t limit, uint8_t *out, size_t cap, size_t *out_len);
/* OTA_OK when every chunk is in and the sha256 matches (the model is in staging[0..model_size)). */
int ota_receiver_finish(ota_receiver_t *rx);
void ota_receiver_commit(ota_receiver_t *rx); /* the new model runs: its version becomes the active one */
void ota_receiver_abort(ota_receiver_t *rx);  /* drop the download (e.g. the model failed to load) */

#endif
