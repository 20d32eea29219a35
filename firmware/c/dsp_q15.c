/* The fixed-point DSP front end; see dsp_q15.h for the contract, the arithmetic and the memory. */
#include "dsp_q15.h"

#include <math.h>   /* dspq_init_tables only */
#include <string.h> /* memcpy, NULL */

/* ARMv6-M (Cortex-M0/M0+) has only a 32 x 32 -> 32 multiply: 64-bit products are built from
 * 16-bit halves there (bit-identical to the 64-bit expressions used elsewhere). */
#if defined(__ARM_ARCH_6M__) || defined(DSPQ_SPLIT_MUL)
#define DSPQ_SPLIT 1
#else
#define DSPQ_SPLIT 0
#endif

#define Q16 16
#define NEG_INF_Q16 (INT32_MIN / 4) /* log2 of 0; far below any real value, no overflow when added to */
#define LOG2_EPS_Q16 (-2612471)     /* log2(1e-12) = -39.863137 in Q16 */
#define LOG10_2_Q31 646456993       /* log10(2) in Q31 */

static int valid_size(uint32_t n) { return n >= DSPQ_MIN_N && n <= DSPQ_MAX_N && (n & (n - 1u)) == 0u; }

static uint32_t log2_pow2(uint32_t n) {
    uint32_t k = 0;
    while ((1u << k) < n) k++;
    return k;
}

static uint32_t clz32(uint32_t v) {
#ifdef __GNUC__
    return v == 0u ? 32u : (uint32_t)__builtin_clz(v);
#else
    uint32_t k = 0;
    if (v == 0u) return 32u;
    while ((v & 0x80000000u) == 0u) {
        v <<= 1;
        k++;
    }
    return k;
#endif
}

/* Number of significant bits of a bound built by OR-ing |v| (v ^ (v >> 31)) of a block. */
static uint32_t bit_length(uint32_t v) { return 32u - clz32(v); }

static uint64_t umul32(uint32_t a, uint32_t b) {
#if DSPQ_SPLIT
    uint32_t al = a & 0xFFFFu, ah = a >> 16, bl = b & 0xFFFFu, bh = b >> 16;
    uint32_t ll = al * bl, lh = al * bh, hl = ah * bl, hh = ah * bh;
    uint32_t mid = (ll >> 16) + (lh & 0xFFFFu) + (hl & 0xFFFFu);
    uint32_t hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16);
    return ((uint64_t)hi << 32) | (uint64_t)((mid << 16) | (ll & 0xFFFFu));
#else
    return (uint64_t)a * b;
#endif
}

/* a w / 2^31 for a Q31 twiddle w and |a| <= 2^29 (or a Q30 Hann value w and |a| < 2^31), from
 * 16-bit halves: the a_lo w_lo term (< 2 units) is dropped, the cross terms are rounded. Error < 3
 * units, and the same expression on every core (one MULS each on ARMv6-M, no 64-bit product). */
static inline int32_t mul_q31(int32_t a, int32_t w) {
    int32_t ah = a >> 16, al = (int32_t)((uint32_t)a & 0xFFFFu);
    int32_t wh = w >> 16, wl = (int32_t)((uint32_t)w & 0xFFFFu);
    return 2 * ah * wh + ((ah * wl + 16384) >> 15) + ((al * wh + 16384) >> 15);
}

static inline uint64_t square(int32_t v) {
    uint32_t m = (uint32_t)(v < 0 ? -v : v);
    return umul32(m, m);
}

/* log2(v) in Q16 for v >= 1: the exponent by CLZ, 16 fraction bits by repeated squaring of the
 * Q31 mantissa (truncated: error in [0, 2^-16)). */
static int32_t log2_u64_q16(uint64_t v) {
    uint32_t hi = (uint32_t)(v >> 32), k, m, bit;
    int32_t r;
    if (hi != 0u) {
        uint32_t z = clz32(hi);
        k = 63u - z;
        m = (uint32_t)((v << z) >> 32); /* top bit set: Q31 mantissa in [1, 2) */
    } else {
        uint32_t lo = (uint32_t)v, z = clz32(lo);
        k = 31u - z;
        m = lo << z;
    }
    r = (int32_t)(k << Q16);
    for (bit = 1u << 15; bit != 0u; bit >>= 1) {
        uint64_t p = umul32(m, m); /* Q62: [1, 4) */
        if ((p >> 63) != 0u) {
            r |= (int32_t)bit;
            m = (uint32_t)(p >> 32);
        } else {
            m = (uint32_t)(p >> 31);
        }
    }
    return r;
}

