/*
 * The device application (firmware/FIRMWARE.md): the C counterpart of firmware/device.py's
 * DeviceRuntime on a Cortex-M behind board.h. It takes signed models over UART frames (the
 * gateway bridges them to MQTT) into the staging slot, verifies, loads and smoke-tests them (the
 * manifest's reference outputs, then one window) before committing the slot table, and scores sensor windows with the DSP front end and tinyrt.
 *
 * Two engines (tinyrt model + arena + DSP front end) alternate: a new model is loaded into the
 * one not running, so any failure up to the commit leaves the running one untouched. No heap:
 * every buffer is static and sized at compile time; RAM use is in the linker map.
 */
#include <math.h>
#include <string.h>

#include "board.h"
#include "ed25519_verify.h"
#include "frame.h"
#include "ota_receiver.h"
#include "slots.h"
#include "tinyrt.h"

#if DEVICE_DSP_Q15
/* Cores without an FPU take the fixed-point front end (dsp_q15.h); its wiring goes here. */
#error "DEVICE_DSP_Q15: the q15 front end is not wired into device_main.c yet"
#else
#include "dsp_features.h"
#endif

#define DEVICE_FIRMWARE "tinymlops-fw/0.1.0"
#define HELLO_VERSION 1u
#ifndef DEVICE_ARENA_BYTES
#define DEVICE_ARENA_BYTES (48u * 1024u) /* per engine: the largest tensor arena a manifest may ask */
#endif
/* A WINDOW frame holds at most (FRAME_MAX_PAYLOAD - 14) / 2 samples: the largest power of two. */
#define DEVICE_MAX_WINDOW 2048u
#define DEVICE_MAX_BANDS 120u
#define DEVICE_MAX_FEATURES DSP_N_FEATURES(DEVICE_MAX_BANDS)
#define DSP_VERSIONS ((1u << 1) | (1u << 2)) /* DSP spec versions 1 and 2 (speed trend) */

/* The behaviour of firmware.device.DeviceConfig's defaults. */
#define REQUEST_WINDOW 8u
#define RETRY_MS 1000u
#define MAX_RETRY_MS 8000u
#define MAX_CORRUPT_CHUNKS 16u
/* The transfer record (slots.h) is saved after every RESUME_EVERY-th chunk and the last one: a
 * restart fetches at most RESUME_EVERY - 1 chunks again; each save is one 572 B flash write. */
#ifndef RESUME_EVERY
#define RESUME_EVERY 1u
#endif
#define SCORE_BATCH 10u
#define SUMMARY_WINDOWS 100u
#define N_BINS 9u
#define DETAIL_MAX 120u
#define STATUS_MAX 512u

enum { ST_IDLE, ST_DOWNLOADING, ST_VERIFIED, ST_LOADED, ST_ACTIVE, ST_FAILED, ST_IGNORED, ST_CANCELLED };
enum { DOM_NONE, DOM_OTA, DOM_RUNTIME, DOM_SMOKE, DOM_SLOTS, DOM_CORRUPT };
enum { C_REQUESTS, C_RETRIES, C_DUPLICATES, C_CORRUPT, C_STALE, N_COUNTERS };

/* firmware.ota.SCORE_EDGES_REL: summary bins are these times the threshold */
static const double score_edges_rel[N_BINS] = {0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0};

typedef struct {
    dsp_config_t cfg;
    uint32_t n_features;
    uint16_t edges[DEVICE_MAX_BANDS + 1u];
    float hann[DEVICE_MAX_WINDOW];
    float twiddle[DEVICE_MAX_WINDOW];
    float mean[DEVICE_MAX_FEATURES];
    float std[DEVICE_MAX_FEATURES];
    float slope[DEVICE_MAX_FEATURES];
} front_end_t;

typedef struct {
    trt_model_t model;
    front_end_t dsp;
    float threshold;
    uint32_t version;
    uint8_t sha256[OTA_SHA256_BYTES];
    char name[OTA_MAX_NAME + 1];
} engine_t;

typedef struct {
    uint32_t download_ms;
    uint32_t deploy_ms;
    uint64_t verify;
    uint64_t load;
    uint64_t smoke;
    uint32_t dsp;
    uint32_t inference;
} latency_t;

/* The download in progress (firmware.device._Transfer). */
typedef struct {
    int active;
    uint8_t source; /* 0 the device's manifest topic, 1 its group's */
    uint32_t started_ms;
    uint32_t last_request_ms;
    uint32_t stalled;
    int expedite; /* a chunk was lost for sure: ask again at the next tick, not after the timeout */
    int resumed;  /* it went on from a transfer record: a failed sha256 starts it over once */
    uint16_t outstanding[REQUEST_WINDOW];
    size_t n_outstanding;
    uint16_t counters[N_COUNTERS];
    latency_t latency;
} transfer_t;

typedef struct {
    float score;
    uint8_t anomaly;
    uint8_t speed_fallback; /* the window's speed was unusable: normalised at the reference speed */
    uint32_t dsp_instructions;
    uint32_t inference_instructions;
} score_t;

static const slots_flash_t flash_ops = {NULL, 0, board_flash_write};
static slots_flash_t flash;
static slots_provisioning_t prov;
static slots_table_t table;
static slots_transfer_t resume_rec; /* the transfer record, as last saved (or loaded at boot) */
static uint8_t staging_slot;
static ota_receiver_t rx;
static frame_parser_t parser;
static transfer_t tr;

static union {
    uint64_t align; /* tinyrt keeps int32 tensors in the arena */
    uint8_t bytes[DEVICE_ARENA_BYTES];
} arenas[2];
static engine_t engines[2];
static engine_t *active; /* the model running now; NULL: none */

static uint8_t tx[FRAME_MAX_BYTES];
static uint16_t tx_seq;
static uint8_t last_status[STATUS_MAX]; /* re-sent as the answer to a manifest it already took */
static size_t last_status_len;
static uint16_t status_seq;
static char detail[DETAIL_MAX + 1];
static size_t detail_len;

