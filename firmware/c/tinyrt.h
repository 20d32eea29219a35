/*
 * tinyrt: the device's int8 inference runtime. Reads a TFLite flatbuffer (.tflite) in place
 * (flash or RAM, any alignment: every field is read byte by byte), bounds-checks every offset,
 * allocates nothing: tensors that are not constant live in the caller's arena. Runs the ops the
 * project's models use, bit-exact with the TFLite Micro reference kernels (TFLite's quantization
 * spec; gemmlowp rounding): FULLY_CONNECTED (int8 input/weights, int32 bias or none, per-tensor or
 * per-channel weight scales, fused NONE/RELU/RELU6/RELU_N1_TO_1), plus RESHAPE. Any other op:
 * TRT_ERR_UNSUPPORTED_OP.
 * C99, no malloc, no stdio; only <stdint.h>, <stddef.h>, <string.h> and <math.h> (frexp/round at
 * load time only), plus <arm_acle.h> (SXTB16/SMLAD) on cores with the DSP extension.
 */
#ifndef TINYRT_H
#define TINYRT_H

#include <stddef.h>
#include <stdint.h>

#define TRT_MAX_TENSORS 64
#define TRT_MAX_OPS 32
#define TRT_MAX_DIMS 4
#define TRT_MAX_CHANNELS 1024 /* output channels of one FULLY_CONNECTED (per-op parameters live in the arena) */
#define TRT_MAX_DEPTH 65536   /* inputs summed per output: keeps the int32 dot product free of overflow */

typedef enum {
    TRT_OK = 0,
    TRT_ERR_NULL = -1,           /* a required pointer is NULL */
    TRT_ERR_FORMAT = -2,         /* not a TFLite flatbuffer, or an offset/length out of bounds */
    TRT_ERR_VERSION = -3,        /* schema version other than 3 */
    TRT_ERR_UNSUPPORTED_OP = -4, /* an operator (builtin code or custom) the runtime does not have */
    TRT_ERR_TYPE = -5,           /* a tensor type other than int8 activations/weights and int32 bias */
    TRT_ERR_SHAPE = -6,          /* shapes of an op's tensors do not agree */
    TRT_ERR_QUANT = -7,          /* missing or invalid quantization parameters */
    TRT_ERR_ARENA = -8,          /* the arena is smaller than trt_arena_required() */
    TRT_ERR_LIMIT = -9,          /* more tensors, ops, dims or channels than the TRT_MAX_* limits */
    TRT_ERR_IO = -10,            /* not exactly one input and one output tensor */
    TRT_ERR_STATE = -11          /* trt_invoke before a successful trt_init */
} trt_status_t;

typedef struct {
    int8_t *data;          /* in the arena */
    uint32_t size;         /* elements */
    float scale;
    int32_t zero_point;
} trt_io_t;

/* Opaque enough to be statically allocated; its fields are internal. */
typedef struct {
    const uint8_t *model;
    size_t model_len;
    uint8_t *arena;
    size_t arena_len;
    size_t arena_required;
    uint16_t n_ops;
    uint16_t n_tensors;
    int initialised;
    int32_t failed_op;      /* operator index that made trt_init fail, -1 when none */
    int32_t failed_builtin; /* its builtin code (32: CUSTOM), -1 when none */
    int16_t in_index, out_index; /* the graph's input and output tensors */
    trt_io_t input;
    trt_io_t output;
    struct trt_op {
        uint16_t kind;                  /* KIND_* in tinyrt.c */
        uint8_t per_channel;            /* weights carry one scale per output channel */
        int16_t in, weights, bias, out; /* tensor indices, -1 when absent */
        int32_t act_min, act_max;
        int32_t input_offset, output_offset;
        uint32_t out_channels, depth, batches;
        int32_t multiplier;             /* per-tensor */
        int8_t shift;                   /* > 0: left shift, < 0: right shift (TFLite's convention) */
        int32_t *bias_offset;           /* in the arena: bias + input_offset * sum(weights row), per channel */
        int32_t *per_channel_multiplier; /* in the arena, NULL when per-tensor */
        int8_t *per_channel_shift;      /* in the arena (one byte each: shifts lie in -31..30) */
    } ops[TRT_MAX_OPS];
    struct trt_tensor {
        const uint8_t *const_data; /* in the model, NULL when in the arena */
        int8_t *data;              /* in the arena (or aliasing const_data) */
        uint32_t bytes;
        uint32_t arena_offset;     /* planned offset of an arena tensor */
        int16_t alias_of;          /* RESHAPE output: the tensor whose buffer it shares, -1 when none */
        uint8_t type;
        uint8_t is_const;
    } tensors[TRT_MAX_TENSORS];
} trt_model_t;

/* Parse and check the model, plan the arena (every non-constant tensor, and per-op
 * parameters) and bind it. On TRT_ERR_ARENA, trt_arena_required(m) tells the size needed;
 * arena may be NULL with arena_len 0 to ask for that size. */
int trt_init(trt_model_t *m, const uint8_t *model, size_t model_len, uint8_t *arena, size_t arena_len);

/* Bytes of arena the model needs (valid after trt_init returned TRT_OK or TRT_ERR_ARENA). */
size_t trt_arena_required(const trt_model_t *m);

/* The input and output tensors (valid after a successful trt_init). */
const trt_io_t *trt_input(const trt_model_t *m);
const trt_io_t *trt_output(const trt_model_t *m);

/* Run the graph on the input tensor's data; the result is in the output tensor. */
int trt_invoke(trt_model_t *m);

/* "OK", "ERR_FORMAT", ... */
const char *trt_status_name(int code);

/* Operator index and builtin code that made the last trt_init fail (-1, -1 when no operator did). */
int32_t trt_failed_op(const trt_model_t *m, int32_t *builtin_code);

/* sizeof(trt_model_t), for bindings that allocate it (ctypes). */
size_t trt_model_size(void);

#endif /* TINYRT_H */
