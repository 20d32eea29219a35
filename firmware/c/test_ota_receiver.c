/*
 * Unit tests of the OTA receiver: known-answer tests of CRC-32 and SHA-256, every corruption of a
 * manifest and a chunk, and a replay of vectors/script.txt, the transcript of the Python receiver
 * (firmware.ota.write_test_vectors): every command's result must equal the Python one, and the
 * assembled model must equal vectors/model.bin byte for byte.
 *
 * Ed25519 is the platform's job (ota_verify_fn); the stub here accepts exactly the (key id,
 * signed bytes, signature) triples the Python key ring verified ("trust" lines), and answers
 * revoked and unknown key ids as the key ring does.
 *
 * Usage: test_ota_receiver VECTOR_DIR. Prints "N passed, M failed"; exits 1 on any failure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ota_receiver.h"

#define MAX_KEYS 8
#define MAX_TRUST 32
#define MAX_FILE (512 * 1024)

static int passed;
static int failed;

static void check(int ok, const char *what, const char *detail) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL: %s %s\n", what, detail ? detail : "");
    }
}

/* ---- the stub verifier ---- */

static char known_keys[MAX_KEYS][OTA_MAX_KEY_ID + 1];
static int known_revoked[MAX_KEYS];
static int n_keys;
static char trust_key[MAX_TRUST][OTA_MAX_KEY_ID + 1];
static uint8_t trust_digest[MAX_TRUST][OTA_SHA256_BYTES];
static uint8_t trust_sig[MAX_TRUST][OTA_SIGNATURE_BYTES];
static int n_trust;

static int stub_verify(const uint8_t *msg, size_t len, const uint8_t *sig, const char *key_id) {
    int key = -1;
    for (int i = 0; i < n_keys; i++) {
        if (strcmp(known_keys[i], key_id) == 0) {
            key = i;
        }
    }
    if (key >= 0 && known_revoked[key]) {
        return OTA_ERR_REVOKED_KEY;
    }
    if (key < 0) {
        return OTA_ERR_UNKNOWN_KEY;
    }
    uint8_t digest[OTA_SHA256_BYTES];
    ota_sha256(msg, len, digest);
    for (int i = 0; i < n_trust; i++) {
        if (strcmp(trust_key[i], key_id) == 0 && memcmp(trust_digest[i], digest, sizeof digest) == 0 &&
            memcmp(trust_sig[i], sig, OTA_SIGNATURE_BYTES) == 0) {
            return OTA_OK;
        }
    }
    return OTA_ERR_BAD_SIGNATURE;
}

/* ---- helpers ---- */

static int from_hex(const char *hex, uint8_t *out, size_t n) {
    if (strlen(hex) != 2 * n) {
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned byte;
        if (sscanf(hex + 2 * i, "%2x", &byte) != 1) {
            return 0;
        }
        out[i] = (uint8_t)byte;
    }
    return 1;
}

static void to_hex(const uint8_t *data, size_t n, char *out) {
    for (size_t i = 0; i < n; i++) {
        sprintf(out + 2 * i, "%02x", data[i]);
    }
}

static size_t read_file(const char *dir, const char *name, uint8_t *buf, size_t cap) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(2);
    }
    size_t n = fread(buf, 1, cap, f);
    fclose(f);
    return n;
}

/* ---- known answers and exhaustive corruptions ---- */

