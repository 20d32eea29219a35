/*
 * The DSP front end in fixed point, for cores without an FPU (Cortex-M0/M0+: the RP2040).
 *
 * The same features as dsp_features.c and the numpy reference tinymlops/contracts/dsp.py (raw_features):
 * mean removal, periodic Hann, real FFT of n points as an n/2-point complex FFT + split, |X|^2
 * summed per band [edges[b], edges[b+1]), log10(band energy + 1e-12), log10(rms + 1e-12),
 * log10(kurtosis + 1e-12), crest factor max|x - mean| / max(rms, 1e-12); physical = samples * scale.
 *
 * Arithmetic, per window (integers only, no float operation):
 *   - sum, min, max of the int16 samples; the centred samples are kept exact as c = n x - sum;
 *   - one normalisation shift p puts max|c| << p in [2^28, 2^29) (block floating point);
 *   - Hann: Q30 table (uint32); the product with the centred sample is built from 16-bit halves;
 *   - time-domain moments from c >> (15 - p) (|.| <= 2^14): sum c^2 and sum (c^2 >> 13)^2 in 64 bits;
 *   - radix-2 complex FFT on int32 with Q31 twiddles; before each stage the block is shifted right
 *     just enough (0-2 bits) to keep |value| <= 2^29, so no butterfly overflows; the shifts add to a
 *     block exponent; the split and |X|^2 run after one more shift that keeps the band sums in 64 bits;
 *   - log2 of 64-bit energies and moments: CLZ + 16 bit-serial squarings (Q16, truncation error
 *     < 2^-16); the block exponents, log2 n and log2 scale are added in the log domain; the + 1e-12
 *     of the reference is a log-add (exp2 by a 16-entry table); log10 = log2 x log10(2);
 *   - the crest factor is exp2 of log2 peak - log2 max(rms, 1e-12).
 *   scale (units per LSB) enters only as log2(scale) in Q16, computed from the float's bits once per
 *   scale by dspq_set_scale (integer only as well).
 *
 * Outputs: raw features in Q16 (log10 units for the logs, the crest factor linear), as float
 * (dspq_raw_features_f32, converted at the end, for parity tests), or the model's int8 input
 * (dspq_features_int8): (f - mean) / std / input_scale + zero_point folded into one fixed-point
 * multiply-add per feature by dspq_prepare (float is used there once, at model load).
 *
 * Speed trend (DSP spec version 2): the mean of feature i at shaft speed rpm is mean + slope log10(rpm /
 * reference). The affine keeps the mean at the reference; dspq_prepare_speed stores the slopes in Q16 (at
 * model load), dspq_set_speed takes the window's rpm (integers only: log2 from the float's bits, the range
 * check on the bits, which order like the values for positive floats) and dspq_features_int8 subtracts
 * slope x log10(rpm / reference) from the Q16 feature before the affine: one 32 x 32 -> 64 multiply per
 * feature and one log2 per window. Measured on the Cortex-M0 under QEMU -icount (35 features): 670
 * instructions for dspq_set_speed, 1,950 for the subtraction, about 0.5 % of a 1024-sample window.
 *
 * Memory for a window of n samples (n = 1024):
 *   work    DSPQ_WORK_BYTES(n)    = 4 n bytes RAM (int32), caller-provided, overwritten (4096 B)
 *   hann    DSPQ_HANN_BYTES(n)    = 4 n bytes (uint32 Q30), flash when generated as const (4096 B)
 *   twiddle DSPQ_TWIDDLE_BYTES(n) = 4 n bytes (int32 Q31 cos, -sin interleaved, k < n/2) (4096 B)
 *   affine  16 bytes per feature (dspq_prepare), band edges 2 (n_bands + 1) bytes
 *   stack   < 400 bytes (the f32 and int8 paths hold the Q16 features), no recursion, no heap.
 *   C99; <math.h> only for dspq_init_tables.
 * Why 32-bit tables and not q15: with a q15 Hann, a CWRU band 88 dB below the window's strongest
 * band was off by 0.047 in log10 (the rounding pattern of the window leaks into it), and with q15
 * twiddles as well by 0.065; with these tables the worst CWRU band is within 0.002, for 13% more
 * instructions on the Cortex-M0 (469k -> 530k per 1024-sample window).
 */
#ifndef DSP_Q15_H
#define DSP_Q15_H

#include <stdint.h>

#define DSPQ_OK 0
#define DSPQ_ERR_NULL (-1)  /* a required pointer is NULL */
#define DSPQ_ERR_SIZE (-2)  /* window_samples not a power of two in [DSPQ_MIN_N, DSPQ_MAX_N] */
#define DSPQ_ERR_BANDS (-3) /* n_bands is 0 or edges are not increasing within 0..n/2+1 */
#define DSPQ_ERR_ARG (-4)   /* scale not a finite normal float > 0, std not > 0, input_scale not > 0,
                               an affine constant not representable, or dspq_set_scale never called */