static float work[DSP_WORK_FLOATS(DEVICE_MAX_WINDOW)];
static float features[DEVICE_MAX_FEATURES];
static int16_t last_window[DEVICE_MAX_WINDOW]; /* for the smoke inference of the next model */
static uint16_t last_window_n;
static float last_window_scale;
static float last_window_rpm;
static uint32_t speed_fallbacks; /* windows scored at the fallback speed since boot (STATUS) */
static const int16_t zero_window[DEVICE_MAX_WINDOW];

static struct {
    uint32_t model_version;
    uint32_t first_seq;
    uint8_t n;
    score_t items[SCORE_BATCH];
} pending;

static struct {
    uint32_t windows;
    uint32_t anomalies;
    float score_sum;
    uint32_t counts[N_BINS];
    float feature_sum[DEVICE_MAX_FEATURES];
    float feature_sq[DEVICE_MAX_FEATURES];
    float dsp_sum;
    float inference_sum;
    uint32_t inference_max;
    uint32_t speed_fallback; /* windows of the period scored at the fallback speed */
} summary;

/* ---- detail text (no stdio) ---- */

static void detail_reset(void) {
    detail_len = 0;
    detail[0] = '\0';
}

static void detail_str(const char *text) {
    while (*text != '\0' && detail_len < DETAIL_MAX) {
        detail[detail_len++] = *text++;
    }
    detail[detail_len] = '\0';
}

static void detail_int(int32_t value) {
    char digits[12];
    size_t n = 0;
    uint32_t magnitude = value < 0 ? 0u - (uint32_t)value : (uint32_t)value;
    if (value < 0) {
        detail_str("-");
    }
    do {
        digits[n++] = (char)('0' + magnitude % 10u);
        magnitude /= 10u;
    } while (magnitude > 0);
    while (n > 0 && detail_len < DETAIL_MAX) {
        detail[detail_len++] = digits[--n];
    }
    detail[detail_len] = '\0';
}

static void detail_u32(uint32_t value) {
    if (value > INT32_MAX) {
        detail_int((int32_t)(value / 10u));
        detail_int((int32_t)(value % 10u));
    } else {
        detail_int((int32_t)value);
    }
}

/* ---- sending ---- */

/* The payload is already at tx + FRAME_HEADER_BYTES. */
static void send_frame(uint8_t type, size_t len) {
    size_t n = frame_encode(type, tx_seq, tx + FRAME_HEADER_BYTES, len, tx, sizeof tx);
    if (n == 0) {
        return; /* a payload above FRAME_MAX_PAYLOAD: a bug caught by the host tests, never sent cut */
    }
    tx_seq++;
    board_uart_write(tx, n);
}

static frame_writer_t payload_writer(void) {
    frame_writer_t w;
    frame_writer_init(&w, tx + FRAME_HEADER_BYTES, FRAME_MAX_PAYLOAD);
    return w;
}

static void send_log(const char *text) {
    frame_writer_t w = payload_writer();
    frame_put_bytes(&w, (const uint8_t *)text, strlen(text));
    if (!w.overflow) {
        send_frame(FRAME_LOG, w.len);
    }
}

static void send_frame_error(frame_error_t code, uint16_t seq) {
    frame_writer_t w = payload_writer();
    frame_put_u8(&w, (uint8_t)code);
    frame_put_u16(&w, seq);
    send_frame(FRAME_ERROR, w.len);
}

static void put_model(frame_writer_t *w, const engine_t *e) {
    frame_put_u8(w, e != NULL);
    if (e != NULL) {
        frame_put_u32(w, e->version);
        frame_put_bytes(w, e->sha256, OTA_SHA256_BYTES);
        frame_put_str8(w, e->name);
    }
}

static void send_hello(void) {
    frame_writer_t w = payload_writer();
    frame_put_u8(&w, HELLO_VERSION);
    frame_put_u32(&w, 2u * SLOTS_SLOT_BYTES);
    frame_put_u32(&w, SLOTS_SLOT_BYTES);
    frame_put_u32(&w, DEVICE_ARENA_BYTES);
    frame_put_u16(&w, OTA_MAX_CHUNK_SIZE);
    frame_put_u32(&w, DSP_VERSIONS);
    frame_put_str8(&w, prov.device);
    frame_put_str8(&w, prov.fleet);
    frame_put_str8(&w, prov.group);
    frame_put_str8(&w, DEVICE_FIRMWARE);
    frame_put_str8(&w, prov.profile);
    frame_put_str8(&w, board_name());
    uint8_t n_trusted = 0;
    for (unsigned k = 0; k < prov.n_keys; k++) {
        n_trusted = (uint8_t)(n_trusted + (prov.keys[k].has_key && !prov.keys[k].revoked));
    }
    frame_put_u8(&w, n_trusted);
    for (unsigned k = 0; k < prov.n_keys; k++) {
        if (prov.keys[k].has_key && !prov.keys[k].revoked) {
            frame_put_str8(&w, prov.keys[k].key_id);
        }
    }
    put_model(&w, active);
    if (!w.overflow) {
        send_frame(FRAME_HELLO, w.len);
    }
}

