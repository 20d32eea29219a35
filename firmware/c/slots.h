/*
 * Model slots and provisioning in the board's persistent "flash" region (FIRMWARE.md, "Model
 * slots and provisioning"). Layout of the region, offsets from its start:
 *
 *   0x00000  provisioning block (4 KiB): written once by the runner, read at boot
 *   0x01000  slot table copy 0 (4 KiB)
 *   0x02000  slot table copy 1 (4 KiB)
 *   0x03000  transfer record copy 0 (4 KiB)
 *   0x04000  transfer record copy 1 (4 KiB)
 *   0x10000  model slot 0 (128 KiB)
 *   0x30000  model slot 1 (128 KiB)
 *
 * Provisioning block, layout version 1, little-endian:
 *   0  4  magic "TMPV"
 *   4  2  layout version (1)
 *   6  2  length: bytes from offset 0 to the end of the CRC, <= 4096
 *   8     str8 device, str8 fleet, str8 group (length 0: none), str8 profile
 *         u8 n_keys (<= 8), then n_keys x (str8 key_id, u8 flags: bit 0 revoked, bit 1 has key,
 *         32 B Ed25519 public key, zeros without one)
 *   length - 4  CRC-32 (zlib) of bytes 0 .. length - 4
 *
 * Slot table, layout version 1, one copy (SLOTS_TABLE_BYTES), little-endian:
 *   0  4  magic "TMST"
 *   4  2  layout version (1)
 *   6  2  length (SLOTS_TABLE_BYTES)
 *   8  4  seq: higher is newer; boot takes the valid copy with the highest
 *   12 1  active slot (0, 1; 0xFF none)
 *   13 1  previous slot (0, 1; 0xFF none)
 *   14 2  zero
 *   16    2 x slot entry (SLOTS_ENTRY_BYTES each, slot 0 first):
 *           0 u32 model_size (0: empty), 4 u32 model version, 8 32 B sha256, 40 u32 arena_bytes,
 *           44 f32 threshold, 48 u8 name_len (<= 64), 49 64 B name, 113 u8 zero,
 *           114 u16 dsp_len (<= 1024), 116 1024 B DSP block (OTA_PROTOCOL.md), zero padded
 *   2296 4  CRC-32 of bytes 0 .. 2296
 *
 * A commit writes the new table (seq + 1) over the copy that is not the newest valid one, then
 * over the other: a power loss inside the first write leaves the old newest copy, inside the
 * second the new one, and a torn copy fails its CRC. The staging slot is never the active one,
 * so the model a valid table names as active is never written under it; boot re-checks its
 * sha256 anyway and falls back to the previous slot.
 *
 * Transfer record, layout version 1, one copy (SLOTS_TRANSFER_BYTES), little-endian: the download
 * in progress, so that a restart resumes it (OTA_PROTOCOL.md, "Resume").
 *   0  4  magic "TMTR"
 *   4  2  layout version (1)
 *   6  2  length (SLOTS_TRANSFER_BYTES)
 *   8  4  seq: higher is newer; the valid copy with the highest counts
 *   12 4  model version (0: no transfer, the record was cleared)
 *   16 32 sha256 of the model (the manifest's)
 *   48 4  model size
 *   52 2  chunk count
 *   54 1  staging slot (0, 1)
 *   55 1  zero
 *   56 512 received bitmap: bit (i & 7) of byte i / 8 set: chunk i is written in the staging slot
 *   568 4 CRC-32 of bytes 0 .. 568
 * Every save writes one copy, the one that is not the newest valid: a power loss inside it leaves
 * the other, one save older (it names fewer chunks: they are fetched again). A chunk's bit is
 * saved only after the chunk is written, and a new download's record (no bit set) before its first
 * chunk, so a valid record never names a chunk its slot does not hold; the final sha256 of the
 * whole model stays the guard all the same.
 */
#ifndef SLOTS_H
#define SLOTS_H

#include <stddef.h>
#include <stdint.h>

#include "ed25519_verify.h"
#include "ota_receiver.h"

#define SLOTS_PROVISIONING_OFFSET 0x00000u
#define SLOTS_SECTOR_BYTES 0x1000u
#define SLOTS_TABLE_OFFSET(copy) (0x01000u + SLOTS_SECTOR_BYTES * (uint32_t)(copy))
#define SLOTS_TRANSFER_OFFSET(copy) (0x03000u + SLOTS_SECTOR_BYTES * (uint32_t)(copy))
#define SLOTS_SLOT_BYTES (128u * 1024u)
#define SLOTS_SLOT_OFFSET(slot) (0x10000u + SLOTS_SLOT_BYTES * (uint32_t)(slot))
#define SLOTS_REGION_BYTES SLOTS_SLOT_OFFSET(2)
#define SLOTS_NONE 0xFFu

#define SLOTS_LAYOUT_VERSION 1u
#define SLOTS_MAX_NAME 64u    /* device, fleet, group: OTA_PROTOCOL.md names */
#define SLOTS_MAX_PROFILE 32u /* a manifest target */
#define SLOTS_ENTRY_BYTES 1140u
#define SLOTS_TABLE_BYTES (16u + 2u * SLOTS_ENTRY_BYTES + 4u)
#define SLOTS_BITMAP_BYTES (OTA_MAX_CHUNKS / 8u)
#define SLOTS_TRANSFER_BYTES (56u + SLOTS_BITMAP_BYTES + 4u)

