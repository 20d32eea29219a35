/* Ed25519 verification over the provisioned key ring: see ed25519_verify.h. C99, no heap. */
#include "ed25519_verify.h"

#include <string.h>

#include "monocypher.h"

/* ---- SHA-512 (FIPS 180-4) ---- */

static const uint64_t sha512_k[80] = {
    0x428a2f98d728ae22u, 0x7137449123ef65cdu, 0xb5c0fbcfec4d3b2fu, 0xe9b5dba58189dbbcu, 0x3956c25bf348b538u,
    0x59f111f1b605d019u, 0x923f82a4af194f9bu, 0xab1c5ed5da6d8118u, 0xd807aa98a3030242u, 0x12835b0145706fbeu,
    0x243185be4ee4b28cu, 0x550c7dc3d5ffb4e2u, 0x72be5d74f27b896fu, 0x80deb1fe3b1696b1u, 0x9bdc06a725c71235u,
    0xc19bf174cf692694u, 0xe49b69c19ef14ad2u, 0xefbe4786384f25e3u, 0x0fc19dc68b8cd5b5u, 0x240ca1cc77ac9c65u,
    0x2de92c6f592b0275u, 0x4a7484aa6ea6e483u, 0x5cb0a9dcbd41fbd4u, 0x76f988da831153b5u, 0x983e5152ee66dfabu,
    0xa831c66d2db43210u, 0xb00327c898fb213fu, 0xbf597fc7beef0ee4u, 0xc6e00bf33da88fc2u, 0xd5a79147930aa725u,
    0x06ca6351e003826fu, 0x142929670a0e6e70u, 0x27b70a8546d22ffcu, 0x2e1b21385c26c926u, 0x4d2c6dfc5ac42aedu,
    0x53380d139d95b3dfu, 0x650a73548baf63deu, 0x766a0abb3c77b2a8u, 0x81c2c92e47edaee6u, 0x92722c851482353bu,
    0xa2bfe8a14cf10364u, 0xa81a664bbc423001u, 0xc24b8b70d0f89791u, 0xc76c51a30654be30u, 0xd192e819d6ef5218u,
    0xd69906245565a910u, 0xf40e35855771202au, 0x106aa07032bbd1b8u, 0x19a4c116b8d2d0c8u, 0x1e376c085141ab53u,
    0x2748774cdf8eeb99u, 0x34b0bcb5e19b48a8u, 0x391c0cb3c5c95a63u, 0x4ed8aa4ae3418acbu, 0x5b9cca4f7763e373u,
    0x682e6ff3d6b2b8a3u, 0x748f82ee5defb2fcu, 0x78a5636f43172f60u, 0x84c87814a1f0ab72u, 0x8cc702081a6439ecu,
    0x90befffa23631e28u, 0xa4506cebde82bde9u, 0xbef9a3f7b2c67915u, 0xc67178f2e372532bu, 0xca273eceea26619cu,
    0xd186b8c721c0c207u, 0xeada7dd6cde0eb1eu, 0xf57d4f7fee6ed178u, 0x06f067aa72176fbau, 0x0a637dc5a2c898a6u,
    0x113f9804bef90daeu, 0x1b710b35131c471bu, 0x28db77f523047d84u, 0x32caab7b40c72493u, 0x3c9ebe0a15c9bebcu,
    0x431d67c49c100d4cu, 0x4cc5d4becb3e42b6u, 0x597f299cfc657e2au, 0x5fcb6fab3ad6faecu, 0x6c44198c4a475817u,
};

typedef struct {
    uint64_t state[8];
    uint64_t bytes; /* messages here are < 2^61 bytes: the high 64 bits of the length are 0 */
    uint8_t block[128];
    size_t used;
} sha512_t;

static uint64_t rotr64(uint64_t x, unsigned n) { return (x >> n) | (x << (64u - n)); }