/* A STATUS frame (layout in FIRMWARE.md) with the current detail text; kept for re-sending. */
static void send_status(uint8_t state, uint8_t domain, int code, const ota_manifest_t *m, uint16_t received,
                        uint16_t total, const latency_t *lat, const uint16_t *counters) {
    static const latency_t no_latency;
    static const uint16_t no_counters[N_COUNTERS];
    lat = lat != NULL ? lat : &no_latency;
    counters = counters != NULL ? counters : no_counters;
    frame_writer_t w;
    frame_writer_init(&w, last_status, sizeof last_status);
    frame_put_u16(&w, ++status_seq);
    frame_put_u8(&w, state);
    frame_put_u8(&w, domain);
    frame_put_u16(&w, (uint16_t)(int16_t)code);
    frame_put_u32(&w, m != NULL ? m->model_version : 0u);
    frame_put_u16(&w, received);
    frame_put_u16(&w, total);
    put_model(&w, active);
    frame_put_str8(&w, m != NULL ? m->model_name : "");
    frame_put_u32(&w, lat->download_ms);
    frame_put_u32(&w, lat->deploy_ms);
    frame_put_u64(&w, lat->verify);
    frame_put_u64(&w, lat->load);
    frame_put_u64(&w, lat->smoke);
    frame_put_u32(&w, lat->dsp);
    frame_put_u32(&w, lat->inference);
    for (unsigned i = 0; i < N_COUNTERS; i++) {
        frame_put_u16(&w, counters[i]);
    }
    /* unknown types count as malformed: the status has one counter for both */
    const uint16_t *e = parser.errors;
    uint32_t malformed = (uint32_t)e[FRAME_ERR_TYPE] + e[FRAME_ERR_MALFORMED];
    frame_put_u16(&w, e[FRAME_ERR_CRC]);
    frame_put_u16(&w, e[FRAME_ERR_LENGTH]);
    frame_put_u16(&w, e[FRAME_ERR_TRUNCATED]);
    frame_put_u16(&w, e[FRAME_ERR_REPLAY]);
    frame_put_u16(&w, malformed > UINT16_MAX ? UINT16_MAX : (uint16_t)malformed);
    frame_put_str8(&w, detail);
    frame_put_u32(&w, speed_fallbacks);
    if (w.overflow) {
        last_status_len = 0;
        return;
    }
    last_status_len = w.len;
    memcpy(tx + FRAME_HEADER_BYTES, last_status, last_status_len);
    send_frame(FRAME_STATUS, last_status_len);
}

static void resend_status(void) {
    if (last_status_len > 0) {
        memcpy(tx + FRAME_HEADER_BYTES, last_status, last_status_len);
        send_frame(FRAME_STATUS, last_status_len);
    }
}

/* ---- the front end and the model ---- */

/* tinymlops.contracts.dsp.DspSpec.band_edges: rounded geomspace(first, n/2 + 1, n_bands + 1), each band at
 * least one bin wide. Double precision as numpy, at load time only. */
static int band_edges(const ota_dsp_t *d, uint16_t *edges) {
    uint32_t n_bins = d->window_samples / 2u + 1u;
    double bin_hz = (double)d->sample_rate_hz / (double)d->window_samples;
    double first = rint((double)d->f_min_hz / bin_hz);
    first = first < 1.0 ? 1.0 : first;
    double log_first = log10(first);
    double step = (log10((double)n_bins) - log_first) / (double)d->n_bands;
    for (uint32_t i = 0; i <= d->n_bands; i++) {
        double edge = i == 0 ? first : i == d->n_bands ? (double)n_bins : rint(pow(10.0, (double)i * step + log_first));
        if (edge > (double)n_bins) {
            return -1;
        }
        edges[i] = (uint16_t)edge;
        if (i > 0 && edges[i] <= edges[i - 1]) {
            edges[i] = (uint16_t)(edges[i - 1] + 1u);
        }
    }
    return edges[d->n_bands] <= n_bins ? 0 : -1;
}

/* The front end of a DSP block; a trt_status_t code and the detail on failure ("load failed"). */
static int front_end_build(front_end_t *fe, const uint8_t *block, uint16_t len) {
    ota_dsp_t d;
    if (ota_dsp_parse(block, len, &d) != OTA_OK) {
        detail_str("DSP block does not parse");
        return TRT_ERR_FORMAT;
    }
    if (d.window_samples > DEVICE_MAX_WINDOW) {
        detail_str("DSP window of ");
        detail_u32(d.window_samples);
        detail_str(" samples > ");
        detail_u32(DEVICE_MAX_WINDOW);
        return TRT_ERR_LIMIT;
    }
    if (band_edges(&d, fe->edges) != 0) {
        detail_str("DSP bands do not fit the window");
        return TRT_ERR_SHAPE;
    }
    int has_trend = 0;
    for (uint32_t i = 0; i < d.n_stats; i++) {
        fe->mean[i] = ota_f32le(d.mean_le + 4u * i);
        fe->std[i] = ota_f32le(d.std_le + 4u * i);
        fe->slope[i] = d.slope_le != NULL ? ota_f32le(d.slope_le + 4u * i) : 0.0f;
        has_trend |= fe->slope[i] != 0.0f;
    }
    fe->n_features = DSP_N_FEATURES(d.n_bands);
    fe->cfg.window_samples = d.window_samples;
    fe->cfg.n_bands = d.n_bands;
    fe->cfg.band_edges = fe->edges;
    fe->cfg.hann = fe->hann;
    fe->cfg.twiddle = fe->twiddle;
    fe->cfg.mean = fe->mean;
    fe->cfg.std = fe->std;
    /* version 2: the speed trend (all-zero slopes: none); a reference of 0 (version 1) never falls back */
    fe->cfg.slope = has_trend ? fe->slope : NULL;
    fe->cfg.reference_rpm = d.reference_rpm;
    fe->cfg.valid_low_rpm = d.valid_low_rpm;
    fe->cfg.valid_high_rpm = d.valid_high_rpm;
    fe->cfg.speed_log10 = 0.0f;
    if (dsp_init_tables(d.window_samples, fe->hann, fe->twiddle) != DSP_OK || dsp_check_config(&fe->cfg) != DSP_OK) {
        detail_str("DSP front end rejected the block");
        return TRT_ERR_SHAPE;
    }
    return TRT_OK;
}

