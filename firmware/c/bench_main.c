/*
 * The measurement image: the float DSP front end and tinyrt inference on the inputs QEMU's loader
 * placed at BENCH_INPUT_ADDR (layout in bench_input.h), with the instructions of each counted
 * separately by board_instructions(). Results go to the semihosting console, one line each:
 *
 *   bench 1 board=<name> instructions_per_tick=<k> windows=<n> overhead=<instructions>
 *   calibration iterations=<n> instructions=<instructions>      (when asked for)
 *   window <i> dsp=<instructions> inference=<instructions>
 *   features <i> <hex of the f32 features, little-endian>
 *   q15 <i> dsp=<instructions> <hex of the Q16 int32 features>  (with the fixed-point tables)
 *   input <i> <hex of the int8 model input>                      (with inference)
 *   output <i> <hex of the int8 model output>                    (with inference)
 *   done
 *
 * "overhead" is what one empty measurement (two board_instructions() calls) counts; it is not
 * subtracted. A failure prints "error <stage> <status>" and exits 1. Floats travel as hex so the
 * host compares exact bits.
 *
 * Built with BENCH_WITH_TINYRT when tinyrt.c is part of the image, and BENCH_WITH_DSP_Q15 when the
 * fixed-point front end (dsp_q15.c) is: given its tables, it runs on each window after the float one.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "bench_input.h"
#include "board.h"
#include "dsp_features.h"
#ifdef BENCH_WITH_TINYRT
#include "tinyrt.h"
#endif
#ifdef BENCH_WITH_DSP_Q15
#include "dsp_q15.h"
#endif

#ifndef BENCH_INPUT_ADDR
#error "BENCH_INPUT_ADDR: where the board's runner places the bench input (Makefile.arm sets it)"
#endif
#ifndef BENCH_ARENA_BYTES
#define BENCH_ARENA_BYTES 4096u
#endif
#define MAX_WINDOW_SAMPLES 1024u
#define MAX_FEATURES 64u
#define EXIT_BENCH_ERROR 1

/* One work buffer for both front ends: they run one after the other. */
static union {
    float f32[DSP_WORK_FLOATS(MAX_WINDOW_SAMPLES)];
#ifdef BENCH_WITH_DSP_Q15
    int32_t i32[DSPQ_WORK_WORDS(MAX_WINDOW_SAMPLES)];
#endif
} work;
static float features[MAX_FEATURES];
#ifdef BENCH_WITH_TINYRT
static trt_model_t model;
static int8_t model_input[MAX_FEATURES]; /* kept: the arena plan may reuse the input tensor's bytes */
static uint8_t arena[BENCH_ARENA_BYTES] __attribute__((aligned(16)));
#endif

static char line[160];
static size_t line_len;

static void flush_line(void) {
    line[line_len] = '\0';
    board_puts(line);
    line_len = 0;
}

static void put_char(char c) {
    if (line_len + 1u >= sizeof line) flush_line();
    line[line_len++] = c;
}

static void put_text(const char *text) {
    while (*text != '\0') put_char(*text++);
}

static void put_u64(uint64_t value) {
    char digits[21];
    int n = 0;
    do {
        digits[n++] = (char)('0' + (int)(value % 10u));
        value /= 10u;
    } while (value != 0u);
    while (n > 0) put_char(digits[--n]);
}

static void put_hex(const void *data, size_t len) {
    static const char hex[] = "0123456789abcdef";
    const uint8_t *bytes = (const uint8_t *)data;
    size_t i;
    for (i = 0; i < len; i++) {
        put_char(hex[bytes[i] >> 4]);
        put_char(hex[bytes[i] & 0xFu]);
    }
}

static void end_line(void) {
    put_char('\n');
    flush_line();
}

static void fail(const char *stage, int status) {
    put_text("error ");
    put_text(stage);
    put_char(' ');
    if (status < 0) {
        put_char('-');
        status = -status;
    }
    put_u64((uint64_t)status);
    end_line();
    board_exit(EXIT_BENCH_ERROR);
}

/* A field of n bytes at offset, inside the block and aligned: its address, or NULL. */
static const void *field(const bench_input_t *in, uint32_t offset, uint32_t n, uint32_t alignment) {
    if (offset < in->header_bytes || offset % alignment != 0u || offset > in->total_bytes ||
        n > in->total_bytes - offset) {
        return NULL;
    }
    return (const uint8_t *)in + offset;
}