/* 2^(-2^-j) in Q31, j = 1..16: the factors of the bit-serial exp2. */
static const uint32_t EXP2_NEG[16] = {
    1518500250u, 1805811301u, 1969251188u, 2056437387u, 2101467502u, 2124350982u, 2135885998u, 2141676973u,
    2144578345u, 2146030505u, 2146756953u, 2147120270u, 2147301951u, 2147392798u, 2147438222u, 2147460935u,
};

/* 2^(-f / 65536) in Q31 for f in [0, 65535]. */
static uint32_t exp2_neg_frac_q31(uint32_t f) {
    uint32_t r = 0x80000000u, j; /* 1.0 as an unsigned Q31 */
    for (j = 0; j < 16u; j++) {
        if ((f & (0x8000u >> j)) != 0u) r = (uint32_t)(umul32(r, EXP2_NEG[j]) >> 31);
    }
    return r;
}

/* log2(2^a + 2^b) in Q16: the reference's "+ 1e-12" as a log-add. */
static int32_t log_add_q16(int32_t a, int32_t b) {
    int32_t hi = a > b ? a : b, lo = a > b ? b : a;
    uint32_t d;
    uint64_t sum;
    if (lo <= NEG_INF_Q16) return hi;
    d = (uint32_t)(hi - lo);
    if (d >= (17u << Q16)) return hi; /* log2(1 + 2^-17) < 2^-16 */
    /* 1 + 2^-d in Q40: 2^-(int) >> and the fraction from the table */
    sum = ((uint64_t)1u << 40) + ((uint64_t)exp2_neg_frac_q31(d & 0xFFFFu) << 9 >> (d >> Q16));
    return hi + log2_u64_q16(sum) - (40 << Q16);
}

/* 2^x in Q16 for x in Q16, saturated to INT32_MAX. */
static int32_t exp2_q16(int32_t x) {
    int32_t whole = x >> Q16; /* floor */
    uint32_t frac = (uint32_t)x & 0xFFFFu;
    /* 2^x = 2^(whole + 1) 2^-(1 - frac) */
    uint32_t m = frac == 0u ? 0x80000000u : exp2_neg_frac_q31(65536u - frac); /* Q31 of 2^-(1 - frac) or 1 */
    int32_t shift = frac == 0u ? whole : whole + 1;                          /* result = m 2^shift / 2^31 */
    int32_t right = 31 - Q16 - shift;
    if (right <= 0) return INT32_MAX; /* >= 2^15 */
    if (right >= 63) return 0;
    return (int32_t)(((uint64_t)m + ((uint64_t)1u << (right - 1))) >> right);
}

static int32_t log2_to_log10_q16(int32_t l) {
    int64_t p = (int64_t)l * LOG10_2_Q31;
    return (int32_t)((p + ((int64_t)1 << 30)) >> 31);
}

int dspq_init_tables(uint32_t n, uint32_t *hann, int32_t *twiddle) {
    uint32_t i;
    const double two_pi = 6.283185307179586476925;
    if (hann == NULL || twiddle == NULL) return DSPQ_ERR_NULL;
    if (!valid_size(n)) return DSPQ_ERR_SIZE;
    for (i = 0; i < n; i++) {
        double h = 0.5 - 0.5 * cos(two_pi * (double)i / (double)n);
        hann[i] = (uint32_t)floor(h * 1073741824.0 + 0.5);
    }
    for (i = 0; i < n / 2u; i++) {
        double c = floor(cos(two_pi * (double)i / (double)n) * 2147483648.0 + 0.5);
        double s = floor(-sin(two_pi * (double)i / (double)n) * 2147483648.0 + 0.5);
        twiddle[2u * i] = (int32_t)(c > 2147483647.0 ? 2147483647.0 : c);
        twiddle[2u * i + 1u] = (int32_t)(s > 2147483647.0 ? 2147483647.0 : s);
    }
    return DSPQ_OK;
}