/* Front end + tinyrt on a model in flash; TRT_OK or a trt_status_t with the detail. */
static int load_engine(engine_t *e, const uint8_t *model, uint32_t size, uint32_t arena_bytes, const uint8_t *dsp,
                       uint16_t dsp_len) {
    if (arena_bytes > DEVICE_ARENA_BYTES) {
        detail_str("arena ");
        detail_u32(arena_bytes);
        detail_str(" B > RAM free ");
        detail_u32(DEVICE_ARENA_BYTES);
        detail_str(" B");
        return TRT_ERR_ARENA;
    }
    int status = front_end_build(&e->dsp, dsp, dsp_len);
    if (status != TRT_OK) {
        return status;
    }
    status = trt_init(&e->model, model, size, arenas[e - engines].bytes, arena_bytes);
    if (status != TRT_OK) {
        detail_str("tinyrt: ");
        detail_str(trt_status_name(status));
        return status;
    }
    uint32_t inputs = trt_input(&e->model)->size;
    uint32_t outputs = trt_output(&e->model)->size;
    if (inputs != e->dsp.n_features || outputs != e->dsp.n_features) {
        detail_str("model maps ");
        detail_u32(inputs);
        detail_str(" to ");
        detail_u32(outputs);
        detail_str(" values, the DSP spec gives ");
        detail_u32(e->dsp.n_features);
        detail_str(" features");
        return TRT_ERR_SHAPE;
    }
    return TRT_OK;
}

/*
 * firmware.device.score_window: normalised DSP features, quantized with the input scale and zero
 * point (numpy's round half to even, in double as tflm.py), tinyrt, dequantized, and the mean
 * squared error between features and reconstruction accumulated in double. The features are normalised
 * at the window's shaft speed rpm (0, NaN or out of range: at the reference speed, flagged in
 * out->speed_fallback; its cost counts as DSP). Returns 0, a dsp_features status (< 0) or, on an
 * inference failure, a trt_status_t in *trt_code.
 */
static int score_window(engine_t *e, const int16_t *samples, float scale, float rpm, double *score, score_t *out) {
    uint64_t t0 = board_instructions();
    out->speed_fallback = (uint8_t)dsp_set_speed(&e->dsp.cfg, rpm);
    int status = dsp_features(&e->dsp.cfg, samples, scale, work, features);
    if (status != DSP_OK) {
        return status;
    }
    uint64_t t1 = board_instructions();
    const trt_io_t *in = trt_input(&e->model);
    uint32_t n = e->dsp.n_features;
    for (uint32_t i = 0; i < n; i++) {
        double q = rint((double)features[i] / (double)in->scale) + (double)in->zero_point;
        in->data[i] = (int8_t)(q < -128.0 ? -128.0 : q > 127.0 ? 127.0 : q);
    }
    status = trt_invoke(&e->model);
    if (status != TRT_OK) {
        return status;
    }
    uint64_t t2 = board_instructions();
    const trt_io_t *o = trt_output(&e->model);
    double sum = 0.0;
    for (uint32_t i = 0; i < n; i++) {
        float reconstruction = (float)((double)(o->data[i] - o->zero_point) * (double)o->scale);
        float d = features[i] - reconstruction;
        sum += (double)(d * d);
    }
    *score = sum / (double)n;
    out->score = (float)*score;
    out->anomaly = *score > (double)e->threshold;
    out->dsp_instructions = (uint32_t)(t1 - t0);
    out->inference_instructions = (uint32_t)(t2 - t1);
    return 0;
}

/* ---- scores and summaries ---- */

static void summary_reset(void) { memset(&summary, 0, sizeof summary); }

static void flush_scores(void) {
    if (pending.n == 0) {
        return;
    }
    frame_writer_t w = payload_writer();
    frame_put_u32(&w, pending.model_version);
    frame_put_u32(&w, pending.first_seq);
    frame_put_u8(&w, pending.n);
    for (unsigned i = 0; i < pending.n; i++) {
        frame_put_f32(&w, pending.items[i].score);
        frame_put_u8(&w, pending.items[i].anomaly);
        frame_put_u32(&w, pending.items[i].dsp_instructions);
        frame_put_u32(&w, pending.items[i].inference_instructions);
    }
    pending.n = 0;
    send_frame(FRAME_SCORES, w.len);
}

static void send_summary(void) {
    if (active == NULL) {
        return;
    }
    float n = (float)(summary.windows > 0 ? summary.windows : 1u);
    frame_writer_t w = payload_writer();
    frame_put_u32(&w, active->version);
    frame_put_f32(&w, active->threshold);
    frame_put_u32(&w, summary.windows);
    frame_put_u32(&w, summary.anomalies);
    frame_put_f32(&w, summary.score_sum / n);
    frame_put_u8(&w, N_BINS);
    for (unsigned i = 0; i < N_BINS; i++) {
        frame_put_u32(&w, summary.counts[i]);
    }
    uint32_t n_features = active->dsp.n_features;
    frame_put_u16(&w, (uint16_t)n_features);
    for (uint32_t i = 0; i < n_features; i++) {
        frame_put_f32(&w, summary.feature_sum[i] / n);
    }
    for (uint32_t i = 0; i < n_features; i++) {
        float mean = summary.feature_sum[i] / n;
        float var = summary.feature_sq[i] / n - mean * mean;
        frame_put_f32(&w, var > 0.0f ? var : 0.0f);
    }
    frame_put_f32(&w, summary.dsp_sum / n);
    frame_put_f32(&w, summary.inference_sum / n);
    frame_put_u32(&w, summary.inference_max);
    frame_put_u32(&w, summary.speed_fallback);
    summary_reset();
    send_frame(FRAME_SUMMARY, w.len);
}