#define DSPQ_MIN_N 16u
#define DSPQ_MAX_N 16384u
#define DSPQ_N_FEATURES(n_bands) ((n_bands) + 3u)
#define DSPQ_WORK_WORDS(n) (n)
#define DSPQ_WORK_BYTES(n) (4u * (n))
#define DSPQ_HANN_BYTES(n) (4u * (n))
#define DSPQ_TWIDDLE_BYTES(n) (4u * (n))
#define DSPQ_Q16_ONE 65536

/* y = (f_q16 * mul + add) >> shift, then clamped to int8: one feature's normalise + quantize. */
typedef struct {
    int32_t mul;
    int32_t shift;
    int64_t add;
} dspq_affine_t;

typedef struct {
    uint32_t window_samples;      /* n: power of two, DSPQ_MIN_N..DSPQ_MAX_N */
    uint32_t n_bands;             /* spectral bands; features = n_bands + 3 */
    const uint16_t *band_edges;   /* n_bands + 1 FFT bin indices, strictly increasing, last <= n/2 + 1 */
    const uint32_t *hann;         /* n: Q30 round(2^30 (0.5 - 0.5 cos(2 pi i / n))) */
    const int32_t *twiddle;       /* n: Q31 cos(2 pi k / n), -sin(2 pi k / n) interleaved, k < n/2 */
    int32_t log2_scale_q16;       /* log2(scale) in Q16: set by dspq_set_scale */
    uint32_t scale_set;           /* 1 once dspq_set_scale succeeded */
    const dspq_affine_t *affine;  /* DSPQ_N_FEATURES entries from dspq_prepare; only for the int8 path */
    const int32_t *slope_q16;     /* DSPQ_N_FEATURES speed slopes per decade in Q16 (dspq_prepare_speed); NULL: none */
    uint32_t reference_bits;      /* float bits of the reference speed; 0: speed-unaware (nothing falls back) */
    uint32_t valid_low_bits;      /* float bits of the valid speed range (positive floats order like their bits) */
    uint32_t valid_high_bits;
    int32_t log2_reference_q16;   /* log2(reference) in Q16 */
    int32_t speed_log10_q16;      /* log10(rpm / reference) in Q16 of the current window: set by dspq_set_speed */
} dspq_config_t;

/* Fill the Q30 Hann and Q31 twiddle tables for n samples (double cos once, at boot; or generate them as
 * const arrays with firmware/dsp_q15.py's tables()). */
int dspq_init_tables(uint32_t n, uint32_t *hann, int32_t *twiddle);

/* Check sizes, edges and table pointers once, before the first window. */
int dspq_check_config(const dspq_config_t *cfg);

/* Set the physical units per LSB (a normal, finite float > 0): log2(scale) from its bits, integers only. */
int dspq_set_scale(dspq_config_t *cfg, float scale);

/* Raw features of one window in Q16: log10 values for the bands, rms and kurtosis, the crest factor
 * linear. work: DSPQ_WORK_WORDS(n) int32, overwritten. out: DSPQ_N_FEATURES(n_bands) int32. */
int dspq_raw_features_q16(const dspq_config_t *cfg, const int16_t *samples, int32_t *work, int32_t *out);

/* The same as float (out / 65536, converted at the end): for parity tests and FPU cores.
 * This and dspq_features_int8 hold the Q16 features on the stack: n_bands <= 64 (else DSPQ_ERR_BANDS). */
int dspq_raw_features_f32(const dspq_config_t *cfg, const int16_t *samples, int32_t *work, float *out);

/* Fold normalisation and the model's input quantization into affine[DSPQ_N_FEATURES(n_bands)]:
 * q = round((f - mean) / std / input_scale) + input_zero_point. Uses float: call at model load. */
int dspq_prepare(uint32_t n_bands, const float *mean, const float *std, float input_scale, int32_t input_zero_point,
                 dspq_affine_t *affine);

/* The speed trend of a version-2 DSP spec, at model load (float): slope (DSPQ_N_FEATURES per decade of rpm,
 * |slope| < 32768, or NULL: no trend) into slope_q16, the reference speed (0: speed-unaware) and the valid range
 * (0 < low < high, the reference inside) into cfg. */
int dspq_prepare_speed(dspq_config_t *cfg, const float *slope, float reference_rpm, float valid_low_rpm,
                       float valid_high_rpm, int32_t *slope_q16);

/* The shaft speed of the next window, integers only: sets cfg->speed_log10_q16. Returns 1 when the speed is
 * unusable (0, negative, NaN, infinite, outside the valid range) and the reference speed is used (the fallback,
 * to be counted), 0 otherwise or for a speed-unaware spec. */
int dspq_set_speed(dspq_config_t *cfg, float rpm);

/* The model's int8 input for one window, with cfg->affine from dspq_prepare (and the speed trend of
 * dspq_prepare_speed at the speed of dspq_set_speed). work as above, out: DSPQ_N_FEATURES(n_bands) int8
 * values. Integers only. */
int dspq_features_int8(const dspq_config_t *cfg, const int16_t *samples, int32_t *work, int8_t *out);

#endif /* DSP_Q15_H */
