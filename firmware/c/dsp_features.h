/*
 * The DSP front end on the device: one int16 vibration window -> DSP_N_FEATURES(n_bands) floats.
 *
 * Same steps as the numpy reference tinymlops/contracts/dsp.py (raw_features / extract_features): remove the
 * mean, periodic Hann window, real FFT, |X|^2 summed over bands [edges[i], edges[i+1]), log10 of
 * each band energy + 1e-12, then log10(rms + 1e-12), log10(kurtosis + 1e-12) and the crest factor
 * max|x - mean| / rms; optionally (f - mean) / std. C99, single precision (Cortex-M4F FPU), no
 * malloc, only <math.h>, <stdint.h> and <string.h>.
 *
 * Speed trend (DSP spec version 2, tinymlops.contracts.dsp.normalise): with a slope per feature the mean becomes
 * mean + slope * log10(rpm / reference) at the window's shaft speed; dsp_set_speed resolves the speed
 * once per window (one log10f) and says whether it fell back to the reference speed.
 *
 * Memory, for a window of n samples (n = 1024: the fleet format):
 *   work buffer    DSP_WORK_BYTES(n)  = 4 n bytes  RAM, caller-provided, reused per call (4096 B)
 *   hann table     DSP_HANN_BYTES(n)  = 4 n bytes  flash when generated as const, else RAM (4096 B)
 *   twiddle table  DSP_TWIDDLE_BYTES(n) = 4 n bytes  flash when generated as const, else RAM (4096 B)
 *   band edges     2 (n_bands + 1) bytes, mean/std 4 DSP_N_FEATURES bytes each (flash)
 *   features out   4 DSP_N_FEATURES(n_bands) bytes (140 B for 32 bands)
 *   stack          < 128 bytes, no recursion
 * DSP_RAM_BYTES(n, n_bands) is the RAM with the tables in flash; add DSP_TABLE_BYTES(n) when
 * dsp_init_tables fills them in RAM at boot.
 */
#ifndef DSP_FEATURES_H
#define DSP_FEATURES_H

#include <stdint.h>

#define DSP_OK 0
#define DSP_ERR_NULL (-1)     /* a required pointer is NULL */
#define DSP_ERR_SIZE (-2)     /* window_samples not a power of two in [DSP_MIN_N, DSP_MAX_N] */
#define DSP_ERR_BANDS (-3)    /* n_bands is 0 or edges are not increasing within 0..n/2+1 */
#define DSP_ERR_ARG (-4)      /* scale not finite and > 0, or a std not > 0 */

#define DSP_MIN_N 16u
#define DSP_MAX_N 16384u
#define DSP_N_FEATURES(n_bands) ((n_bands) + 3u)
#define DSP_WORK_FLOATS(n) (n)
#define DSP_WORK_BYTES(n) (4u * (n))
#define DSP_HANN_BYTES(n) (4u * (n))
#define DSP_TWIDDLE_BYTES(n) (4u * (n))
#define DSP_TABLE_BYTES(n) (DSP_HANN_BYTES(n) + DSP_TWIDDLE_BYTES(n))
#define DSP_RAM_BYTES(n, n_bands) (DSP_WORK_BYTES(n) + 4u * DSP_N_FEATURES(n_bands))

typedef struct {
    uint32_t window_samples;    /* n: power of two, DSP_MIN_N..DSP_MAX_N */
    uint32_t n_bands;           /* spectral bands; features = n_bands + 3 */
    const uint16_t *band_edges; /* n_bands + 1 FFT bin indices, strictly increasing, last <= n/2 + 1 */
    const float *hann;          /* n: periodic Hann window, 0.5 - 0.5 cos(2 pi i / n) */
    const float *twiddle;       /* n: cos(2 pi k / n), -sin(2 pi k / n) interleaved, k < n/2 */
    const float *mean;          /* DSP_N_FEATURES: normalisation; unused by dsp_raw_features */
    const float *std;           /* DSP_N_FEATURES, each > 0 */
    const float *slope;         /* DSP_N_FEATURES per decade of rpm, or NULL: no speed trend */
    float reference_rpm;        /* speed the mean holds at; 0: a speed-unaware spec (nothing falls back) */
    float valid_low_rpm;        /* a speed outside [low, high], NaN or infinite is unusable */
    float valid_high_rpm;
    float speed_log10;          /* log10(rpm / reference) of the current window: set by dsp_set_speed */
} dsp_config_t;

/* Fill the Hann and twiddle tables for a window of n samples (or generate them as const arrays). */
int dsp_init_tables(uint32_t n, float *hann, float *twiddle);

/* Check a config (sizes, band edges, table pointers) once, before the first window. */
int dsp_check_config(const dsp_config_t *cfg);

/* Raw features of one window: samples (n int16) * scale (physical units per LSB).
 * work: DSP_WORK_FLOATS(n) floats, overwritten. features: DSP_N_FEATURES(n_bands) floats. */
int dsp_raw_features(const dsp_config_t *cfg, const int16_t *samples, float scale, float *work, float *features);

/* The shaft speed of the next window (tinymlops.contracts.dsp.resolve_speed): sets cfg->speed_log10. Returns 1 when the
 * speed is unusable (0, NaN, infinite, outside the valid range) and the reference speed is used (the fallback,
 * to be counted), 0 otherwise or for a speed-unaware spec (reference 0). */
int dsp_set_speed(dsp_config_t *cfg, float rpm);

/* Normalised features, (raw - mean - slope * speed_log10) / std: what the model sees. Needs cfg->mean and
 * cfg->std; the slope term only with cfg->slope. */
int dsp_features(const dsp_config_t *cfg, const int16_t *samples, float scale, float *work, float *features);

#endif /* DSP_FEATURES_H */