static void record(uint32_t seq, double score, const score_t *s) {
    if (pending.n == 0) {
        pending.model_version = active->version;
        pending.first_seq = seq;
    }
    pending.items[pending.n++] = *s;
    unsigned bin = N_BINS - 1u;
    while (bin > 0 && !(score >= score_edges_rel[bin] * (double)active->threshold)) {
        bin--;
    }
    summary.counts[bin]++;
    summary.windows++;
    summary.anomalies += s->anomaly;
    summary.speed_fallback += s->speed_fallback;
    speed_fallbacks += s->speed_fallback;
    summary.score_sum += s->score;
    for (uint32_t i = 0; i < active->dsp.n_features; i++) {
        summary.feature_sum[i] += features[i];
        summary.feature_sq[i] += features[i] * features[i];
    }
    summary.dsp_sum += (float)s->dsp_instructions;
    summary.inference_sum += (float)s->inference_instructions;
    if (s->inference_instructions > summary.inference_max) {
        summary.inference_max = s->inference_instructions;
    }
    if (pending.n >= SCORE_BATCH) {
        flush_scores();
    }
    if (summary.windows >= SUMMARY_WINDOWS) {
        send_summary();
    }
}

/* WINDOW: u32 seq, f32 scale, u32 sample_rate_hz, u16 n, int16[n], optional f32 rpm (absent, 0 or NaN:
 * unknown). -1: malformed. */
static int on_window(const uint8_t *payload, size_t len) {
    frame_reader_t r;
    frame_reader_init(&r, payload, len);
    uint32_t seq = frame_get_u32(&r);
    float scale = frame_get_f32(&r);
    (void)frame_get_u32(&r); /* the sample rate: the model's DSP block fixes the band edges */
    uint16_t n = frame_get_u16(&r);
    const uint8_t *samples = frame_get_bytes(&r, 2u * n);
    float rpm = !r.overflow && r.pos + 4u == len ? frame_get_f32(&r) : 0.0f; /* 0: unknown, the fallback */
    if (r.overflow || r.pos != len || n == 0 || n > DEVICE_MAX_WINDOW || !(scale > 0.0f) || !isfinite(scale)) {
        return -1;
    }
    for (uint16_t i = 0; i < n; i++) {
        last_window[i] = (int16_t)(uint16_t)(samples[2u * i] | samples[2u * i + 1u] << 8);
    }
    last_window_n = n;
    last_window_scale = scale;
    last_window_rpm = rpm;
    if (active == NULL) {
        return 0;
    }
    if (n != active->dsp.cfg.window_samples) {
        detail_reset();
        detail_str("window of ");
        detail_u32(n);
        detail_str(" samples, the model's DSP takes ");
        detail_u32(active->dsp.cfg.window_samples);
        send_log(detail);
        return 0;
    }
    double score;
    score_t s;
    int status = score_window(active, last_window, scale, rpm, &score, &s);
    if (status != 0) {
        detail_reset();
        detail_str("scoring failed: ");
        detail_int(status);
        send_log(detail);
        return 0;
    }
    record(seq, score, &s);
    return 0;
}

/* ---- OTA ---- */

static int have_chunk(uint16_t index) { return (rx.received[index >> 3] >> (index & 7u)) & 1; }

static int write_staging(uint32_t offset, const uint8_t *data, size_t len) {
    if (offset > SLOTS_SLOT_BYTES || len > SLOTS_SLOT_BYTES - offset) {
        return -1;
    }
    return board_flash_write(SLOTS_SLOT_OFFSET(staging_slot) + offset, data, len);
}

/* The record of the download in rx.manifest into the staging slot, with rx's bitmap. */
static int save_record(void) {
    const ota_manifest_t *m = &rx.manifest;
    resume_rec.version = m->model_version;
    memcpy(resume_rec.sha256, m->sha256, OTA_SHA256_BYTES);
    resume_rec.model_size = m->model_size;
    resume_rec.chunk_count = m->chunk_count;
    resume_rec.slot = staging_slot;
    memcpy(resume_rec.received, rx.received, sizeof resume_rec.received);
    return slots_save_transfer(&flash, &resume_rec);
}

/* Whether the record kept at boot is of this manifest's download into the staging slot. */
static int record_matches(const ota_manifest_t *m) {
    return resume_rec.version != 0 && resume_rec.version == m->model_version &&
           memcmp(resume_rec.sha256, m->sha256, OTA_SHA256_BYTES) == 0 && resume_rec.model_size == m->model_size &&
           resume_rec.chunk_count == m->chunk_count && resume_rec.slot == staging_slot;
}

static void clear_record(void) {
    if (resume_rec.version != 0 && slots_clear_transfer(&flash, &resume_rec) != SLOTS_OK) {
        send_log("transfer record: clearing it failed");
    }
}

static void request(uint32_t now) {
    size_t len;
    if (!tr.active || ota_receiver_request(&rx, REQUEST_WINDOW, tx + FRAME_HEADER_BYTES, FRAME_MAX_PAYLOAD, &len) !=
                          OTA_OK || len == 0) {
        return;
    }
    tr.n_outstanding = ota_receiver_missing(&rx, tr.outstanding, REQUEST_WINDOW);
    tr.last_request_ms = now;
    tr.counters[C_REQUESTS]++;
    send_frame(FRAME_REQUEST, len);
}

/* Give the download up; the running model keeps running. */
static void fail(uint8_t domain, int code) {
    uint16_t received = rx.n_received;
    ota_receiver_abort(&rx);
    tr.active = 0;
    clear_record();
    send_status(ST_FAILED, domain, code, &rx.manifest, received, rx.manifest.chunk_count, &tr.latency, tr.counters);
}

