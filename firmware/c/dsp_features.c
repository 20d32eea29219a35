/* The device-side DSP front end; see dsp_features.h for the contract and the memory budget. */
#include "dsp_features.h"

#include <math.h>
#include <string.h> /* NULL */

#define DSP_EPS 1e-12f

static int valid_size(uint32_t n) { return n >= DSP_MIN_N && n <= DSP_MAX_N && (n & (n - 1u)) == 0u; }

int dsp_init_tables(uint32_t n, float *hann, float *twiddle) {
    uint32_t i;
    const uint32_t half = n / 2u, quarter = n / 4u;
    /* double here only: the tables are built once per model load (or offline), and match numpy's
     * float64 -> float32. One cos per quarter-wave point, the rest by symmetry: on a core whose
     * double is software (every Cortex-M4F) that is an eighth of the calls a direct fill makes. */
    const double two_pi = 6.283185307179586476925;
    if (hann == NULL || twiddle == NULL) return DSP_ERR_NULL;
    if (!valid_size(n)) return DSP_ERR_SIZE;
    for (i = 0; i <= quarter; i++) {
        const double c = cos(two_pi * (double)i / (double)n); /* cos(2 pi i / n), i in [0, n/4] */
        hann[i] = (float)(0.5 - 0.5 * c);
        hann[(n - i) % n] = hann[i];
        hann[half - i] = (float)(0.5 + 0.5 * c); /* cos(2 pi (n/2 - i) / n) = -c */
        hann[half + i] = hann[half - i];
        twiddle[2u * i] = (float)c;
        if (i > 0u) twiddle[2u * (half - i)] = -(float)c;
        /* -sin(2 pi k / n) with k = n/4 -+ i: sin(2 pi (n/4 - i) / n) = sin(2 pi (n/4 + i) / n) = c */
        twiddle[2u * (quarter - i) + 1u] = -(float)c;
        if (quarter + i < half) twiddle[2u * (quarter + i) + 1u] = -(float)c;
    }
    return DSP_OK;
}

int dsp_check_config(const dsp_config_t *cfg) {
    uint32_t b;
    if (cfg == NULL || cfg->band_edges == NULL || cfg->hann == NULL || cfg->twiddle == NULL) return DSP_ERR_NULL;
    if (!valid_size(cfg->window_samples)) return DSP_ERR_SIZE;
    if (cfg->n_bands == 0u || cfg->band_edges[cfg->n_bands] > cfg->window_samples / 2u + 1u) return DSP_ERR_BANDS;
    for (b = 0; b < cfg->n_bands; b++) {
        if (cfg->band_edges[b + 1u] <= cfg->band_edges[b]) return DSP_ERR_BANDS;
    }
    return DSP_OK;
}

/* In-place iterative radix-2 complex FFT of m points (interleaved re, im); tw holds W_n^k, n = 2m. */
static void fft_complex(float *z, uint32_t m, const float *tw) {
    uint32_t i, j = 0, bit, len, k, s;
    for (i = 1; i < m; i++) { /* bit-reversal permutation */
        for (bit = m >> 1; j & bit; bit >>= 1) j ^= bit;
        j ^= bit;
        if (i < j) {
            float re = z[2u * i], im = z[2u * i + 1u];
            z[2u * i] = z[2u * j];
            z[2u * i + 1u] = z[2u * j + 1u];
            z[2u * j] = re;
            z[2u * j + 1u] = im;
        }
    }
    for (len = 2; len <= m; len <<= 1) {
        uint32_t half = len >> 1, step = 2u * m / len; /* W_len^k = W_n^(k n / len) */
        for (k = 0; k < half; k++) {
            float wr = tw[2u * k * step], wi = tw[2u * k * step + 1u];
            for (s = k; s < m; s += len) {
                float *a = z + 2u * s, *b = z + 2u * (s + half);
                float tr = b[0] * wr - b[1] * wi, ti = b[0] * wi + b[1] * wr;
                b[0] = a[0] - tr;
                b[1] = a[1] - ti;
                a[0] += tr;
                a[1] += ti;
            }
        }
    }
}