/* A loop of exactly 2 x iterations instructions (subs, bne) between two marker functions: the
 * known workload the host checks board_instructions() against, and whose markers bound the
 * instructions QEMU's -singlestep -d exec log counts. */
__attribute__((noinline)) void bench_marker_begin(void) { __asm__ volatile("" ::: "memory"); }
__attribute__((noinline)) void bench_marker_end(void) { __asm__ volatile("" ::: "memory"); }

#if __ARM_ARCH_ISA_THUMB == 1 /* GCC assembles Thumb-1 inline assembly in divided syntax: "sub" sets flags */
#define DECREMENT "sub %0, #1"
#else
#define DECREMENT "subs %0, %0, #1"
#endif

static uint64_t calibration_loop(uint32_t iterations) {
    uint64_t start = board_instructions();
    bench_marker_begin();
    __asm__ volatile("1: " DECREMENT "\n\tbne 1b" : "+l"(iterations)::"cc");
    bench_marker_end();
    return board_instructions() - start;
}

#ifdef BENCH_WITH_TINYRT
/* Features -> the model's int8 input, as TFLite quantizes: round half away from zero, clamp. */
static void quantize_input(const trt_io_t *input, const float *values, int8_t *out) {
    uint32_t i;
    for (i = 0; i < input->size; i++) {
        float q = roundf(values[i] / input->scale) + (float)input->zero_point;
        out[i] = (int8_t)(q < -128.0f ? -128.0f : q > 127.0f ? 127.0f : q);
    }
}
#endif

