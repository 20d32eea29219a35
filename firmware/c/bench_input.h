/*
 * The "bench input" block: what the measurement image (bench_main.c) reads at start, placed in
 * memory by QEMU's loader device (-device loader,file=...,addr=BENCH_INPUT_ADDR,force-raw=on) and
 * written by firmware/emulator.py (write_bench_input). Version 1, little-endian; every offset is
 * from the start of the block and aligned (4 bytes, the model 16).
 *
 * | offset | type | field |
 * |---|---|---|
 * | 0  | u32 | magic 0x49424D54 ("TMBI") |
 * | 4  | u16 | version (1) |
 * | 6  | u16 | header bytes (80) |
 * | 8  | u32 | total bytes of the block |
 * | 12 | u32 | window_samples n |
 * | 16 | u32 | n_bands |
 * | 20 | u32 | n_windows |
 * | 24 | f32 | scale (physical units per LSB) |
 * | 28 | u32 | flags: bit 0 normalise (mean/std present), bit 1 run inference (model present) |
 * | 32 | u32 | band edges offset: u16[n_bands + 1] |
 * | 36 | u32 | Hann table offset: f32[n] (flash-resident, as when generated as const) |
 * | 40 | u32 | twiddle table offset: f32[n] |
 * | 44 | u32 | mean offset: f32[n_bands + 3] (0 when not normalising) |
 * | 48 | u32 | std offset: f32[n_bands + 3] |
 * | 52 | u32 | samples offset: int16[n_windows * n] |
 * | 56 | u32 | model offset (.tflite, 16-byte aligned; 0 without inference) |
 * | 60 | u32 | model bytes |
 * | 64 | u32 | calibration loop iterations (0: none; see bench_main.c) |
 * | 68 | u32 | model input offset: int8[n_windows * model inputs], the model's input per window
 *              instead of the quantized features (0: the features; for models not fed by the DSP) |
 * | 72 | u32 | fixed-point Hann table offset (dsp_q15.h's element type, n entries; 0: no fixed-point run) |
 * | 76 | u32 | fixed-point twiddle table offset (n entries) |
 */
#ifndef BENCH_INPUT_H
#define BENCH_INPUT_H

#include <stdint.h>

#define BENCH_INPUT_MAGIC 0x49424D54u
#define BENCH_INPUT_VERSION 1u
#define BENCH_INPUT_FLAG_NORMALISE 1u
#define BENCH_INPUT_FLAG_INFERENCE 2u

typedef struct {
    uint32_t magic;
    uint16_t version;
    uint16_t header_bytes;
    uint32_t total_bytes;
    uint32_t window_samples;
    uint32_t n_bands;
    uint32_t n_windows;
    float scale;
    uint32_t flags;
    uint32_t edges_offset;
    uint32_t hann_offset;
    uint32_t twiddle_offset;
    uint32_t mean_offset;
    uint32_t std_offset;
    uint32_t samples_offset;
    uint32_t model_offset;
    uint32_t model_bytes;
    uint32_t calibration_iterations;
    uint32_t model_input_offset;
    uint32_t q15_hann_offset;
    uint32_t q15_twiddle_offset;
} bench_input_t;

#endif /* BENCH_INPUT_H */