int dspq_check_config(const dspq_config_t *cfg) {
    uint32_t b;
    if (cfg == NULL || cfg->band_edges == NULL || cfg->hann == NULL || cfg->twiddle == NULL) return DSPQ_ERR_NULL;
    if (!valid_size(cfg->window_samples)) return DSPQ_ERR_SIZE;
    if (cfg->n_bands == 0u || cfg->band_edges[cfg->n_bands] > cfg->window_samples / 2u + 1u) return DSPQ_ERR_BANDS;
    for (b = 0; b < cfg->n_bands; b++) {
        if (cfg->band_edges[b + 1u] <= cfg->band_edges[b]) return DSPQ_ERR_BANDS;
    }
    if (cfg->scale_set != 1u) return DSPQ_ERR_ARG;
    return DSPQ_OK;
}

int dspq_set_scale(dspq_config_t *cfg, float scale) {
    uint32_t bits, exponent, mantissa;
    if (cfg == NULL) return DSPQ_ERR_NULL;
    memcpy(&bits, &scale, sizeof bits);
    exponent = (bits >> 23) & 0xFFu;
    mantissa = (bits & 0x7FFFFFu) | 0x800000u;
    cfg->scale_set = 0u;
    if ((bits >> 31) != 0u || exponent == 0u || exponent == 0xFFu) return DSPQ_ERR_ARG; /* <= 0, subnormal, inf, nan */
    /* scale = mantissa 2^(exponent - 127 - 23) */
    cfg->log2_scale_q16 = log2_u64_q16(mantissa) + (((int32_t)exponent - 150) << Q16);
    cfg->scale_set = 1u;
    return DSPQ_OK;
}

/* In-place radix-2 DIT FFT of m complex int32 points (interleaved, input in bit-reversed order),
 * block floating point: before each stage the block is shifted right so that |value| <= 2^29.
 * bound: OR of |values| on entry, updated on return. Returns the total right shift. */
static int32_t fft_bfp(int32_t *z, uint32_t m, const int32_t *tw, uint32_t *bound) {
    uint32_t len, k, i, bits = bit_length(*bound), orv = 0;
    int32_t total = 0;
    for (len = 2; len <= m; len <<= 1) {
        uint32_t half = len >> 1, step = 2u * m / len;
        uint32_t s = bits > 29u ? bits - 29u : 0u; /* |value| <= 2^29: a butterfly stays below 2^31 */
        total += (int32_t)s;
        orv = 0;
        for (i = 0; i < m; i += len) { /* k = 0: w = 1 */
            int32_t *a = z + 2u * i, *b = a + 2u * half;
            int32_t ar = a[0] >> s, ai = a[1] >> s, br = b[0] >> s, bi = b[1] >> s;
            int32_t v0 = ar + br, v1 = ai + bi, v2 = ar - br, v3 = ai - bi;
            a[0] = v0;
            a[1] = v1;
            b[0] = v2;
            b[1] = v3;
            orv |= (uint32_t)(v0 ^ (v0 >> 31)) | (uint32_t)(v1 ^ (v1 >> 31)) | (uint32_t)(v2 ^ (v2 >> 31)) |
                   (uint32_t)(v3 ^ (v3 >> 31));
        }
        for (k = 1; k < half; k++) {
            int32_t wr = tw[2u * k * step], wi = tw[2u * k * step + 1u];
            for (i = k; i < m; i += len) {
                int32_t *a = z + 2u * i, *b = a + 2u * half;
                int32_t ar = a[0] >> s, ai = a[1] >> s, br = b[0] >> s, bi = b[1] >> s;
                int32_t tr = mul_q31(br, wr) - mul_q31(bi, wi), ti = mul_q31(br, wi) + mul_q31(bi, wr);
                int32_t v0 = ar + tr, v1 = ai + ti, v2 = ar - tr, v3 = ai - ti;
                a[0] = v0;
                a[1] = v1;
                b[0] = v2;
                b[1] = v3;
                orv |= (uint32_t)(v0 ^ (v0 >> 31)) | (uint32_t)(v1 ^ (v1 >> 31)) | (uint32_t)(v2 ^ (v2 >> 31)) |
                       (uint32_t)(v3 ^ (v3 >> 31));
            }
        }
        bits = bit_length(orv);
    }
    *bound = orv;
    return total;
}

