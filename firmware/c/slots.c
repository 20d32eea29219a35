/* Model slots and provisioning: see slots.h for the layouts. C99, no heap, no stdio. */
#include "slots.h"

#include <string.h>

static uint16_t get16(const uint8_t *b) { return (uint16_t)(b[0] | b[1] << 8); }

static uint32_t get32(const uint8_t *b) {
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static void put16(uint8_t *b, uint16_t v) {
    b[0] = (uint8_t)v;
    b[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *b, uint32_t v) {
    put16(b, (uint16_t)v);
    put16(b + 2, (uint16_t)(v >> 16));
}

static int region_ok(const slots_flash_t *flash) {
    return flash != NULL && flash->base != NULL && flash->size >= SLOTS_REGION_BYTES;
}

/* Common header: magic, layout version, length within [min, max]; CRC-32 over length - 4 bytes. */
static int check_block(const uint8_t *b, const char magic[4], uint32_t min, uint32_t max, uint16_t *length) {
    if (memcmp(b, magic, 4) != 0) {
        return SLOTS_ERR_MAGIC;
    }
    if (get16(b + 4) != SLOTS_LAYOUT_VERSION) {
        return SLOTS_ERR_VERSION;
    }
    *length = get16(b + 6);
    if (*length < min || *length > max) {
        return SLOTS_ERR_LENGTH;
    }
    return ota_crc32(b, *length - 4u) == get32(b + *length - 4u) ? SLOTS_OK : SLOTS_ERR_CRC;
}

/* ---- provisioning ---- */

typedef struct {
    const uint8_t *b;
    size_t len;
    size_t pos;
} cursor_t;

static int is_name_char(uint8_t c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

/* str8 into dst (NUL-terminated), min..max bytes of is_name_char, plus '.' when dots is set. */
static int get_str8(cursor_t *c, char *dst, size_t min, size_t max, int dots) {
    if (c->pos >= c->len) {
        return SLOTS_ERR_LENGTH;
    }
    size_t n = c->b[c->pos++];
    if (n < min || n > max) {
        return SLOTS_ERR_FIELD;
    }
    if (n > c->len - c->pos) {
        return SLOTS_ERR_LENGTH;
    }
    for (size_t i = 0; i < n; i++) {
        uint8_t ch = c->b[c->pos + i];
        if (!is_name_char(ch) && !(dots && ch == '.')) {
            return SLOTS_ERR_FIELD;
        }
        dst[i] = (char)ch;
    }
    dst[n] = '\0';
    c->pos += n;
    return SLOTS_OK;
}

int slots_load_provisioning(const slots_flash_t *flash, slots_provisioning_t *out) {
    if (out == NULL) {
        return SLOTS_ERR_NULL;
    }
    if (!region_ok(flash)) {
        return SLOTS_ERR_REGION;
    }
    const uint8_t *b = flash->base + SLOTS_PROVISIONING_OFFSET;
    uint16_t length;
    int status = check_block(b, "TMPV", 8u + 4u + 4u + 1u, SLOTS_SECTOR_BYTES, &length);
    if (status != SLOTS_OK) {
        return status;
    }
    memset(out, 0, sizeof *out);
    cursor_t c = {b, length - 4u, 8};
    char *const texts[4] = {out->device, out->fleet, out->group, out->profile};
    const size_t mins[4] = {1, 1, 0, 1};
    const size_t maxs[4] = {SLOTS_MAX_NAME, SLOTS_MAX_NAME, SLOTS_MAX_NAME, SLOTS_MAX_PROFILE};
    for (unsigned i = 0; i < 4; i++) {
        status = get_str8(&c, texts[i], mins[i], maxs[i], 0);
        if (status != SLOTS_OK) {
            return status;
        }
    }
    if (c.pos >= c.len) {
        return SLOTS_ERR_LENGTH;
    }
    out->n_keys = c.b[c.pos++];
    if (out->n_keys > ED25519_MAX_KEYS) {
        return SLOTS_ERR_FIELD;
    }
    for (unsigned k = 0; k < out->n_keys; k++) {
        ed25519_key_t *key = &out->keys[k];
        status = get_str8(&c, key->key_id, 1, OTA_MAX_KEY_ID, 1);
        if (status != SLOTS_OK) {
            return status;
        }
        if (c.len - c.pos < 1u + ED25519_PUBLIC_KEY_BYTES) {
            return SLOTS_ERR_LENGTH;
        }
        uint8_t flags = c.b[c.pos++];
        if (flags > 3u) {
            return SLOTS_ERR_FIELD;
        }
        key->revoked = (uint8_t)(flags & 1u);
        key->has_key = (uint8_t)(flags >> 1);
        memcpy(key->public_key, c.b + c.pos, ED25519_PUBLIC_KEY_BYTES);
        c.pos += ED25519_PUBLIC_KEY_BYTES;
    }
    return c.pos == c.len ? SLOTS_OK : SLOTS_ERR_LENGTH;
}

/* ---- slot table ---- */

void slots_encode_table(const slots_table_t *table, uint8_t out[SLOTS_TABLE_BYTES]) {
    memset(out, 0, SLOTS_TABLE_BYTES);
    memcpy(out, "TMST", 4);
    put16(out + 4, SLOTS_LAYOUT_VERSION);
    put16(out + 6, SLOTS_TABLE_BYTES);
    put32(out + 8, table->seq);
    out[12] = table->active;
    out[13] = table->previous;
    for (unsigned s = 0; s < 2; s++) {
        const slots_entry_t *e = &table->slot[s];
        uint8_t *p = out + 16 + SLOTS_ENTRY_BYTES * s;
        size_t name_len = strlen(e->name);
        uint32_t threshold;
        memcpy(&threshold, &e->threshold, sizeof threshold);
        put32(p, e->model_size);
        put32(p + 4, e->version);
        memcpy(p + 8, e->sha256, OTA_SHA256_BYTES);
        put32(p + 40, e->arena_bytes);
        put32(p + 44, threshold);
        p[48] = (uint8_t)name_len;
        memcpy(p + 49, e->name, name_len);
        put16(p + 114, e->dsp_len);
        memcpy(p + 116, e->dsp, e->dsp_len);
    }
    put32(out + SLOTS_TABLE_BYTES - 4u, ota_crc32(out, SLOTS_TABLE_BYTES - 4u));
}

static int decode_entry(const uint8_t *p, slots_entry_t *e) {
    memset(e, 0, sizeof *e);
    e->model_size = get32(p);
    e->version = get32(p + 4);
    memcpy(e->sha256, p + 8, OTA_SHA256_BYTES);
    e->arena_bytes = get32(p + 40);
    e->threshold = ota_f32le(p + 44);
    uint8_t name_len = p[48];
    e->dsp_len = get16(p + 114);
    if (e->model_size > SLOTS_SLOT_BYTES || name_len > OTA_MAX_NAME || e->dsp_len > OTA_MAX_DSP_BLOCK) {
        return SLOTS_ERR_FIELD;
    }
    memcpy(e->name, p + 49, name_len);
    e->name[name_len] = '\0';
    memcpy(e->dsp, p + 116, e->dsp_len);
    return SLOTS_OK;
}

static int slot_index_ok(uint8_t s) { return s == 0 || s == 1 || s == SLOTS_NONE; }

/* One copy, fully checked; *seq is its sequence number. */
static int decode_table(const uint8_t *b, slots_table_t *out) {
    uint16_t length;
    int status = check_block(b, "TMST", SLOTS_TABLE_BYTES, SLOTS_TABLE_BYTES, &length);
    if (status != SLOTS_OK) {
        return status;
    }
    out->seq = get32(b + 8);
    out->active = b[12];
    out->previous = b[13];
    if (!slot_index_ok(out->active) || !slot_index_ok(out->previous) ||
        (out->active != SLOTS_NONE && out->active == out->previous)) {
        return SLOTS_ERR_FIELD;
    }
    for (unsigned s = 0; s < 2; s++) {
        status = decode_entry(b + 16 + SLOTS_ENTRY_BYTES * s, &out->slot[s]);
        if (status != SLOTS_OK) {
            return status;
        }
    }
    return SLOTS_OK;
}

/* Which copy holds the newest valid table (-1: none); *table gets it. */
static int newest_copy(const slots_flash_t *flash, slots_table_t *table) {
    static slots_table_t candidate; /* static: 2.3 KiB off the stack */
    int newest = -1;
    for (int copy = 0; copy < 2; copy++) {
        if (decode_table(flash->base + SLOTS_TABLE_OFFSET(copy), &candidate) == SLOTS_OK &&
            (newest < 0 || candidate.seq > table->seq)) {
            *table = candidate;
            newest = copy;
        }
    }
    return newest;
}

static void empty_table(slots_table_t *table) {
    memset(table, 0, sizeof *table);
    table->active = SLOTS_NONE;
    table->previous = SLOTS_NONE;
}

int slots_load_table(const slots_flash_t *flash, slots_table_t *out) {
    if (out == NULL) {
        return SLOTS_ERR_NULL;
    }
    if (!region_ok(flash)) {
        return SLOTS_ERR_REGION;
    }
    if (newest_copy(flash, out) < 0) {
        empty_table(out);
        return SLOTS_EMPTY;
    }
    return SLOTS_OK;
}

const uint8_t *slots_model(const slots_flash_t *flash, uint8_t slot) {
    return flash->base + SLOTS_SLOT_OFFSET(slot);
}

int slots_verify(const slots_flash_t *flash, const slots_table_t *table, uint8_t slot) {
    if (slot > 1) {
        return 0;
    }
    const slots_entry_t *e = &table->slot[slot];
    if (e->model_size == 0 || e->model_size > SLOTS_SLOT_BYTES) {
        return 0;
    }
    uint8_t digest[OTA_SHA256_BYTES];
    ota_sha256(slots_model(flash, slot), e->model_size, digest);
    return memcmp(digest, e->sha256, sizeof digest) == 0;
}

int slots_boot(const slots_flash_t *flash, slots_table_t *table) {
    int status = slots_load_table(flash, table);
    if (status < 0) {
        return status;
    }
    if (slots_verify(flash, table, table->active)) {
        return SLOTS_OK;
    }
    /* the active slot does not hold its model (a bad write, a bit flip): run the previous one */
    if (slots_verify(flash, table, table->previous)) {
        table->active = table->previous;
        table->previous = SLOTS_NONE;
        return SLOTS_FALLBACK;
    }
    table->active = SLOTS_NONE;
    table->previous = SLOTS_NONE;
    return SLOTS_EMPTY;
}

uint8_t slots_staging(const slots_table_t *table) { return table->active == 0 ? 1 : 0; }

int slots_commit(const slots_flash_t *flash, slots_table_t *table, uint8_t slot, const slots_entry_t *entry) {
    static slots_table_t stored;          /* static: no heap, and 2.3 KiB each off the stack */
    static slots_table_t next;
    static uint8_t encoded[SLOTS_TABLE_BYTES];
    if (table == NULL || entry == NULL) {
        return SLOTS_ERR_NULL;
    }
    if (!region_ok(flash) || flash->write == NULL) {
        return SLOTS_ERR_REGION;
    }
    if (slot > 1 || slot == table->active || entry->model_size == 0 || entry->model_size > SLOTS_SLOT_BYTES ||
        entry->dsp_len > OTA_MAX_DSP_BLOCK || strlen(entry->name) > OTA_MAX_NAME) {
        return SLOTS_ERR_FIELD;
    }
    int newest = newest_copy(flash, &stored);
    next = *table;
    /* above every seq in flash, including a newer copy than the one this boot loaded */
    next.seq = (newest >= 0 && stored.seq > table->seq ? stored.seq : table->seq) + 1u;
    next.slot[slot] = *entry;
    next.previous = table->active;
    next.active = slot;
    slots_encode_table(&next, encoded);
    int first = newest == 0 ? 1 : 0; /* never overwrite the newest valid copy first */
    if (flash->write(SLOTS_TABLE_OFFSET(first), encoded, sizeof encoded) != 0 ||
        flash->write(SLOTS_TABLE_OFFSET(1 - first), encoded, sizeof encoded) != 0) {
        return SLOTS_ERR_WRITE;
    }
    *table = next;
    return SLOTS_OK;
}

/* ---- transfer record ---- */

void slots_encode_transfer(const slots_transfer_t *record, uint8_t out[SLOTS_TRANSFER_BYTES]) {
    memset(out, 0, SLOTS_TRANSFER_BYTES);
    memcpy(out, "TMTR", 4);
    put16(out + 4, SLOTS_LAYOUT_VERSION);
    put16(out + 6, SLOTS_TRANSFER_BYTES);
    put32(out + 8, record->seq);
    put32(out + 12, record->version);
    memcpy(out + 16, record->sha256, OTA_SHA256_BYTES);
    put32(out + 48, record->model_size);
    put16(out + 52, record->chunk_count);
    out[54] = record->slot;
    memcpy(out + 56, record->received, SLOTS_BITMAP_BYTES);
    put32(out + SLOTS_TRANSFER_BYTES - 4u, ota_crc32(out, SLOTS_TRANSFER_BYTES - 4u));
}

/* One copy, fully checked; a cleared record (version 0) is valid. */
static int decode_transfer(const uint8_t *b, slots_transfer_t *out) {
    uint16_t length;
    int status = check_block(b, "TMTR", SLOTS_TRANSFER_BYTES, SLOTS_TRANSFER_BYTES, &length);
    if (status != SLOTS_OK) {
        return status;
    }
    memset(out, 0, sizeof *out);
    out->seq = get32(b + 8);
    out->version = get32(b + 12);
    memcpy(out->sha256, b + 16, OTA_SHA256_BYTES);
    out->model_size = get32(b + 48);
    out->chunk_count = get16(b + 52);
    out->slot = b[54];
    memcpy(out->received, b + 56, SLOTS_BITMAP_BYTES);
    if (out->version != 0 && (out->slot > 1 || out->model_size == 0 || out->model_size > SLOTS_SLOT_BYTES ||
                              out->chunk_count == 0 || out->chunk_count > OTA_MAX_CHUNKS)) {
        return SLOTS_ERR_FIELD;
    }
    return SLOTS_OK;
}

/* Which copy holds the newest valid record (-1: none); *record gets it. */
static int newest_transfer(const slots_flash_t *flash, slots_transfer_t *record) {
    static slots_transfer_t candidate; /* static: off the stack */
    int newest = -1;
    for (int copy = 0; copy < 2; copy++) {
        if (decode_transfer(flash->base + SLOTS_TRANSFER_OFFSET(copy), &candidate) == SLOTS_OK &&
            (newest < 0 || candidate.seq > record->seq)) {
            *record = candidate;
            newest = copy;
        }
    }
    return newest;
}

int slots_load_transfer(const slots_flash_t *flash, slots_transfer_t *out) {
    if (out == NULL) {
        return SLOTS_ERR_NULL;
    }
    if (!region_ok(flash)) {
        return SLOTS_ERR_REGION;
    }
    memset(out, 0, sizeof *out);
    if (newest_transfer(flash, out) < 0 || out->version == 0) {
        uint32_t seq = out->seq;
        memset(out, 0, sizeof *out);
        out->seq = seq;
        return SLOTS_EMPTY;
    }
    return SLOTS_OK;
}

int slots_save_transfer(const slots_flash_t *flash, slots_transfer_t *record) {
    static slots_transfer_t stored;
    static uint8_t encoded[SLOTS_TRANSFER_BYTES];
    if (record == NULL) {
        return SLOTS_ERR_NULL;
    }
    if (!region_ok(flash) || flash->write == NULL) {
        return SLOTS_ERR_REGION;
    }
    if (record->version != 0 && (record->slot > 1 || record->model_size == 0 ||
                                 record->model_size > SLOTS_SLOT_BYTES || record->chunk_count == 0 ||
                                 record->chunk_count > OTA_MAX_CHUNKS)) {
        return SLOTS_ERR_FIELD;
    }
    memset(&stored, 0, sizeof stored);
    int newest = newest_transfer(flash, &stored);
    uint32_t seq = (newest >= 0 && stored.seq > record->seq ? stored.seq : record->seq) + 1u;
    uint32_t previous = record->seq;
    record->seq = seq;
    slots_encode_transfer(record, encoded);
    record->seq = previous;
    if (flash->write(SLOTS_TRANSFER_OFFSET(newest == 0 ? 1 : 0), encoded, sizeof encoded) != 0) {
        return SLOTS_ERR_WRITE;
    }
    record->seq = seq;
    return SLOTS_OK;
}

int slots_clear_transfer(const slots_flash_t *flash, slots_transfer_t *record) {
    if (record == NULL) {
        return SLOTS_ERR_NULL;
    }
    uint32_t seq = record->seq;
    memset(record, 0, sizeof *record);
    record->seq = seq;
    return slots_save_transfer(flash, record);
}