static void reason_detail(int code, const ota_manifest_t *m) {
    switch (code) {
    case OTA_ERR_WRONG_AUDIENCE:
        detail_str("manifest is for ");
        detail_str(m->audience);
        break;
    case OTA_ERR_NOT_NEWER:
        detail_str("version ");
        detail_u32(m->model_version);
        detail_str(" is not newer than ");
        detail_u32(rx.highest_version > rx.active_version ? rx.highest_version : rx.active_version);
        break;
    case OTA_ERR_WRONG_PROFILE:
        detail_str("model is for ");
        detail_str(m->target);
        detail_str(", this device is ");
        detail_str(prov.profile);
        break;
    case OTA_ERR_TOO_LARGE:
        detail_str("model ");
        detail_u32(m->model_size);
        detail_str(" B > staging slot ");
        detail_u32(SLOTS_SLOT_BYTES);
        detail_str(" B");
        break;
    case OTA_ERR_ARENA:
        detail_str("arena ");
        detail_u32(m->arena_bytes);
        detail_str(" B > RAM free ");
        detail_u32(DEVICE_ARENA_BYTES);
        detail_str(" B");
        break;
    default:
        detail_str(ota_status_name(code));
        if (code <= OTA_ERR_BAD_SIGNATURE && code >= OTA_ERR_REVOKED_KEY) {
            detail_str(": key id ");
            detail_str(m->key_id);
        }
        break;
    }
}

static void complete(void);

/* MANIFEST: u8 source, then the MQTT payload (empty: withdrawn). -1: malformed. */
static int on_manifest(const uint8_t *payload, size_t len) {
    if (len < 1 || payload[0] > 1) {
        return -1;
    }
    uint8_t source = payload[0];
    uint32_t started = board_millis();
    uint64_t t0 = board_instructions();
    detail_reset();
    if (len == 1) {
        if (tr.active && tr.source == source) {
            ota_receiver_abort(&rx);
            tr.active = 0;
            clear_record();
            detail_str("manifest withdrawn");
            send_status(ST_CANCELLED, DOM_NONE, 0, &rx.manifest, 0, 0, NULL, NULL);
        }
        return 0;
    }
    int code = ota_receiver_on_manifest(&rx, payload + 1, len - 1);
    uint64_t check = board_instructions() - t0;
    if (code == OTA_SAME) {
        /* already taken (a retained manifest again): answer with the current status, resume */
        resend_status();
        request(board_millis());
        return 0;
    }
    if (code < 0) {
        /* the scratch copy holds the manifest for every check after decoding (signature onwards) */
        const ota_manifest_t *m = code <= OTA_ERR_BAD_SIGNATURE ? &rx.scratch : NULL;
        if (m != NULL) {
            reason_detail(code, m);
        } else {
            detail_str(ota_status_name(code));
        }
        send_status(code == OTA_ERR_NOT_NEWER ? ST_IGNORED : ST_FAILED, DOM_OTA, code, m, 0, 0, NULL, NULL);
        return 0;
    }
    memset(&tr, 0, sizeof tr);
    tr.active = 1;
    tr.source = source;
    tr.started_ms = started;
    tr.latency.verify = check;
    if (record_matches(&rx.manifest)) {
        /* the same download before a restart: its chunks are in the staging slot (the sha256 at the end checks) */
        code = ota_receiver_resume(&rx, resume_rec.received, sizeof resume_rec.received);
        tr.resumed = 1;
        detail_str("resumed at ");
        detail_u32(rx.n_received);
        detail_str(" of ");
        detail_u32(rx.manifest.chunk_count);
        detail_str(" chunks");
    } else if (save_record() != SLOTS_OK) { /* before the first chunk: a stale record never names them */
        detail_str("transfer record write failed");
        fail(DOM_SLOTS, SLOTS_ERR_WRITE);
        return 0;
    }
    send_status(ST_DOWNLOADING, DOM_NONE, 0, &rx.manifest, rx.n_received, rx.manifest.chunk_count, NULL, NULL);
    if (code == OTA_DONE) {
        complete();
    } else {
        request(board_millis());
    }
    return 0;
}

/* The manifest's reference inputs through the loaded model: every output within the tolerance, else
 * the detail names the worst one (firmware.device.check_references). TRT_OK, or a nonzero code. */
static int check_references(engine_t *e, const ota_manifest_t *m) {
    ota_ref_t ref;
    if (ota_ref_parse(m->ref_block, m->ref_len, &ref) != OTA_OK) {
        detail_str("reference block does not parse");
        return TRT_ERR_FORMAT;
    }
    const trt_io_t *in = trt_input(&e->model);
    const trt_io_t *out = trt_output(&e->model);
    if (in->size != ref.n_in || out->size != ref.n_out) {
        detail_str("references map ");
        detail_u32(ref.n_in);
        detail_str(" to ");
        detail_u32(ref.n_out);
        detail_str(" values, the model ");
        detail_u32(in->size);
        detail_str(" to ");
        detail_u32(out->size);
        return TRT_ERR_SHAPE;
    }
    for (uint32_t k = 0; k < ref.count; k++) {
        memcpy(in->data, ref.inputs + k * ref.n_in, ref.n_in);
        int status = trt_invoke(&e->model);
        if (status != TRT_OK) {
            detail_str("reference inference failed: ");
            detail_str(trt_status_name(status));
            return status;
        }
        const int8_t *want = ref.expected + k * ref.n_out;
        uint32_t worst = 0;
        int32_t off = 0;
        for (uint32_t i = 0; i < ref.n_out; i++) {
            int32_t d = (int32_t)out->data[i] - (int32_t)want[i];
            d = d < 0 ? -d : d;
            if (d > off) {
                off = d;
                worst = i;
            }
        }
        if (off > (int32_t)ref.tolerance) {
            detail_str("reference ");
            detail_u32(k + 1u);
            detail_str(" of ");
            detail_u32(ref.count);
            detail_str(": output ");
            detail_u32(worst);
            detail_str(" is ");
            detail_int(out->data[worst]);
            detail_str(", expected ");
            detail_int(want[worst]);
            detail_str(" (");
            detail_int(off);
            detail_str(" LSB > ");
            detail_u32(ref.tolerance);
            detail_str(")");
            return -1;
        }
    }
    return TRT_OK;
}