int dspq_raw_features_q16(const dspq_config_t *cfg, const int16_t *samples, int32_t *work, int32_t *out) {
    uint32_t n, m, log2n, i, j, rj, bit, b, k, bits, split_bits, orv = 0;
    int32_t sum = 0, lo = 0, hi = 0, maxc, p, s_fft, s_split, l2n, ls;
    uint64_t s2 = 0, s4 = 0;
    int32_t l_m2, l_m4, l_rms, l_den, l_peak;
    int status = dspq_check_config(cfg);
    if (status != DSPQ_OK) return status;
    if (samples == NULL || work == NULL || out == NULL) return DSPQ_ERR_NULL;
    n = cfg->window_samples;
    m = n / 2u;
    log2n = log2_pow2(n);
    l2n = (int32_t)(log2n << Q16);
    ls = cfg->log2_scale_q16;

    lo = hi = samples[0];
    for (i = 0; i < n; i++) {
        int32_t x = samples[i];
        sum += x;
        lo = x < lo ? x : lo;
        hi = x > hi ? x : hi;
    }
    /* centred samples c = n x - sum (exact; |c| < 2^30 for n <= 16384), peak |c| */
    {
        int32_t up = (int32_t)((uint32_t)hi << log2n) - sum, down = sum - (int32_t)((uint32_t)lo << log2n);
        maxc = up > down ? up : down;
    }
    if (maxc == 0) { /* silence or a constant: every energy and moment is exactly 0 */
        int32_t eps10 = log2_to_log10_q16(LOG2_EPS_Q16);
        for (b = 0; b < cfg->n_bands + 2u; b++) out[b] = eps10;
        out[cfg->n_bands + 2u] = 0;
        return DSPQ_OK;
    }
    p = 29 - (int32_t)bit_length((uint32_t)maxc); /* max |c << p| in [2^28, 2^29) */

    /* window into bit-reversed order; moments of c' = c 2^(p - 15), |c'| <= 2^14 */
    rj = 0;
    for (j = 0; j < m; j++) {
        uint32_t half_i;
        for (half_i = 0; half_i < 2u; half_i++) {
            uint32_t idx = 2u * j + half_i;
            int32_t c = (int32_t)((uint32_t)samples[idx] << log2n) - sum;
            int32_t t = p >= 0 ? (int32_t)((uint32_t)c << p) : c >> -p;
            int32_t cc = (t + 16384) >> 15, v;
            uint32_t c2 = (uint32_t)(cc * cc), q = (c2 + 4096u) >> 13; /* c2 <= 2^28, q <= 2^15 */
            s2 += c2;
            s4 += q * q;
            v = mul_q31(2 * t, (int32_t)cfg->hann[idx]); /* 2t Q30 / 2^31 = t hann */
            work[2u * rj + half_i] = v;
            orv |= (uint32_t)(v ^ (v >> 31));
        }
        for (bit = m >> 1; bit != 0u && (rj & bit) != 0u; bit >>= 1) rj ^= bit;
        rj ^= bit;
    }

    s_fft = fft_bfp(work, m, cfg->twiddle, &orv);

    /* split: Z components <= 2^(B - 3) make X' = 2 X <= 0.61 2^B, and (m + 1) bins of |X'|^2 < 2^64 */
    split_bits = (63u - (log2n - 1u)) / 2u - 3u;
    bits = bit_length(orv);
    s_split = bits > split_bits ? (int32_t)(bits - split_bits) : 0;
    {
        /* X_true (LSB) = X' 2^(s_fft + s_split - p - 1) / n; energy offset in log2 */
        int32_t e = s_fft + s_split - p - 1;
        int32_t offset = (2 * e) * DSPQ_Q16_ONE - 2 * l2n + 2 * ls;
        const int32_t *tw = cfg->twiddle;
        for (b = 0; b < cfg->n_bands; b++) {
            uint64_t energy = 0;
            int32_t l;
            for (k = cfg->band_edges[b]; k < cfg->band_edges[b + 1u]; k++) {
                if (k == 0u || k == m) {
                    int32_t zr = work[0] >> s_split, zi = work[1] >> s_split;
                    energy += square(2 * (k == 0u ? zr + zi : zr - zi));
                } else {
                    int32_t zr = work[2u * k] >> s_split, zi = work[2u * k + 1u] >> s_split;
                    int32_t cr = work[2u * (m - k)] >> s_split, ci = -(work[2u * (m - k) + 1u] >> s_split);
                    int32_t er = zr + cr, ei = zi + ci, or_ = zi - ci, oi = cr - zr;
                    int32_t wr = tw[2u * k], wi = tw[2u * k + 1u];
                    int32_t xr = er + mul_q31(or_, wr) - mul_q31(oi, wi);
                    int32_t xi = ei + mul_q31(oi, wr) + mul_q31(or_, wi);
                    energy += square(xr) + square(xi);
                }
            }
            l = energy == 0u ? NEG_INF_Q16 : log2_u64_q16(energy) + offset;
            out[b] = log2_to_log10_q16(log_add_q16(l, LOG2_EPS_Q16));
        }
    }

    /* m2 = (s2 / n) (2^(15-p) / n)^2, m4 = (s4 2^26 / n) (2^(15-p) / n)^4, in physical units */
    l_m2 = s2 == 0u ? NEG_INF_Q16 : log2_u64_q16(s2) - 3 * l2n + (2 * (15 - p)) * DSPQ_Q16_ONE + 2 * ls;
    l_m4 = s4 == 0u ? NEG_INF_Q16 : log2_u64_q16(s4) + 26 * DSPQ_Q16_ONE - 5 * l2n + (4 * (15 - p)) * DSPQ_Q16_ONE + 4 * ls;
    l_rms = l_m2 <= NEG_INF_Q16 ? NEG_INF_Q16 : l_m2 / 2;
    /* kurtosis = m4 / max(m2^2, 1e-12) as the reference */
    l_den = l_m2 <= NEG_INF_Q16 || 2 * l_m2 < LOG2_EPS_Q16 ? LOG2_EPS_Q16 : 2 * l_m2;
    out[cfg->n_bands] = log2_to_log10_q16(log_add_q16(l_rms, LOG2_EPS_Q16));
    out[cfg->n_bands + 1u] =
        log2_to_log10_q16(log_add_q16(l_m4 <= NEG_INF_Q16 ? NEG_INF_Q16 : l_m4 - l_den, LOG2_EPS_Q16));
    /* crest = (maxc / n) scale / max(rms, 1e-12) */
    l_peak = log2_u64_q16((uint32_t)maxc) - l2n + ls;
    out[cfg->n_bands + 2u] = exp2_q16(l_peak - (l_rms > LOG2_EPS_Q16 ? l_rms : LOG2_EPS_Q16));
    return DSPQ_OK;
}

