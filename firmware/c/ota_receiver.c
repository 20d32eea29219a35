/* OTA model receiver: see ota_receiver.h and firmware/OTA_PROTOCOL.md. C99, no heap, no stdio. */
#include "ota_receiver.h"

#include <math.h>
#include <string.h>

/* ---- CRC-32 (zlib: reflected 0xEDB88320), four bits at a time from a 16-entry table ---- */

static const uint32_t crc_nibble[16] = {
    0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u, 0x4DB26158u, 0x5005713Cu,
    0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu, 0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu,
};

uint32_t ota_crc32(const uint8_t *data, size_t len) {
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++) {
        crc ^= data[i];
        crc = (crc >> 4) ^ crc_nibble[crc & 15u];
        crc = (crc >> 4) ^ crc_nibble[crc & 15u];
    }
    return crc ^ 0xFFFFFFFFu;
}

/* ---- SHA-256 (FIPS 180-4), written for this receiver ---- */

static const uint32_t sha_k[64] = {
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
    0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
    0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
    0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
    0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
    0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
    0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u,
};

static uint32_t rotr(uint32_t x, unsigned n) { return (x >> n) | (x << (32u - n)); }

static void sha256_block(uint32_t state[8], const uint8_t block[64]) {
    uint32_t w[64];
    for (unsigned i = 0; i < 16; i++) {
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 | (uint32_t)block[4 * i + 2] << 8 |
               (uint32_t)block[4 * i + 3];
    }
    for (unsigned i = 16; i < 64; i++) {
        uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (unsigned i = 0; i < 64; i++) {
        uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + sha_k[i] + w[i];
        uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
    state[4] += e;
    state[5] += f;
    state[6] += g;
    state[7] += h;
}

void ota_sha256_init(ota_sha256_t *ctx) {
    static const uint32_t init[8] = {0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
                                     0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};
    memcpy(ctx->state, init, sizeof init);
    ctx->bytes = 0;
    ctx->used = 0;
}

void ota_sha256_update(ota_sha256_t *ctx, const uint8_t *data, size_t len) {
    ctx->bytes += len;
    while (len > 0) {
        size_t take = 64 - ctx->used < len ? 64 - ctx->used : len;
        memcpy(ctx->block + ctx->used, data, take);
        ctx->used += take;
        data += take;
        len -= take;
        if (ctx->used == 64) {
            sha256_block(ctx->state, ctx->block);
            ctx->used = 0;
        }
    }
}

void ota_sha256_final(ota_sha256_t *ctx, uint8_t out[OTA_SHA256_BYTES]) {
    uint64_t bits = ctx->bytes * 8u;
    uint8_t pad = 0x80;
    ota_sha256_update(ctx, &pad, 1);
    pad = 0;
    while (ctx->used != 56) {
        ota_sha256_update(ctx, &pad, 1);
    }
    uint8_t length[8];
    for (unsigned i = 0; i < 8; i++) {
        length[i] = (uint8_t)(bits >> (56 - 8 * i));
    }
    ota_sha256_update(ctx, length, 8);
    for (unsigned i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(ctx->state[i] >> 24);
        out[4 * i + 1] = (uint8_t)(ctx->state[i] >> 16);
        out[4 * i + 2] = (uint8_t)(ctx->state[i] >> 8);
        out[4 * i + 3] = (uint8_t)ctx->state[i];
    }
}

void ota_sha256(const uint8_t *data, size_t len, uint8_t out[OTA_SHA256_BYTES]) {
    ota_sha256_t ctx;
    ota_sha256_init(&ctx);
    ota_sha256_update(&ctx, data, len);
    ota_sha256_final(&ctx, out);
}

/* ---- little-endian helpers ---- */

static uint16_t u16le(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static uint32_t u32le(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v) {
    put16(p, (uint16_t)v);
    put16(p + 2, (uint16_t)(v >> 16));
}

float ota_f32le(const uint8_t *p) {
    uint32_t bits = u32le(p);
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

const char *ota_status_name(int code) {
    static const char *const ok_names[] = {"OK", "DONE", "DUPLICATE", "SAME"};
    static const char *const err_names[] = {
        "ERR_NULL",          "ERR_TRUNCATED",  "ERR_MAGIC",         "ERR_VERSION",     "ERR_TYPE",
        "ERR_LENGTH",        "ERR_CRC",        "ERR_FIELD",         "ERR_BAD_SIGNATURE", "ERR_UNKNOWN_KEY",
        "ERR_REVOKED_KEY",   "ERR_WRONG_AUDIENCE", "ERR_NOT_NEWER", "ERR_WRONG_PROFILE", "ERR_DSP_VERSION",
        "ERR_TOO_LARGE",     "ERR_ARENA",      "ERR_NO_MANIFEST",   "ERR_STALE",       "ERR_INDEX",
        "ERR_INCOMPLETE",    "ERR_SHA256",     "ERR_BUFFER",
    };
    if (code >= 0 && code < (int)(sizeof ok_names / sizeof ok_names[0])) {
        return ok_names[code];
    }
    if (code < 0 && -code <= (int)(sizeof err_names / sizeof err_names[0])) {
        return err_names[-code - 1];
    }
    return "UNKNOWN";
}

/* ---- decoders ---- */

static int check_header(const uint8_t *msg, size_t len, uint8_t type) {
    if (msg == NULL) {
        return OTA_ERR_NULL;
    }
    if (len < 4) {
        return OTA_ERR_TRUNCATED;
    }
    if (msg[0] != 'T' || msg[1] != 'O') {
        return OTA_ERR_MAGIC;
    }
    if (msg[2] != OTA_PROTOCOL_VERSION) {
        return OTA_ERR_VERSION;
    }
    return msg[3] == type ? OTA_OK : OTA_ERR_TYPE;
}

static int check_length_and_crc(const uint8_t *msg, size_t len, size_t expected) {
    if (len != expected) {
        return OTA_ERR_LENGTH;
    }
    return ota_crc32(msg, len - OTA_CRC_BYTES) == u32le(msg + len - OTA_CRC_BYTES) ? OTA_OK : OTA_ERR_CRC;
}

static int is_name_char(uint8_t c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

static int all_of(const char *s, int (*pred)(uint8_t)) {
    for (; *s; s++) {
        if (!pred((uint8_t)*s)) {
            return 0;
        }
    }
    return 1;
}

static int is_target_char(uint8_t c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; }

static int is_key_char(uint8_t c) { return is_name_char(c) || c == '.'; }

static int audience_ok(const char *audience) {
    const char *rest = NULL;
    if (strncmp(audience, "device:", 7) == 0) {
        rest = audience + 7;
    } else if (strncmp(audience, "group:", 6) == 0) {
        rest = audience + 6;
    }
    return rest != NULL && *rest != '\0' && strlen(rest) <= 64 && all_of(rest, is_name_char);
}

int ota_dsp_parse(const uint8_t *block, size_t len, ota_dsp_t *out) {
    if (block == NULL || out == NULL) {
        return OTA_ERR_NULL;
    }
    if (len < 16) {
        return OTA_ERR_FIELD;
    }
    out->version = u16le(block);
    if (out->version != 1 && out->version != 2) {
        return OTA_ERR_DSP_VERSION;
    }
    out->sample_rate_hz = u32le(block + 2);
    out->window_samples = u16le(block + 6);
    out->n_bands = u16le(block + 8);
    out->f_min_hz = ota_f32le(block + 10);
    out->n_stats = u16le(block + 14);
    /* version 2: + f32 reference rpm, f32 valid low, f32 valid high, f32 slope[n_stats] */
    size_t speed_bytes = out->version == 2 ? 12u + 4u * out->n_stats : 0u;
    if (len != 16u + 8u * out->n_stats + speed_bytes) {
        return OTA_ERR_FIELD;
    }
    uint16_t w = out->window_samples;
    if (out->sample_rate_hz < 1 || w < 16 || w > 16384 || (w & (w - 1)) != 0) {
        return OTA_ERR_FIELD;
    }
    if (out->n_bands < 1 || out->n_bands > 120 || out->n_stats != out->n_bands + 3) {
        return OTA_ERR_FIELD;
    }
    out->mean_le = block + 16;
    out->std_le = block + 16 + 4u * out->n_stats;
    if (!isfinite(out->f_min_hz) || out->f_min_hz < 0.0f) {
        return OTA_ERR_FIELD;
    }
    for (uint16_t i = 0; i < out->n_stats; i++) {
        float mean = ota_f32le(out->mean_le + 4u * i);
        float std = ota_f32le(out->std_le + 4u * i);
        if (!isfinite(mean) || !isfinite(std) || !(std > 0.0f)) {
            return OTA_ERR_FIELD;
        }
    }
    out->reference_rpm = out->valid_low_rpm = out->valid_high_rpm = 0.0f;
    out->slope_le = NULL;
    if (out->version == 1) {
        return OTA_OK;
    }
    const uint8_t *speed = block + 16 + 8u * out->n_stats;
    out->reference_rpm = ota_f32le(speed);
    out->valid_low_rpm = ota_f32le(speed + 4);
    out->valid_high_rpm = ota_f32le(speed + 8);
    out->slope_le = speed + 12;
    float ref = out->reference_rpm, low = out->valid_low_rpm, high = out->valid_high_rpm;
    int has_trend = 0;
    for (uint16_t i = 0; i < out->n_stats; i++) {
        float slope = ota_f32le(out->slope_le + 4u * i);
        if (!isfinite(slope)) {
            return OTA_ERR_FIELD;
        }
        has_trend |= slope != 0.0f;
    }
    /* as firmware.ota.decode_dsp_block: 0 < low < high, the reference inside, or 0 (no speed data) without a trend */
    if (!isfinite(ref) || !isfinite(low) || !isfinite(high) || !(low > 0.0f) || !(low < high) ||
        !((low <= ref && ref <= high) || (ref == 0.0f && !has_trend))) {
        return OTA_ERR_FIELD;
    }
    return OTA_OK;
}

/* Copy a text field of n bytes (printable ASCII, 1..max) into a NUL-terminated buffer. */
static int copy_text(char *dst, const uint8_t *src, size_t n, size_t max) {
    if (n < 1 || n > max) {
        return OTA_ERR_FIELD;
    }
    for (size_t i = 0; i < n; i++) {
        if (src[i] < 0x21 || src[i] > 0x7E) {
            return OTA_ERR_FIELD;
        }
        dst[i] = (char)src[i];
    }
    dst[n] = '\0';
    return OTA_OK;
}

int ota_ref_parse(const uint8_t *block, size_t len, ota_ref_t *out) {
    if (block == NULL || out == NULL) {
        return OTA_ERR_NULL;
    }
    if (len < OTA_REF_HEADER_BYTES || len > OTA_MAX_REF_BLOCK || block[0] != 1) {
        return OTA_ERR_FIELD;
    }
    out->count = block[1];
    out->tolerance = block[2];
    out->n_in = u16le(block + 3);
    out->n_out = u16le(block + 5);
    if (len != OTA_REF_HEADER_BYTES + (size_t)out->count * ((size_t)out->n_in + out->n_out)) {
        return OTA_ERR_FIELD;
    }
    if (out->count < 1 || out->count > OTA_MAX_REFERENCES || out->tolerance > OTA_MAX_TOLERANCE_LSB ||
        out->n_in < 1 || out->n_in > OTA_MAX_REF_VALUES || out->n_out < 1 || out->n_out > OTA_MAX_REF_VALUES) {
        return OTA_ERR_FIELD;
    }
    out->inputs = (const int8_t *)(const void *)(block + OTA_REF_HEADER_BYTES);
    out->expected = out->inputs + (size_t)out->count * out->n_in;
    return OTA_OK;
}

int ota_parse_manifest(const uint8_t *msg, size_t len, ota_manifest_t *out) {
    int status = check_header(msg, len, OTA_TYPE_MANIFEST);
    if (status != OTA_OK) {
        return status;
    }
    if (out == NULL) {
        return OTA_ERR_NULL;
    }
    if (len < OTA_MANIFEST_HEADER_BYTES + OTA_SIGNATURE_BYTES + OTA_CRC_BYTES) {
        return OTA_ERR_TRUNCATED;
    }
    const size_t text_len[4] = {msg[56], msg[57], msg[58], msg[59]};
    const size_t text_max[4] = {OTA_MAX_NAME, OTA_MAX_TARGET, OTA_MAX_AUDIENCE, OTA_MAX_KEY_ID};
    char *const text_dst[4] = {out->model_name, out->target, out->audience, out->key_id};
    uint16_t dsp_len = u16le(msg + 60);
    uint16_t ref_len = u16le(msg + 62);
    size_t body =
        OTA_MANIFEST_HEADER_BYTES + text_len[0] + text_len[1] + text_len[2] + text_len[3] + dsp_len + ref_len;
    status = check_length_and_crc(msg, len, body + OTA_SIGNATURE_BYTES + OTA_CRC_BYTES);
    if (status != OTA_OK) {
        return status;
    }
    for (unsigned i = 0; i < 4; i++) {
        if (text_len[i] < 1 || text_len[i] > text_max[i]) {
            return OTA_ERR_FIELD;
        }
    }
    size_t offset = OTA_MANIFEST_HEADER_BYTES;
    for (unsigned i = 0; i < 4; i++) {
        status = copy_text(text_dst[i], msg + offset, text_len[i], text_max[i]);
        if (status != OTA_OK) {
            return status;
        }
        offset += text_len[i];
    }
    out->model_version = u32le(msg + 4);
    out->model_size = u32le(msg + 8);
    out->chunk_size = u16le(msg + 12);
    out->chunk_count = u16le(msg + 14);
    out->arena_bytes = u32le(msg + 16);
    out->threshold = ota_f32le(msg + 20);
    memcpy(out->sha256, msg + 24, OTA_SHA256_BYTES);
    out->signed_len = body;
    if (out->model_version < 1 || out->model_size < 1 || out->arena_bytes < 1) {
        return OTA_ERR_FIELD;
    }
    if (out->chunk_size < OTA_MIN_CHUNK_SIZE || out->chunk_size > OTA_MAX_CHUNK_SIZE) {
        return OTA_ERR_FIELD;
    }
    uint32_t count = (out->model_size + out->chunk_size - 1u) / out->chunk_size;
    if (out->chunk_count != count || count > OTA_MAX_CHUNKS) {
        return OTA_ERR_FIELD;
    }
    if (!isfinite(out->threshold) || !(out->threshold > 0.0f)) {
        return OTA_ERR_FIELD;
    }
    if (out->target[0] == '_' || !all_of(out->target, is_target_char) || !audience_ok(out->audience) ||
        !all_of(out->key_id, is_key_char)) {
        return OTA_ERR_FIELD;
    }
    if (dsp_len < 2 || dsp_len > OTA_MAX_DSP_BLOCK) {
        return OTA_ERR_FIELD;
    }
    out->dsp_len = dsp_len;
    out->dsp_version = u16le(msg + offset);
    memcpy(out->dsp_block, msg + offset, dsp_len);
    if (out->dsp_version == 1 || out->dsp_version == 2) {
        ota_dsp_t dsp;
        if (ota_dsp_parse(out->dsp_block, dsp_len, &dsp) != OTA_OK) {
            return OTA_ERR_FIELD;
        }
    }
    if (ref_len > OTA_MAX_REF_BLOCK) {
        return OTA_ERR_FIELD;
    }
    out->ref_len = ref_len;
    memcpy(out->ref_block, msg + offset + dsp_len, ref_len);
    ota_ref_t ref;
    if (ota_ref_parse(out->ref_block, ref_len, &ref) != OTA_OK) {
        return OTA_ERR_FIELD;
    }
    return OTA_OK;
}

int ota_parse_chunk(const uint8_t *msg, size_t len, ota_chunk_t *out) {
    int status = check_header(msg, len, OTA_TYPE_CHUNK);
    if (status != OTA_OK) {
        return status;
    }
    if (out == NULL) {
        return OTA_ERR_NULL;
    }
    if (len < OTA_CHUNK_HEADER_BYTES + OTA_CRC_BYTES) {
        return OTA_ERR_TRUNCATED;
    }
    out->model_version = u32le(msg + 4);
    memcpy(out->tag, msg + 8, OTA_TAG_BYTES);
    out->index = u16le(msg + 16);
    out->count = u16le(msg + 18);
    out->length = u16le(msg + 20);
    out->payload = msg + OTA_CHUNK_HEADER_BYTES;
    status = check_length_and_crc(msg, len, (size_t)OTA_CHUNK_HEADER_BYTES + out->length + OTA_CRC_BYTES);
    if (status != OTA_OK) {
        return status;
    }
    if (out->length < 1 || out->length > OTA_MAX_CHUNK_SIZE || out->count < 1 || out->count > OTA_MAX_CHUNKS) {
        return OTA_ERR_FIELD;
    }
    return out->index < out->count ? OTA_OK : OTA_ERR_INDEX;
}

/* ---- the receiver ---- */

void ota_receiver_init(ota_receiver_t *rx, const ota_config_t *config, uint8_t *staging, size_t capacity,
                       uint32_t active_version) {
    memset(rx, 0, sizeof *rx);
    rx->config = *config;
    rx->staging = staging;
    rx->image = staging;
    rx->staging_capacity = capacity;
    rx->active_version = active_version;
    rx->highest_version = active_version;
}

void ota_receiver_init_flash(ota_receiver_t *rx, const ota_config_t *config, const uint8_t *slot, size_t capacity,
                             uint32_t active_version, ota_write_fn write) {
    ota_receiver_init(rx, config, NULL, capacity, active_version);
    rx->image = slot;
    rx->write = write;
}

static int audience_is_mine(const ota_config_t *config, const char *audience) {
    if (strncmp(audience, "device:", 7) == 0) {
        return config->device_id != NULL && strcmp(audience + 7, config->device_id) == 0;
    }
    if (strncmp(audience, "group:", 6) == 0) {
        return config->group != NULL && strcmp(audience + 6, config->group) == 0;
    }
    return 0;
}

int ota_receiver_on_manifest(ota_receiver_t *rx, const uint8_t *msg, size_t len) {
    if (rx == NULL) {
        return OTA_ERR_NULL;
    }
    /* Parsed into scratch: a rejected manifest must not disturb the download in progress. */
    const ota_manifest_t *m = &rx->scratch;
    int status = ota_parse_manifest(msg, len, &rx->scratch);
    if (status != OTA_OK) {
        return status;
    }
    if (rx->config.verify == NULL) {
        return OTA_ERR_NULL;
    }
    status = rx->config.verify(msg, m->signed_len, msg + m->signed_len, m->key_id);
    if (status != OTA_OK) {
        return status;
    }
    if (!audience_is_mine(&rx->config, m->audience)) {
        return OTA_ERR_WRONG_AUDIENCE;
    }
    uint8_t digest[OTA_SHA256_BYTES];
    ota_sha256(msg, len, digest);
    if (rx->has_last_digest && memcmp(digest, rx->last_digest, sizeof digest) == 0) {
        return OTA_SAME;
    }
    uint32_t newest = rx->active_version > rx->highest_version ? rx->active_version : rx->highest_version;
    if (m->model_version <= newest) {
        return OTA_ERR_NOT_NEWER;
    }
    if (rx->config.profile == NULL || strcmp(m->target, rx->config.profile) != 0) {
        return OTA_ERR_WRONG_PROFILE;
    }
    if (m->dsp_version > 31 || !(rx->config.dsp_versions & (1u << m->dsp_version))) {
        return OTA_ERR_DSP_VERSION;
    }
    if (m->model_size > rx->staging_capacity || rx->image == NULL || (rx->staging == NULL && rx->write == NULL)) {
        return OTA_ERR_TOO_LARGE;
    }
    if (m->arena_bytes > rx->config.ram_bytes) {
        return OTA_ERR_ARENA;
    }
    rx->manifest = *m;
    rx->downloading = 1;
    memset(rx->received, 0, sizeof rx->received);
    rx->n_received = 0;
    memcpy(rx->last_digest, digest, sizeof digest);
    rx->has_last_digest = 1;
    rx->highest_version = m->model_version;
    return OTA_OK;
}

static int have(const ota_receiver_t *rx, uint16_t index) { return (rx->received[index >> 3] >> (index & 7)) & 1; }

int ota_receiver_on_chunk(ota_receiver_t *rx, const uint8_t *msg, size_t len) {
    if (rx == NULL) {
        return OTA_ERR_NULL;
    }
    ota_chunk_t chunk;
    int status = ota_parse_chunk(msg, len, &chunk);
    if (status != OTA_OK) {
        return status;
    }
    if (!rx->downloading) {
        return OTA_ERR_NO_MANIFEST;
    }
    const ota_manifest_t *m = &rx->manifest;
    if (chunk.model_version != m->model_version || memcmp(chunk.tag, m->sha256, OTA_TAG_BYTES) != 0) {
        return OTA_ERR_STALE;
    }
    if (chunk.count != m->chunk_count) {
        return OTA_ERR_FIELD;
    }
    uint32_t start = (uint32_t)chunk.index * m->chunk_size;
    uint32_t expected = m->model_size - start < m->chunk_size ? m->model_size - start : m->chunk_size;
    if (chunk.length != expected) {
        return OTA_ERR_LENGTH;
    }
    if (have(rx, chunk.index)) {
        return OTA_DUPLICATE;
    }
    if (rx->write != NULL) {
        if (rx->write(start, chunk.payload, chunk.length) != 0) {
            return OTA_ERR_BUFFER;
        }
    } else {
        memcpy(rx->staging + start, chunk.payload, chunk.length);
    }
    rx->received[chunk.index >> 3] |= (uint8_t)(1u << (chunk.index & 7));
    rx->n_received++;
    return rx->n_received == m->chunk_count ? OTA_DONE : OTA_OK;
}

int ota_receiver_resume(ota_receiver_t *rx, const uint8_t *received, size_t len) {
    if (rx == NULL) {
        return OTA_ERR_NULL;
    }
    if (!rx->has_last_digest) {
        return OTA_ERR_NO_MANIFEST;
    }
    const ota_manifest_t *m = &rx->manifest;
    memset(rx->received, 0, sizeof rx->received);
    rx->n_received = 0;
    for (uint16_t i = 0; received != NULL && i < m->chunk_count && (size_t)(i >> 3) < len; i++) {
        if ((received[i >> 3] >> (i & 7)) & 1) {
            rx->received[i >> 3] |= (uint8_t)(1u << (i & 7));
            rx->n_received++;
        }
    }
    rx->downloading = 1;
    return rx->n_received == m->chunk_count ? OTA_DONE : OTA_OK;
}

size_t ota_receiver_missing(const ota_receiver_t *rx, uint16_t *indices, size_t max) {
    size_t n = 0;
    if (rx == NULL || !rx->downloading) {
        return 0;
    }
    for (uint16_t i = 0; i < rx->manifest.chunk_count && n < max; i++) {
        if (!have(rx, i)) {
            indices[n++] = i;
        }
    }
    return n;
}

int ota_receiver_request(const ota_receiver_t *rx, size_t limit, uint8_t *out, size_t cap, size_t *out_len) {
    if (rx == NULL || out == NULL || out_len == NULL) {
        return OTA_ERR_NULL;
    }
    uint16_t wanted[OTA_MAX_REQUEST_INDICES];
    size_t n = ota_receiver_missing(rx, wanted, limit < OTA_MAX_REQUEST_INDICES ? limit : OTA_MAX_REQUEST_INDICES);
    *out_len = 0;
    if (n == 0) {
        return OTA_OK;
    }
    size_t size = OTA_REQUEST_HEADER_BYTES + 2 * n + OTA_CRC_BYTES;
    if (cap < size) {
        return OTA_ERR_BUFFER;
    }
    out[0] = 'T';
    out[1] = 'O';
    out[2] = OTA_PROTOCOL_VERSION;
    out[3] = OTA_TYPE_REQUEST;
    put32(out + 4, rx->manifest.model_version);
    memcpy(out + 8, rx->manifest.sha256, OTA_TAG_BYTES);
    put16(out + 16, (uint16_t)n);
    for (size_t i = 0; i < n; i++) {
        put16(out + OTA_REQUEST_HEADER_BYTES + 2 * i, wanted[i]);
    }
    put32(out + size - OTA_CRC_BYTES, ota_crc32(out, size - OTA_CRC_BYTES));
    *out_len = size;
    return OTA_OK;
}

int ota_receiver_finish(ota_receiver_t *rx) {
    if (rx == NULL) {
        return OTA_ERR_NULL;
    }
    if (!rx->downloading) {
        return OTA_ERR_NO_MANIFEST;
    }
    if (rx->n_received != rx->manifest.chunk_count) {
        return OTA_ERR_INCOMPLETE;
    }
    uint8_t digest[OTA_SHA256_BYTES];
    ota_sha256(rx->image, rx->manifest.model_size, digest);
    if (memcmp(digest, rx->manifest.sha256, sizeof digest) != 0) {
        rx->downloading = 0;
        return OTA_ERR_SHA256;
    }
    return OTA_OK;
}

void ota_receiver_commit(ota_receiver_t *rx) {
    if (rx->downloading) {
        rx->active_version = rx->manifest.model_version;
    }
    rx->downloading = 0;
}

void ota_receiver_abort(ota_receiver_t *rx) { rx->downloading = 0; }