/* All chunks are in: verify, load, smoke-test, commit, swap (firmware.device._complete). */
static void complete(void) {
    const ota_manifest_t *m = &rx.manifest;
    latency_t *lat = &tr.latency;
    uint16_t n = m->chunk_count;
    detail_reset();
    lat->download_ms = board_millis() - tr.started_ms;
    uint64_t t0 = board_instructions();
    int code = ota_receiver_finish(&rx);
    lat->verify += board_instructions() - t0;
    if (code == OTA_ERR_SHA256 && tr.resumed) {
        /* a chunk the record named is not what the slot holds: fetch the whole model once more */
        send_log("resumed model failed its sha256: downloading it again");
        tr.resumed = 0;
        ota_receiver_resume(&rx, NULL, 0);
        if (save_record() != SLOTS_OK) {
            detail_str("transfer record write failed");
            fail(DOM_SLOTS, SLOTS_ERR_WRITE);
            return;
        }
        send_status(ST_DOWNLOADING, DOM_NONE, 0, m, 0, n, NULL, tr.counters);
        request(board_millis());
        return;
    }
    if (code != OTA_OK) {
        detail_str(code == OTA_ERR_SHA256 ? "model sha256 does not match the manifest" : ota_status_name(code));
        fail(DOM_OTA, code);
        return;
    }
    send_status(ST_VERIFIED, DOM_NONE, 0, m, n, n, lat, tr.counters);

    engine_t *candidate = active == &engines[0] ? &engines[1] : &engines[0];
    t0 = board_instructions();
    code = load_engine(candidate, slots_model(&flash, staging_slot), m->model_size, m->arena_bytes, m->dsp_block,
                       m->dsp_len);
    lat->load = board_instructions() - t0;
    if (code != TRT_OK) {
        fail(DOM_RUNTIME, code);
        return;
    }
    candidate->threshold = m->threshold;
    candidate->version = m->model_version;
    memcpy(candidate->sha256, m->sha256, OTA_SHA256_BYTES);
    memcpy(candidate->name, m->model_name, sizeof candidate->name);
    send_status(ST_LOADED, DOM_NONE, 0, m, n, n, lat, tr.counters);

    int with_last = last_window_n == candidate->dsp.cfg.window_samples;
    double score = 0.0;
    score_t smoke;
    t0 = board_instructions();
    code = check_references(candidate, m);
    if (code != TRT_OK) {
        lat->smoke = board_instructions() - t0;
        fail(DOM_SMOKE, code);
        return;
    }
    code = score_window(candidate, with_last ? last_window : zero_window, with_last ? last_window_scale : 1.0f,
                        with_last ? last_window_rpm : 0.0f, &score, &smoke); /* not counted: no window scored */
    lat->smoke = board_instructions() - t0;
    if (code != 0 || !isfinite(score)) {
        detail_str(code != 0 ? "smoke inference failed" : "smoke inference gave a non-finite score");
        fail(DOM_SMOKE, code);
        return;
    }
    lat->dsp = smoke.dsp_instructions;
    lat->inference = smoke.inference_instructions;

    slots_entry_t entry;
    memset(&entry, 0, sizeof entry);
    entry.model_size = m->model_size;
    entry.version = m->model_version;
    memcpy(entry.sha256, m->sha256, OTA_SHA256_BYTES);
    entry.arena_bytes = m->arena_bytes;
    entry.threshold = m->threshold;
    memcpy(entry.name, m->model_name, sizeof entry.name);
    entry.dsp_len = m->dsp_len;
    memcpy(entry.dsp, m->dsp_block, m->dsp_len);
    code = slots_commit(&flash, &table, staging_slot, &entry);
    if (code != SLOTS_OK) {
        detail_str("slot table write failed");
        fail(DOM_SLOTS, code);
        return;
    }
    clear_record(); /* after the commit: a power loss between the two leaves a record boot ignores */
    flush_scores(); /* pending scores belong to the previous model */
    active = candidate; /* the swap */
    summary_reset();
    ota_receiver_commit(&rx);
    staging_slot = slots_staging(&table);
    rx.image = slots_model(&flash, staging_slot);
    tr.active = 0;
    lat->deploy_ms = board_millis() - tr.started_ms;
    send_status(ST_ACTIVE, DOM_NONE, 0, m, n, n, lat, tr.counters);
    send_hello(); /* the model changed */
}

/* CHUNK: the MQTT chunk payload (firmware.device._on_chunk). */
static void on_chunk(const uint8_t *payload, size_t len) {
    int code = ota_receiver_on_chunk(&rx, payload, len);
    if (!tr.active) {
        return;
    }
    if (code == OTA_DUPLICATE) {
        tr.counters[C_DUPLICATES]++;
        return;
    }
    if (code == OTA_ERR_STALE || code == OTA_ERR_NO_MANIFEST) {
        tr.counters[C_STALE]++;
        return;
    }
    if (code == OTA_ERR_BUFFER) {
        detail_reset();
        detail_str("staging slot write failed");
        fail(DOM_SLOTS, SLOTS_ERR_WRITE);
        return;
    }
    if (code < 0) {
        tr.counters[C_CORRUPT]++;
        if (tr.counters[C_CORRUPT] > MAX_CORRUPT_CHUNKS) {
            detail_reset();
            detail_u32(tr.counters[C_CORRUPT]);
            detail_str(" corrupt chunks, last: ");
            detail_str(ota_status_name(code));
            fail(DOM_CORRUPT, code);
        } else {
            tr.expedite = 1;
        }
        return;
    }
    tr.stalled = 0;
    if ((code == OTA_DONE || rx.n_received % RESUME_EVERY == 0) && save_record() != SLOTS_OK) {
        detail_reset();
        detail_str("transfer record write failed");
        fail(DOM_SLOTS, SLOTS_ERR_WRITE);
        return;
    }
    if (code == OTA_DONE) {
        complete();
        return;
    }
    for (size_t i = 0; i < tr.n_outstanding; i++) {
        if (!have_chunk(tr.outstanding[i])) {
            return;
        }
    }
    detail_reset();
    send_status(ST_DOWNLOADING, DOM_NONE, 0, &rx.manifest, rx.n_received, rx.manifest.chunk_count, NULL, tr.counters);
    request(board_millis());
}