typedef enum {
    SLOTS_OK = 0,
    SLOTS_FALLBACK = 1, /* boot: the active model failed its sha256, the previous one runs */
    SLOTS_EMPTY = 2,    /* boot: no verified model */
    SLOTS_ERR_NULL = -1,
    SLOTS_ERR_REGION = -2,  /* the board's flash region is smaller than SLOTS_REGION_BYTES */
    SLOTS_ERR_MAGIC = -3,
    SLOTS_ERR_VERSION = -4,
    SLOTS_ERR_LENGTH = -5,
    SLOTS_ERR_CRC = -6,
    SLOTS_ERR_FIELD = -7,   /* a field out of range */
    SLOTS_ERR_WRITE = -8    /* the board refused a flash write */
} slots_status_t;

/* The region: memory-mapped reads, writes through the board (board_flash_* on the device). */
typedef struct {
    const uint8_t *base;
    uint32_t size;
    int (*write)(uint32_t offset, const uint8_t *data, size_t len); /* 0 or -1 */
} slots_flash_t;

typedef struct {
    char device[SLOTS_MAX_NAME + 1];
    char fleet[SLOTS_MAX_NAME + 1];
    char group[SLOTS_MAX_NAME + 1]; /* "" when the device has none */
    char profile[SLOTS_MAX_PROFILE + 1];
    uint8_t n_keys;
    ed25519_key_t keys[ED25519_MAX_KEYS];
} slots_provisioning_t;

typedef struct {
    uint32_t model_size; /* 0: empty */
    uint32_t version;
    uint8_t sha256[OTA_SHA256_BYTES];
    uint32_t arena_bytes;
    float threshold;
    char name[OTA_MAX_NAME + 1];
    uint16_t dsp_len;
    uint8_t dsp[OTA_MAX_DSP_BLOCK];
} slots_entry_t;

typedef struct {
    uint32_t seq; /* 0: no valid copy was found */
    uint8_t active;
    uint8_t previous;
    slots_entry_t slot[2];
} slots_table_t;

/* The download in progress, as the transfer record keeps it. */
typedef struct {
    uint32_t seq;     /* of the newest valid copy in flash (0: none); the next save writes seq + 1 */
    uint32_t version; /* 0: no transfer */
    uint8_t sha256[OTA_SHA256_BYTES];
    uint32_t model_size;
    uint16_t chunk_count;
    uint8_t slot;
    uint8_t received[SLOTS_BITMAP_BYTES];
} slots_transfer_t;

int slots_load_provisioning(const slots_flash_t *flash, slots_provisioning_t *out);

/* The valid copy with the highest seq (SLOTS_OK), or an empty table (SLOTS_EMPTY). */
int slots_load_table(const slots_flash_t *flash, slots_table_t *out);

/* Load the table and re-verify the active model's sha256; on a mismatch fall back to the previous
 * slot if it verifies (SLOTS_FALLBACK, the table in RAM then names it active), else SLOTS_EMPTY. */
int slots_boot(const slots_flash_t *flash, slots_table_t *table);

/* Whether the slot holds the model its entry names (size in range, sha256 matches). */
int slots_verify(const slots_flash_t *flash, const slots_table_t *table, uint8_t slot);

/* The slot a download goes to: never the active one. */
uint8_t slots_staging(const slots_table_t *table);

/* The model bytes of a slot, memory-mapped. */
const uint8_t *slots_model(const slots_flash_t *flash, uint8_t slot);

/* Make `slot` active with `entry` (its model already written and verified), the active one
 * previous; both copies rewritten as the header comment says. The table in RAM changes only on
 * SLOTS_OK. */
int slots_commit(const slots_flash_t *flash, slots_table_t *table, uint8_t slot, const slots_entry_t *entry);

/* Encode one table copy (SLOTS_TABLE_BYTES); for the commit and the host tests. */
void slots_encode_table(const slots_table_t *table, uint8_t out[SLOTS_TABLE_BYTES]);

/* The newest valid transfer record: SLOTS_OK with a transfer (version > 0), else SLOTS_EMPTY with
 * *out cleared (no valid copy, or the record was cleared); out->seq is the newest seq either way. */
int slots_load_transfer(const slots_flash_t *flash, slots_transfer_t *out);

/* Write `record` (seq + 1 over the newest in flash) over the copy that is not the newest valid
 * one; record->seq is updated on SLOTS_OK. One write of SLOTS_TRANSFER_BYTES. */
int slots_save_transfer(const slots_flash_t *flash, slots_transfer_t *record);

/* Save a record of no transfer (version 0) over `record`: after a commit, a failure, a cancel. */
int slots_clear_transfer(const slots_flash_t *flash, slots_transfer_t *record);

/* Encode one transfer record copy (SLOTS_TRANSFER_BYTES); for the save and the host tests. */
void slots_encode_transfer(const slots_transfer_t *record, uint8_t out[SLOTS_TRANSFER_BYTES]);

#endif /* SLOTS_H */