/* |X[k]|^2 of the n-point real FFT from the m = n/2-point complex FFT Z of the packed signal. */
static float bin_power(const float *z, uint32_t k, uint32_t m, const float *tw) {
    float zr, zi, cr, ci, er, ei, or_, oi, xr, xi;
    if (k == 0u || k == m) {
        float x = k == 0u ? z[0] + z[1] : z[0] - z[1];
        return x * x;
    }
    zr = z[2u * k];
    zi = z[2u * k + 1u];
    cr = z[2u * (m - k)]; /* conj(Z[m - k]) */
    ci = -z[2u * (m - k) + 1u];
    er = 0.5f * (zr + cr); /* even samples' spectrum */
    ei = 0.5f * (zi + ci);
    or_ = 0.5f * (zi - ci); /* odd samples' spectrum: (Zk - Zc) / 2i */
    oi = -0.5f * (zr - cr);
    xr = er + tw[2u * k] * or_ - tw[2u * k + 1u] * oi;
    xi = ei + tw[2u * k] * oi + tw[2u * k + 1u] * or_;
    return xr * xr + xi * xi;
}

int dsp_raw_features(const dsp_config_t *cfg, const int16_t *samples, float scale, float *work, float *features) {
    uint32_t n, m, i, b, k;
    int32_t sum = 0; /* exact: 16384 * 32768 < 2^31 */
    float mean, m2 = 0.0f, m4 = 0.0f, peak = 0.0f, rms, kurtosis;
    int status = dsp_check_config(cfg);
    if (status != DSP_OK) return status;
    if (samples == NULL || work == NULL || features == NULL) return DSP_ERR_NULL;
    if (!(scale > 0.0f) || !isfinite(scale)) return DSP_ERR_ARG;
    n = cfg->window_samples;
    m = n / 2u;
    for (i = 0; i < n; i++) sum += samples[i];
    mean = (float)sum * scale / (float)n;
    for (i = 0; i < n; i++) {
        float c = (float)samples[i] * scale - mean, c2 = c * c;
        m2 += c2;
        m4 += c2 * c2;
        peak = fabsf(c) > peak ? fabsf(c) : peak;
        work[i] = c * cfg->hann[i]; /* even/odd samples are the re/im parts of m complex points */
    }
    m2 /= (float)n;
    m4 /= (float)n;
    fft_complex(work, m, cfg->twiddle);
    for (b = 0; b < cfg->n_bands; b++) {
        float energy = 0.0f;
        for (k = cfg->band_edges[b]; k < cfg->band_edges[b + 1u]; k++) energy += bin_power(work, k, m, cfg->twiddle);
        features[b] = log10f(energy + DSP_EPS);
    }
    rms = sqrtf(m2);
    kurtosis = m4 / (m2 * m2 > DSP_EPS ? m2 * m2 : DSP_EPS);
    features[cfg->n_bands] = log10f(rms + DSP_EPS);
    features[cfg->n_bands + 1u] = log10f(kurtosis + DSP_EPS);
    features[cfg->n_bands + 2u] = peak / (rms > DSP_EPS ? rms : DSP_EPS);
    return DSP_OK;
}

int dsp_set_speed(dsp_config_t *cfg, float rpm) {
    int usable = isfinite(rpm) && rpm >= cfg->valid_low_rpm && rpm <= cfg->valid_high_rpm;
    cfg->speed_log10 = 0.0f; /* the reference speed: log10(1) */
    if (!(cfg->reference_rpm > 0.0f)) return 0;
    if (!usable) return 1;
    /* single precision: ~100 instructions on the M4F against ~2,700 for log10 in double; a few float32 ulps
     * from numpy's float64 log10 rounded to float32, far below an int8 step of the model input */
    cfg->speed_log10 = log10f(rpm / cfg->reference_rpm);
    return 0;
}

int dsp_features(const dsp_config_t *cfg, const int16_t *samples, float scale, float *work, float *features) {
    uint32_t i, n_features;
    int status = dsp_check_config(cfg);
    if (status != DSP_OK) return status;
    if (cfg->mean == NULL || cfg->std == NULL) return DSP_ERR_NULL;
    n_features = DSP_N_FEATURES(cfg->n_bands);
    for (i = 0; i < n_features; i++) {
        if (!(cfg->std[i] > 0.0f)) return DSP_ERR_ARG;
    }
    status = dsp_raw_features(cfg, samples, scale, work, features);
    if (status != DSP_OK) return status;
    if (cfg->slope != NULL) {
        for (i = 0; i < n_features; i++) {
            float mean = cfg->mean[i] + cfg->speed_log10 * cfg->slope[i];
            features[i] = (features[i] - mean) / cfg->std[i];
        }
        return DSP_OK;
    }
    for (i = 0; i < n_features; i++) features[i] = (features[i] - cfg->mean[i]) / cfg->std[i];
    return DSP_OK;
}