int main(void) {
    const bench_input_t *in = (const bench_input_t *)BENCH_INPUT_ADDR;
    dsp_config_t cfg;
    const int16_t *samples;
    uint32_t n, n_features, w;
    int normalise, status;
    uint64_t start, overhead;
#ifdef BENCH_WITH_TINYRT
    const int8_t *given_inputs = NULL; /* the model's input rows from the block, when given */
#endif
#ifdef BENCH_WITH_DSP_Q15
    dspq_config_t q15;
    static int32_t q15_features[MAX_FEATURES];
#endif

    board_init();
    if (in->magic != BENCH_INPUT_MAGIC || in->version != BENCH_INPUT_VERSION ||
        in->header_bytes < sizeof(bench_input_t) || in->total_bytes < in->header_bytes) {
        fail("header", -1);
    }
    n = in->window_samples;
    if (n > MAX_WINDOW_SAMPLES || DSP_N_FEATURES(in->n_bands) > MAX_FEATURES) fail("size", -1);
    n_features = DSP_N_FEATURES(in->n_bands);
    normalise = (in->flags & BENCH_INPUT_FLAG_NORMALISE) != 0u;
    cfg.window_samples = n;
    cfg.n_bands = in->n_bands;
    cfg.band_edges = (const uint16_t *)field(in, in->edges_offset, 2u * (in->n_bands + 1u), 2u);
    cfg.hann = (const float *)field(in, in->hann_offset, 4u * n, 4u);
    cfg.twiddle = (const float *)field(in, in->twiddle_offset, 4u * n, 4u);
    cfg.mean = normalise ? (const float *)field(in, in->mean_offset, 4u * n_features, 4u) : NULL;
    cfg.std = normalise ? (const float *)field(in, in->std_offset, 4u * n_features, 4u) : NULL;
    cfg.slope = NULL; /* the bench measures the speed-unaware front end */
    samples = (const int16_t *)field(in, in->samples_offset, 2u * n * in->n_windows, 2u);
    if (samples == NULL || (normalise && (cfg.mean == NULL || cfg.std == NULL))) fail("layout", -1);
    status = dsp_check_config(&cfg);
    if (status != DSP_OK) fail("dsp_check_config", status);

#ifdef BENCH_WITH_TINYRT
    if (in->flags & BENCH_INPUT_FLAG_INFERENCE) {
        const uint8_t *tflite = (const uint8_t *)field(in, in->model_offset, in->model_bytes, 16u);
        if (tflite == NULL) fail("layout", -2);
        status = trt_init(&model, tflite, in->model_bytes, arena, sizeof arena);
        if (status != TRT_OK) fail("trt_init", status);
        if (in->model_input_offset != 0u) {
            given_inputs = (const int8_t *)field(in, in->model_input_offset,
                                                 trt_input(&model)->size * in->n_windows, 1u);
            if (given_inputs == NULL) fail("layout", -3);
        } else if (trt_input(&model)->size != n_features) {
            fail("model_input", (int)trt_input(&model)->size);
        }
    }
#else
    if (in->flags & BENCH_INPUT_FLAG_INFERENCE) fail("no_tinyrt", -1);
#endif
#ifdef BENCH_WITH_DSP_Q15
    if (in->q15_hann_offset != 0u) {
        q15.window_samples = n;
        q15.n_bands = in->n_bands;
        q15.band_edges = cfg.band_edges;
        q15.hann = field(in, in->q15_hann_offset, n * (uint32_t)sizeof *q15.hann, 4u);
        q15.twiddle = field(in, in->q15_twiddle_offset, n * (uint32_t)sizeof *q15.twiddle, 4u);
        q15.affine = NULL;
        status = dspq_set_scale(&q15, in->scale); /* before the check, which requires a scale */
        if (status != DSPQ_OK) fail("dspq_set_scale", status);
        status = dspq_check_config(&q15);
        if (status != DSPQ_OK) fail("dspq_check_config", status);
    }
#else
    if (in->q15_hann_offset != 0u) fail("no_dsp_q15", -1);
#endif

    start = board_instructions();
    overhead = board_instructions() - start;
    put_text("bench 1 board=");
    put_text(board_name());
    put_text(" instructions_per_tick=");
    put_u64(board_instructions_per_tick());
    put_text(" windows=");
    put_u64(in->n_windows);
    put_text(" overhead=");
    put_u64(overhead);
    end_line();

    if (in->calibration_iterations != 0u) {
        uint64_t counted = calibration_loop(in->calibration_iterations);
        put_text("calibration iterations=");
        put_u64(in->calibration_iterations);
        put_text(" instructions=");
        put_u64(counted);
        end_line();
    }

    for (w = 0; w < in->n_windows; w++) {
        uint64_t dsp_instructions, inference_instructions = 0u;
        start = board_instructions();
        status = normalise ? dsp_features(&cfg, samples + (size_t)w * n, in->scale, work.f32, features)
                           : dsp_raw_features(&cfg, samples + (size_t)w * n, in->scale, work.f32, features);
        dsp_instructions = board_instructions() - start;
        if (status != DSP_OK) fail("dsp", status);
#ifdef BENCH_WITH_TINYRT
        if (in->flags & BENCH_INPUT_FLAG_INFERENCE) {
            if (given_inputs != NULL) {
                memcpy(trt_input(&model)->data, given_inputs + (size_t)w * trt_input(&model)->size,
                       trt_input(&model)->size);
            } else {
                quantize_input(trt_input(&model), features, model_input);
                memcpy(trt_input(&model)->data, model_input, trt_input(&model)->size);
            }
            start = board_instructions();
            status = trt_invoke(&model);
            inference_instructions = board_instructions() - start;
            if (status != TRT_OK) fail("trt_invoke", status);
        }
#endif
        put_text("window ");
        put_u64(w);
        put_text(" dsp=");
        put_u64(dsp_instructions);
        put_text(" inference=");
        put_u64(inference_instructions);
        end_line();
        put_text("features ");
        put_u64(w);
        put_char(' ');
        put_hex(features, 4u * n_features);
        end_line();
#ifdef BENCH_WITH_DSP_Q15
        if (in->q15_hann_offset != 0u) {
            start = board_instructions();
            status = dspq_raw_features_q16(&q15, samples + (size_t)w * n, work.i32, q15_features);
            dsp_instructions = board_instructions() - start;
            if (status != DSPQ_OK) fail("dspq", status);
            put_text("q15 ");
            put_u64(w);
            put_text(" dsp=");
            put_u64(dsp_instructions);
            put_char(' ');
            put_hex(q15_features, 4u * n_features);
            end_line();
        }
#endif
#ifdef BENCH_WITH_TINYRT
        if (in->flags & BENCH_INPUT_FLAG_INFERENCE) {
            put_text("input ");
            put_u64(w);
            put_char(' ');
            put_hex(given_inputs != NULL ? given_inputs + (size_t)w * trt_input(&model)->size : model_input,
                    trt_input(&model)->size);
            end_line();
            put_text("output ");
            put_u64(w);
            put_char(' ');
            put_hex(trt_output(&model)->data, trt_output(&model)->size);
            end_line();
        }
#endif
    }
    put_text("done");
    end_line();
    board_exit(0);
    return 0;
}