static void sha512_block(uint64_t state[8], const uint8_t block[128]) {
    uint64_t w[80];
    for (unsigned i = 0; i < 16; i++) {
        uint64_t v = 0;
        for (unsigned j = 0; j < 8; j++) {
            v = v << 8 | block[8 * i + j];
        }
        w[i] = v;
    }
    for (unsigned i = 16; i < 80; i++) {
        uint64_t s0 = rotr64(w[i - 15], 1) ^ rotr64(w[i - 15], 8) ^ (w[i - 15] >> 7);
        uint64_t s1 = rotr64(w[i - 2], 19) ^ rotr64(w[i - 2], 61) ^ (w[i - 2] >> 6);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint64_t a = state[0], b = state[1], c = state[2], d = state[3];
    uint64_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (unsigned i = 0; i < 80; i++) {
        uint64_t t1 = h + (rotr64(e, 14) ^ rotr64(e, 18) ^ rotr64(e, 41)) + ((e & f) ^ (~e & g)) + sha512_k[i] + w[i];
        uint64_t t2 = (rotr64(a, 28) ^ rotr64(a, 34) ^ rotr64(a, 39)) + ((a & b) ^ (a & c) ^ (b & c));
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

static void sha512_update(sha512_t *ctx, const uint8_t *data, size_t len) {
    ctx->bytes += len;
    while (len > 0) {
        size_t take = 128 - ctx->used < len ? 128 - ctx->used : len;
        memcpy(ctx->block + ctx->used, data, take);
        ctx->used += take;
        data += take;
        len -= take;
        if (ctx->used == 128) {
            sha512_block(ctx->state, ctx->block);
            ctx->used = 0;
        }
    }
}

void ed25519_sha512(uint8_t out[64], const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len,
                    const uint8_t *c, size_t c_len) {
    static const uint64_t init[8] = {0x6a09e667f3bcc908u, 0xbb67ae8584caa73bu, 0x3c6ef372fe94f82bu,
                                     0xa54ff53a5f1d36f1u, 0x510e527fade682d1u, 0x9b05688c2b3e6c1fu,
                                     0x1f83d9abfb41bd6bu, 0x5be0cd19137e2179u};
    sha512_t ctx;
    memcpy(ctx.state, init, sizeof init);
    ctx.bytes = 0;
    ctx.used = 0;
    sha512_update(&ctx, a, a_len);
    sha512_update(&ctx, b, b_len);
    sha512_update(&ctx, c, c_len);
    uint64_t bits = ctx.bytes * 8u;
    uint8_t pad = 0x80;
    sha512_update(&ctx, &pad, 1);
    pad = 0;
    while (ctx.used != 112) {
        sha512_update(&ctx, &pad, 1);
    }
    uint8_t length[16] = {0};
    for (unsigned i = 0; i < 8; i++) {
        length[8 + i] = (uint8_t)(bits >> (56 - 8 * i));
    }
    sha512_update(&ctx, length, sizeof length);
    for (unsigned i = 0; i < 8; i++) {
        for (unsigned j = 0; j < 8; j++) {
            out[8 * i + j] = (uint8_t)(ctx.state[i] >> (56 - 8 * j));
        }
    }
}

/* ---- Ed25519 ---- */

int ed25519_check(const uint8_t sig[64], const uint8_t public_key[32], const uint8_t *msg, size_t len) {
    uint8_t hash[64];
    uint8_t h_ram[32];
    /* h = SHA-512(R || A || M) mod L, then [S]B = R + [h]A (Monocypher checks S < L) */
    ed25519_sha512(hash, sig, 32, public_key, 32, msg, len);
    crypto_eddsa_reduce(h_ram, hash);
    return crypto_eddsa_check_equation(sig, public_key, h_ram) == 0 ? 0 : -1;
}

static const ed25519_key_t *ring;
static size_t ring_size;

void ed25519_verify_set_keys(const ed25519_key_t *keys, size_t n_keys) {
    ring = keys;
    ring_size = keys != NULL ? n_keys : 0;
}

int ed25519_verify(const uint8_t *msg, size_t len, const uint8_t *sig, const char *key_id) {
    if (msg == NULL || sig == NULL || key_id == NULL) {
        return OTA_ERR_NULL;
    }
    const ed25519_key_t *found = NULL;
    for (size_t i = 0; i < ring_size; i++) {
        if (strcmp(ring[i].key_id, key_id) == 0) {
            found = &ring[i];
            break;
        }
    }
    if (found != NULL && found->revoked) {
        return OTA_ERR_REVOKED_KEY;
    }
    if (found == NULL || !found->has_key) {
        return OTA_ERR_UNKNOWN_KEY;
    }
    return ed25519_check(sig, found->public_key, msg, len) == 0 ? OTA_OK : OTA_ERR_BAD_SIGNATURE;
}