int dspq_raw_features_f32(const dspq_config_t *cfg, const int16_t *samples, int32_t *work, float *out) {
    int32_t q[DSPQ_N_FEATURES(64u)];
    uint32_t i, n_features;
    int status;
    if (cfg == NULL || out == NULL) return DSPQ_ERR_NULL;
    if (cfg->n_bands > 64u) return DSPQ_ERR_BANDS;
    status = dspq_raw_features_q16(cfg, samples, work, q);
    if (status != DSPQ_OK) return status;
    n_features = DSPQ_N_FEATURES(cfg->n_bands);
    for (i = 0; i < n_features; i++) out[i] = (float)q[i] * (1.0f / 65536.0f);
    return DSPQ_OK;
}

int dspq_prepare(uint32_t n_bands, const float *mean, const float *std, float input_scale, int32_t input_zero_point,
                 dspq_affine_t *affine) {
    uint32_t i, n_features = DSPQ_N_FEATURES(n_bands);
    if (mean == NULL || std == NULL || affine == NULL) return DSPQ_ERR_NULL;
    if (n_bands == 0u) return DSPQ_ERR_BANDS;
    if (!(input_scale > 0.0f) || !(input_scale < 3.0e38f)) return DSPQ_ERR_ARG;
    for (i = 0; i < n_features; i++) {
        /* q = f_q16 a + b with a = 1 / (65536 std input_scale), b = zero_point - mean / (std input_scale) */
        double denom = (double)std[i] * (double)input_scale, a, b, add;
        int32_t shift = 0;
        if (!(std[i] > 0.0f) || !(std[i] < 3.0e38f) || !(mean[i] == mean[i]) || !(denom > 0.0)) return DSPQ_ERR_ARG;
        a = 1.0 / (65536.0 * denom);
        b = (double)input_zero_point - (double)mean[i] / denom;
        while (a < 1073741824.0 && shift < 62) { /* mantissa in [2^30, 2^31) */
            a *= 2.0;
            shift++;
        }
        while (a >= 2147483648.0 && shift > 0) {
            a *= 0.5;
            shift--;
        }
        if (a >= 2147483648.0 || shift < 1) return DSPQ_ERR_ARG;
        add = (b + 0.5) * (double)((uint64_t)1u << shift); /* + 0.5: round half up after the shift */
        if (!(add > -9.0e18 && add < 9.0e18)) return DSPQ_ERR_ARG;
        affine[i].mul = (int32_t)(a + 0.5 < 2147483647.0 ? a + 0.5 : 2147483647.0);
        affine[i].shift = shift;
        affine[i].add = (int64_t)floor(add + 0.5);
    }
    return DSPQ_OK;
}

