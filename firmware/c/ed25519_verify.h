/*
 * Ed25519 manifest signatures on the device: the ota_verify_fn of ota_receiver.h over the
 * provisioned key ring (key id, 32-byte public key, revoked flag), on Monocypher.
 *
 * Standard Ed25519 (RFC 8032) hashes with SHA-512. The pymonocypher sdist ships Monocypher 4's
 * monocypher.c without the optional monocypher-ed25519.c (whose crypto_ed25519_check is
 * SHA-512 + crypto_eddsa_reduce + crypto_eddsa_check_equation), so this file carries that
 * SHA-512 and composes the same check from Monocypher's EdDSA building blocks.
 */
#ifndef ED25519_VERIFY_H
#define ED25519_VERIFY_H

#include <stddef.h>
#include <stdint.h>

#include "ota_receiver.h"

#define ED25519_MAX_KEYS 8
#define ED25519_PUBLIC_KEY_BYTES 32

typedef struct {
    char key_id[OTA_MAX_KEY_ID + 1];
    uint8_t public_key[ED25519_PUBLIC_KEY_BYTES];
    uint8_t has_key; /* 0: a revoked id whose key is no longer listed */
    uint8_t revoked; /* refused even while its key is listed (checked first, as firmware.signing.KeyRing) */
} ed25519_key_t;

/* The key ring ed25519_verify checks against; the array must outlive its use (not copied). */
void ed25519_verify_set_keys(const ed25519_key_t *keys, size_t n_keys);

/* ota_verify_fn: OTA_OK, OTA_ERR_REVOKED_KEY, OTA_ERR_UNKNOWN_KEY or OTA_ERR_BAD_SIGNATURE. */
int ed25519_verify(const uint8_t *msg, size_t len, const uint8_t *sig, const char *key_id);

/* Standard Ed25519 check of sig over msg[0..len) by public_key: 0 valid, -1 not. */
int ed25519_check(const uint8_t sig[64], const uint8_t public_key[32], const uint8_t *msg, size_t len);

/* SHA-512 of the concatenation of up to three parts (R, A, M for Ed25519). */
void ed25519_sha512(uint8_t out[64], const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len,
                    const uint8_t *c, size_t c_len);

#endif /* ED25519_VERIFY_H */