/* ---- frames ---- */

static void on_frame(const frame_t *f) {
    int malformed = 0;
    switch (f->type) {
    case FRAME_MANIFEST:
        malformed = on_manifest(f->payload, f->length) != 0;
        break;
    case FRAME_CHUNK:
        on_chunk(f->payload, f->length);
        break;
    case FRAME_WINDOW:
        malformed = on_window(f->payload, f->length) != 0;
        break;
    case FRAME_SUMMARY_NOW:
        malformed = f->length != 0;
        if (!malformed) {
            flush_scores();
            send_summary();
        }
        break;
    case FRAME_PING:
        malformed = f->length != 4;
        if (!malformed) {
            frame_writer_t w = payload_writer();
            frame_put_bytes(&w, f->payload, 4);
            send_frame(FRAME_PONG, w.len);
        }
        break;
    default:
        frame_parser_count(&parser, FRAME_ERR_TYPE);
        send_frame_error(FRAME_ERR_TYPE, f->seq);
        return;
    }
    if (malformed) {
        frame_parser_count(&parser, FRAME_ERR_MALFORMED);
        send_frame_error(FRAME_ERR_MALFORMED, f->seq);
    }
}

/* Handle every event the buffered bytes give (a frame, or a dropped frame to report). */
static void drain(int event, frame_t *f) {
    for (;;) {
        if (event == FRAME_READY) {
            on_frame(f);
        } else if (event < 0) {
            send_frame_error((frame_error_t)-event, f->seq);
        }
        event = frame_parser_next(&parser, f);
        if (event == FRAME_NONE) {
            return;
        }
    }
}

static void tick(uint32_t now) {
    frame_t f;
    int event = frame_parser_tick(&parser, now, &f);
    if (event != FRAME_NONE) {
        drain(event, &f);
    }
    if (tr.active) {
        uint32_t wait = RETRY_MS << (tr.stalled < 16u ? tr.stalled : 16u);
        wait = wait < MAX_RETRY_MS ? wait : MAX_RETRY_MS;
        if (tr.expedite || now - tr.last_request_ms >= wait) {
            tr.counters[C_RETRIES] = (uint16_t)(tr.counters[C_RETRIES] + !tr.expedite);
            tr.stalled += !tr.expedite;
            tr.expedite = 0;
            request(now);
        }
    }
}

/* ---- boot ---- */

/* The table's active model into an engine; else the previous slot's, if it verifies and loads. */
static void load_stored_model(void) {
    for (int attempt = 0; attempt < 2 && table.active != SLOTS_NONE; attempt++) {
        const slots_entry_t *e = &table.slot[table.active];
        detail_reset();
        int code = load_engine(&engines[0], slots_model(&flash, table.active), e->model_size, e->arena_bytes, e->dsp,
                               e->dsp_len);
        if (code == TRT_OK) {
            engines[0].threshold = e->threshold;
            engines[0].version = e->version;
            memcpy(engines[0].sha256, e->sha256, OTA_SHA256_BYTES);
            memcpy(engines[0].name, e->name, sizeof engines[0].name);
            active = &engines[0];
            return;
        }
        send_log("stored model does not load; trying the previous slot");
        send_log(detail);
        table.active = slots_verify(&flash, &table, table.previous) ? table.previous : SLOTS_NONE;
        table.previous = SLOTS_NONE;
    }
}

static void boot(void) {
    board_init();
    frame_parser_init(&parser);
    flash = flash_ops;
    flash.base = board_flash_base();
    flash.size = board_flash_size();
    int prov_status = slots_load_provisioning(&flash, &prov);
    if (prov_status != SLOTS_OK) {
        memset(&prov, 0, sizeof prov); /* no identity: every manifest fails its audience check */
    }
    ed25519_verify_set_keys(prov.keys, prov.n_keys);
    int boot_status = slots_boot(&flash, &table);
    if (boot_status == SLOTS_FALLBACK) {
        send_log("active slot failed its sha256: running the previous model");
    }
    load_stored_model();
    staging_slot = slots_staging(&table);
    (void)slots_load_transfer(&flash, &resume_rec); /* kept until a manifest says whether it resumes */
    ota_config_t config = {prov.device, prov.group[0] != '\0' ? prov.group : NULL, prov.profile, DEVICE_ARENA_BYTES,
                           DSP_VERSIONS, ed25519_verify};
    ota_receiver_init_flash(&rx, &config, slots_model(&flash, staging_slot), SLOTS_SLOT_BYTES,
                            active != NULL ? active->version : 0u, write_staging);
    send_hello();
    detail_reset();
    if (prov_status != SLOTS_OK || boot_status < 0) {
        detail_str(prov_status != SLOTS_OK ? "provisioning block unreadable" : "flash region too small");
        send_status(ST_FAILED, DOM_SLOTS, prov_status != SLOTS_OK ? prov_status : boot_status, NULL, 0, 0, NULL, NULL);
    } else {
        send_status(ST_IDLE, DOM_NONE, 0, NULL, 0, 0, NULL, NULL);
    }
}

int main(void) {
    boot();
    for (;;) {
        int c;
        while ((c = board_uart_getc()) >= 0) {
            frame_t f;
            if (frame_parser_feed(&parser, (uint8_t)c, board_millis()) != 0) {
                break; /* cannot happen: drain() empties the buffer after every byte */
            }
            drain(FRAME_NONE, &f);
        }
        tick(board_millis());
    }
}