static uint32_t float_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

/* log2 of a normal positive float from its bits, Q16 (as dspq_set_scale) */
static int32_t log2_float_bits_q16(uint32_t bits) {
    uint32_t exponent = (bits >> 23) & 0xFFu, mantissa = (bits & 0x7FFFFFu) | 0x800000u;
    return log2_u64_q16(mantissa) + (((int32_t)exponent - 150) << Q16);
}

int dspq_prepare_speed(dspq_config_t *cfg, const float *slope, float reference_rpm, float valid_low_rpm,
                       float valid_high_rpm, int32_t *slope_q16) {
    uint32_t i, n_features;
    if (cfg == NULL || (slope != NULL && slope_q16 == NULL)) return DSPQ_ERR_NULL;
    n_features = DSPQ_N_FEATURES(cfg->n_bands);
    cfg->slope_q16 = NULL;
    cfg->reference_bits = 0u;
    cfg->speed_log10_q16 = 0;
    if (!(valid_low_rpm > 1e-30f) || !(valid_low_rpm < valid_high_rpm) || !(valid_high_rpm < 3.0e38f)) {
        return DSPQ_ERR_ARG;
    }
    cfg->valid_low_bits = float_bits(valid_low_rpm);
    cfg->valid_high_bits = float_bits(valid_high_rpm);
    if (reference_rpm == 0.0f && slope == NULL) return DSPQ_OK; /* speed-unaware */
    if (!(reference_rpm >= valid_low_rpm && reference_rpm <= valid_high_rpm)) return DSPQ_ERR_ARG;
    if (slope != NULL) {
        for (i = 0; i < n_features; i++) {
            double q = (double)slope[i] * 65536.0;
            if (!(q > -2147483648.0 && q < 2147483647.0)) return DSPQ_ERR_ARG;
            slope_q16[i] = (int32_t)floor(q + 0.5);
        }
        cfg->slope_q16 = slope_q16;
    }
    cfg->reference_bits = float_bits(reference_rpm);
    cfg->log2_reference_q16 = log2_float_bits_q16(cfg->reference_bits);
    return DSPQ_OK;
}

int dspq_set_speed(dspq_config_t *cfg, float rpm) {
    uint32_t bits;
    if (cfg == NULL) return DSPQ_ERR_NULL;
    bits = float_bits(rpm);
    cfg->speed_log10_q16 = 0; /* the reference speed */
    if (cfg->reference_bits == 0u) return 0;
    /* negative floats and NaN have bits above the largest valid speed, +inf above any finite one */
    if (bits < cfg->valid_low_bits || bits > cfg->valid_high_bits) return 1;
    cfg->speed_log10_q16 = log2_to_log10_q16(log2_float_bits_q16(bits) - cfg->log2_reference_q16);
    return 0;
}

int dspq_features_int8(const dspq_config_t *cfg, const int16_t *samples, int32_t *work, int8_t *out) {
    int32_t q[DSPQ_N_FEATURES(64u)];
    uint32_t i, n_features;
    int status;
    if (cfg == NULL || out == NULL) return DSPQ_ERR_NULL;
    if (cfg->affine == NULL) return DSPQ_ERR_NULL;
    if (cfg->n_bands > 64u) return DSPQ_ERR_BANDS;
    status = dspq_raw_features_q16(cfg, samples, work, q);
    if (status != DSPQ_OK) return status;
    n_features = DSPQ_N_FEATURES(cfg->n_bands);
    for (i = 0; i < n_features; i++) {
        const dspq_affine_t *af = &cfg->affine[i];
        int64_t y;
        if (cfg->slope_q16 != NULL) { /* the mean at this speed: slope log10(rpm / reference), Q16 x Q16 */
            q[i] -= (int32_t)(((int64_t)cfg->slope_q16[i] * cfg->speed_log10_q16 + ((int64_t)1 << 15)) >> 16);
        }
        y = ((int64_t)q[i] * af->mul + af->add) >> af->shift;
        out[i] = (int8_t)(y < -128 ? -128 : y > 127 ? 127 : y);
    }
    return DSPQ_OK;
}