static void test_known_answers(void) {
    const char *digits = "123456789";
    check(ota_crc32((const uint8_t *)digits, 9) == 0xCBF43926u, "crc32", "of 123456789");
    check(ota_crc32(NULL, 0) == 0, "crc32", "of nothing");
    uint8_t digest[32];
    char hex[65];
    ota_sha256((const uint8_t *)"abc", 3, digest);
    to_hex(digest, 32, hex);
    check(strcmp(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") == 0, "sha256", "of abc");
    ota_sha256((const uint8_t *)"", 0, digest);
    to_hex(digest, 32, hex);
    check(strcmp(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855") == 0, "sha256", "of ''");
    /* 1,000,000 x 'a' in pieces of 1000: exercises the incremental path across block edges */
    uint8_t a[1000];
    memset(a, 'a', sizeof a);
    ota_sha256_t ctx;
    ota_sha256_init(&ctx);
    for (int i = 0; i < 1000; i++) {
        ota_sha256_update(&ctx, a, sizeof a);
    }
    ota_sha256_final(&ctx, digest);
    to_hex(digest, 32, hex);
    check(strcmp(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0") == 0, "sha256", "of 1M a");
    check(strcmp(ota_status_name(OTA_ERR_BUFFER), "ERR_BUFFER") == 0, "status name", "ERR_BUFFER");
    check(strcmp(ota_status_name(OTA_SAME), "SAME") == 0, "status name", "SAME");
    check(strcmp(ota_status_name(-99), "UNKNOWN") == 0, "status name", "unknown code");
    check(ota_receiver_on_chunk(NULL, a, 10) == OTA_ERR_NULL, "null receiver", "");
}

/* Every single-byte change and every truncation of a valid message must be rejected. */
static void test_every_corruption(const uint8_t *msg, size_t len, int is_manifest, const char *what) {
    static uint8_t copy[MAX_FILE];
    static ota_manifest_t manifest;
    ota_chunk_t chunk;
    int accepted = 0;
    for (size_t i = 0; i < len; i++) {
        memcpy(copy, msg, len);
        copy[i] ^= 0x01;
        int code = is_manifest ? ota_parse_manifest(copy, len, &manifest) : ota_parse_chunk(copy, len, &chunk);
        accepted += code >= 0;
    }
    for (size_t n = 0; n < len; n++) {
        int code = is_manifest ? ota_parse_manifest(msg, n, &manifest) : ota_parse_chunk(msg, n, &chunk);
        accepted += code >= 0;
    }
    check(accepted == 0, "every corruption rejected:", what);
}

/* ---- the script replay ---- */

static int expect_code(int code, const char *expected, const char *line) {
    int ok = strcmp(ota_status_name(code), expected) == 0;
    if (!ok) {
        fprintf(stderr, "  got %s\n", ota_status_name(code));
    }
    check(ok, "script:", line);
    return ok;
}

static void replay(const char *dir) {
    static uint8_t buf[MAX_FILE];
    static uint8_t other[MAX_FILE];
    static ota_receiver_t rx;
    char path[1024];
    snprintf(path, sizeof path, "%s/script.txt", dir);
    FILE *script = fopen(path, "r");
    if (script == NULL) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(2);
    }
    char device[80] = "", group[80] = "", profile[40] = "", dsp[64] = "";
    unsigned long slot = 0, ram = 0, active = 0;
    uint8_t *staging = NULL;
    ota_config_t config;
    memset(&config, 0, sizeof config);
    char line[512];
    while (fgets(line, sizeof line, script) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        char cmd[32] = "", a[160] = "", b[160] = "", c[160] = "";
        int words = sscanf(line, "%31s %159s %159s %159s", cmd, a, b, c);
        if (words < 1) {
            continue;
        }
        if (strcmp(cmd, "config") == 0) {
            sscanf(line, "config %79s %79s %39s %lu %lu %lu %63s", device, group, profile, &slot, &ram, &active, dsp);
            config.device_id = device;
            config.group = strcmp(group, "-") == 0 ? NULL : group;
            config.profile = profile;
            config.ram_bytes = (uint32_t)ram;
            config.dsp_versions = 0;
            for (char *v = strtok(dsp, ","); v != NULL; v = strtok(NULL, ",")) {
                config.dsp_versions |= 1u << atoi(v);
            }
            config.verify = stub_verify;
            free(staging);
            staging = malloc(slot);
        } else if (strcmp(cmd, "limit") == 0) {
            long limit = strcmp(a, "manifest") == 0 ? OTA_MANIFEST_MAX_BYTES
                         : strcmp(a, "chunk") == 0  ? OTA_CHUNK_MAX_BYTES
                         : strcmp(a, "request") == 0 ? OTA_REQUEST_MAX_BYTES
                                                     : -1;
            check(limit == atol(b), "script:", line);
        } else if (strcmp(cmd, "key") == 0 && n_keys < MAX_KEYS) {
            snprintf(known_keys[n_keys], sizeof known_keys[n_keys], "%s", a);
            known_revoked[n_keys++] = strcmp(b, "revoked") == 0;
        } else if (strcmp(cmd, "trust") == 0 && n_trust < MAX_TRUST) {
            snprintf(trust_key[n_trust], sizeof trust_key[n_trust], "%s", a);
            int ok = from_hex(b, trust_digest[n_trust], OTA_SHA256_BYTES) && from_hex(c, trust_sig[n_trust], 64);
            check(ok, "script: malformed", line);
            n_trust++;
        } else if (strcmp(cmd, "sha256") == 0) {
            size_t n = read_file(dir, a, buf, sizeof buf);
            uint8_t digest[32];
            char hex[65];
            ota_sha256(buf, n, digest);
            to_hex(digest, 32, hex);
            check(strcmp(hex, b) == 0, "script:", line);
        } else if (strcmp(cmd, "crc") == 0) {
            size_t n = read_file(dir, a, buf, sizeof buf);
            size_t skip = (size_t)atoi(b);
            char hex[9] = "";
            if (n >= skip) {
                snprintf(hex, sizeof hex, "%08lx", (unsigned long)ota_crc32(buf, n - skip));
            }
            check(strcmp(hex, c) == 0, "script:", line);
        } else if (strcmp(cmd, "reset") == 0) {
            ota_receiver_init(&rx, &config, staging, slot, (uint32_t)active);
        } else if (strcmp(cmd, "manifest") == 0) {
            size_t n = read_file(dir, a, buf, sizeof buf);
            expect_code(ota_receiver_on_manifest(&rx, buf, n), b, line);
        } else if (strcmp(cmd, "chunk") == 0) {
            size_t n = read_file(dir, a, buf, sizeof buf);
            expect_code(ota_receiver_on_chunk(&rx, buf, n), b, line);
        } else if (strcmp(cmd, "finish") == 0) {
            expect_code(ota_receiver_finish(&rx), a, line);
        } else if (strcmp(cmd, "commit") == 0) {
            ota_receiver_commit(&rx);
        } else if (strcmp(cmd, "missing") == 0) {
            uint16_t idx[OTA_MAX_CHUNKS];
            size_t n = ota_receiver_missing(&rx, idx, (size_t)atoi(a));
            char got[160] = "";
            for (size_t i = 0; i < n; i++) {
                snprintf(got + strlen(got), sizeof got - strlen(got), i ? ",%u" : "%u", idx[i]);
            }
            check(strcmp(n ? got : "-", b) == 0, "script:", line);
        } else if (strcmp(cmd, "request") == 0) {
            size_t expected = read_file(dir, b, buf, sizeof buf), n = 0;
            int code = ota_receiver_request(&rx, (size_t)atoi(a), other, sizeof other, &n);
            check(code == OTA_OK && n == expected && memcmp(other, buf, n) == 0, "script:", line);
            if (n > 0) {
                size_t small = 0;
                check(ota_receiver_request(&rx, (size_t)atoi(a), other, n - 1, &small) == OTA_ERR_BUFFER,
                      "request into a too small buffer", "");
            }
        } else if (strcmp(cmd, "image") == 0) {
            size_t n = read_file(dir, a, buf, sizeof buf);
            check(n == rx.manifest.model_size && memcmp(staging, buf, n) == 0, "script:", line);
        } else {
            check(0, "script: unknown command", line);
        }
    }
    fclose(script);
    free(staging);
}

/* ota_receiver_resume: a restart that kept chunks 0 and 2 of manifest_ok asks for 1, 3, 4 only, and
 * the final sha256 still guards the model (a kept chunk that is wrong fails it). */
static void test_resume(const char *dir) {
    static uint8_t buf[MAX_FILE];
    static uint8_t staging[262144];
    static ota_receiver_t rx;
    static const char *const chunks[] = {"chunk_000.bin", "chunk_001.bin", "chunk_002.bin", "chunk_003.bin",
                                         "chunk_004.bin"};
    ota_config_t config = {"node-0007", "line-3", "nrf52840", 131072, (1u << 1) | (1u << 2), stub_verify};
    uint16_t idx[8];
    ota_receiver_init(&rx, &config, staging, sizeof staging, 2);
    check(ota_receiver_resume(&rx, NULL, 0) == OTA_ERR_NO_MANIFEST, "resume", "without a manifest");
    size_t n = read_file(dir, "manifest_ok.bin", buf, sizeof buf);
    check(ota_receiver_on_manifest(&rx, buf, n) == OTA_OK, "resume", "manifest accepted");
    check(rx.manifest.chunk_count == 5, "resume", "5 chunks");
    for (int pass = 0; pass < 2; pass++) {
        /* what the first boot stored: chunks 0 and 2 (pass 1: chunk 2 damaged in staging) */
        for (unsigned k = 0; k < 2; k++) {
            unsigned i = k * 2u; /* chunks 0 and 2 */
            size_t len = read_file(dir, chunks[i], buf, sizeof buf);
            ota_chunk_t chunk;
            check(ota_parse_chunk(buf, len, &chunk) == OTA_OK, "resume", chunks[i]);
            memcpy(staging + (size_t)chunk.index * rx.manifest.chunk_size, chunk.payload, chunk.length);
        }
        if (pass == 1) {
            staging[2u * rx.manifest.chunk_size] ^= 1u;
        }
        const uint8_t kept[2] = {0x05u | 0xE0u, 0xFFu}; /* chunks 0, 2; bits past the count ignored */
        check(ota_receiver_resume(&rx, kept, sizeof kept) == OTA_OK, "resume", "kept chunks 0 and 2");
        check(rx.n_received == 2 && ota_receiver_missing(&rx, idx, 8) == 3 && idx[0] == 1 && idx[1] == 3 &&
                  idx[2] == 4,
              "resume", "missing 1, 3, 4");
        check(ota_receiver_on_chunk(&rx, buf, read_file(dir, chunks[0], buf, sizeof buf)) == OTA_DUPLICATE, "resume",
              "a kept chunk is a duplicate");
        int code = OTA_OK;
        static const unsigned missing[3] = {1, 3, 4};
        for (unsigned k = 0; k < 3; k++) {
            code = ota_receiver_on_chunk(&rx, buf, read_file(dir, chunks[missing[k]], buf, sizeof buf));
        }
        check(code == OTA_DONE, "resume", "done after the missing chunks");
        check(ota_receiver_finish(&rx) == (pass == 0 ? OTA_OK : OTA_ERR_SHA256), "resume",
              pass == 0 ? "sha256 of the resumed model" : "a wrong kept chunk fails the sha256");
        if (pass == 1) {
            check(ota_receiver_resume(&rx, NULL, 0) == OTA_OK && rx.n_received == 0 && rx.downloading, "resume",
                  "starts over with NULL");
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s VECTOR_DIR\n", argv[0]);
        return 2;
    }
    static uint8_t msg[MAX_FILE];
    test_known_answers();
    size_t n = read_file(argv[1], "manifest_ok.bin", msg, sizeof msg);
    test_every_corruption(msg, n, 1, "manifest_ok.bin");
    n = read_file(argv[1], "chunk_004.bin", msg, sizeof msg);
    test_every_corruption(msg, n, 0, "chunk_004.bin");
    replay(argv[1]);
    test_resume(argv[1]);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 && passed > 0 ? 0 : 1;
}
