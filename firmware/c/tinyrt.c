/*
 * tinyrt: int8 inference over a TFLite flatbuffer read in place. See tinyrt.h.
 *
 * The flatbuffer is untrusted (it arrives over the air): every read goes through the fb_*
 * helpers below, which check each offset and length against the buffer before touching it and
 * read multi-byte values byte by byte (no alignment assumptions, little-endian as flatbuffers
 * are). The schema's nesting is fixed (model > subgraph > tensor > quantization), so nothing
 * recurses on depth the model controls.
 *
 * Arithmetic follows TFLite Micro's reference kernels exactly: reference_integer_ops::
 * FullyConnected(PerChannel), MultiplyByQuantizedMultiplier with gemmlowp's
 * SaturatingRoundingDoublingHighMul and RoundingDivideByPOT, QuantizeMultiplier (frexp, round),
 * CalculateActivationRangeQuantized.
 */
#include "tinyrt.h"

#include <math.h>
#include <string.h>
#if defined(__ARM_FEATURE_DSP)
#include <arm_acle.h> /* SXTB16 and SMLAD on cores with the DSP extension (Cortex-M4/M7/M33) */
#endif

/* TFLite schema constants (schema.fbs, version 3). */
enum {
    SCHEMA_VERSION = 3,
    OP_FULLY_CONNECTED = 9,
    OP_RESHAPE = 22,
    OPTIONS_FULLY_CONNECTED = 8,
    TYPE_INT32 = 2,
    TYPE_INT8 = 9,
    ACT_NONE = 0,
    ACT_RELU = 1,
    ACT_RELU_N1_TO_1 = 2,
    ACT_RELU6 = 3
};

/* Field indices (vtable slot = 4 + 2 * index) of the tables we read. */
enum { MODEL_VERSION = 0, MODEL_OPERATOR_CODES = 1, MODEL_SUBGRAPHS = 2, MODEL_BUFFERS = 4 };
enum { OPCODE_DEPRECATED_BUILTIN = 0, OPCODE_BUILTIN = 3 };
enum { SUBGRAPH_TENSORS = 0, SUBGRAPH_INPUTS = 1, SUBGRAPH_OUTPUTS = 2, SUBGRAPH_OPERATORS = 3 };
enum {
    TENSOR_SHAPE = 0,
    TENSOR_TYPE = 1,
    TENSOR_BUFFER = 2,
    TENSOR_QUANTIZATION = 4,
    TENSOR_IS_VARIABLE = 5,
    TENSOR_SPARSITY = 6,
    TENSOR_EXTERNAL_BUFFER = 10
};
enum { QUANT_SCALE = 2, QUANT_ZERO_POINT = 3, QUANT_DIMENSION = 6 };
enum { BUFFER_DATA = 0, BUFFER_OFFSET = 1 };
enum { OPERATOR_OPCODE = 0, OPERATOR_INPUTS = 1, OPERATOR_OUTPUTS = 2, OPERATOR_OPTIONS_TYPE = 3, OPERATOR_OPTIONS = 4 };
enum { FC_ACTIVATION = 0, FC_WEIGHTS_FORMAT = 1, FC_QUANT_SPEC = 5 };

enum { KIND_FULLY_CONNECTED = 1, KIND_RESHAPE = 2 };

#define MAX_ELEMENTS (1UL << 24)
#define ALIGN4(x) (((x) + 3U) & ~(size_t)3U)

/* ------------------------------------------------------------------------------------------ */
/* Bounds-checked flatbuffer reading                                                           */

typedef struct {
    const uint8_t *b;
    size_t n;
} fb_t;

typedef struct {
    size_t pos;      /* the table's start */
    size_t vt;       /* its vtable */
    uint16_t vt_size;
    uint16_t obj_size;
} fb_table_t;

typedef struct {
    size_t data;     /* first element */
    uint32_t count;
} fb_vec_t;

static uint16_t rd_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t rd_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static int32_t rd_i32(const uint8_t *p) { return (int32_t)rd_u32(p); }

static float rd_f32(const uint8_t *p)
{
    uint32_t bits = rd_u32(p);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Whether [pos, pos + len) lies inside the buffer. */
static int fb_has(const fb_t *f, size_t pos, size_t len) { return pos <= f->n && f->n - pos >= len; }

static int fb_table_at(const fb_t *f, size_t pos, fb_table_t *t)
{
    uint32_t soffset;
    if (!fb_has(f, pos, 4)) return TRT_ERR_FORMAT;
    soffset = rd_u32(f->b + pos); /* vtable = pos - (int32)soffset */
    if (soffset < 0x80000000UL) {
        if ((size_t)soffset > pos) return TRT_ERR_FORMAT;
        t->vt = pos - (size_t)soffset;
    } else {
        size_t back = (size_t)(0U - soffset);
        if (f->n - pos < back) return TRT_ERR_FORMAT;
        t->vt = pos + back;
    }
    if (!fb_has(f, t->vt, 4)) return TRT_ERR_FORMAT;
    t->vt_size = rd_u16(f->b + t->vt);
    t->obj_size = rd_u16(f->b + t->vt + 2);
    if (t->vt_size < 4 || (t->vt_size & 1U) || !fb_has(f, t->vt, t->vt_size)) return TRT_ERR_FORMAT;
    if (t->obj_size < 4 || !fb_has(f, pos, t->obj_size)) return TRT_ERR_FORMAT;
    t->pos = pos;
    return TRT_OK;
}

/* Position of field `index` (width bytes) in the table, 0 when absent; -1 when out of bounds. */
static long fb_field(const fb_t *f, const fb_table_t *t, unsigned index, size_t width)
{
    size_t slot = 4U + 2U * (size_t)index;
    uint16_t voffset;
    if (slot + 2U > t->vt_size) return 0;
    voffset = rd_u16(f->b + t->vt + slot);
    if (voffset == 0) return 0;
    if (voffset < 4U || (size_t)voffset + width > t->obj_size) return -1;
    return (long)(t->pos + voffset);
}

static int fb_u32(const fb_t *f, const fb_table_t *t, unsigned index, uint32_t dflt, uint32_t *out)
{
    long at = fb_field(f, t, index, 4);
    if (at < 0) return TRT_ERR_FORMAT;
    *out = at ? rd_u32(f->b + at) : dflt;
    return TRT_OK;
}

static int fb_u8(const fb_t *f, const fb_table_t *t, unsigned index, uint8_t dflt, uint8_t *out)
{
    long at = fb_field(f, t, index, 1);
    if (at < 0) return TRT_ERR_FORMAT;
    *out = at ? f->b[at] : dflt;
    return TRT_OK;
}

/* Target of an offset field (a table, vector or string); *target = 0 when the field is absent. */
static int fb_ref(const fb_t *f, const fb_table_t *t, unsigned index, size_t *target)
{
    long at = fb_field(f, t, index, 4);
    uint32_t rel;
    if (at < 0) return TRT_ERR_FORMAT;
    *target = 0;
    if (at == 0) return TRT_OK;
    rel = rd_u32(f->b + at);
    if (rel == 0 || f->n - (size_t)at < rel) return TRT_ERR_FORMAT;
    *target = (size_t)at + rel;
    return TRT_OK;
}

/* A vector field of elem-byte elements; an absent field reads as empty. */
static int fb_vector(const fb_t *f, const fb_table_t *t, unsigned index, size_t elem, fb_vec_t *v)
{
    size_t at;
    int rc = fb_ref(f, t, index, &at);
    v->count = 0;
    v->data = 0;
    if (rc != TRT_OK || at == 0) return rc;
    if (!fb_has(f, at, 4)) return TRT_ERR_FORMAT;
    v->count = rd_u32(f->b + at);
    v->data = at + 4U;
    if ((f->n - v->data) / elem < v->count) return TRT_ERR_FORMAT;
    return TRT_OK;
}

static int fb_table_field(const fb_t *f, const fb_table_t *t, unsigned index, fb_table_t *out, int *present)
{
    size_t at;
    int rc = fb_ref(f, t, index, &at);
    *present = 0;
    if (rc != TRT_OK || at == 0) return rc;
    *present = 1;
    return fb_table_at(f, at, out);
}

/* Element i of a vector of tables. */
static int fb_vec_table(const fb_t *f, const fb_vec_t *v, uint32_t i, fb_table_t *out)
{
    size_t at = v->data + 4U * (size_t)i;
    uint32_t rel;
    if (i >= v->count) return TRT_ERR_FORMAT;
    rel = rd_u32(f->b + at);
    if (rel == 0 || f->n - at < rel) return TRT_ERR_FORMAT;
    return fb_table_at(f, at + rel, out);
}

static int32_t fb_vec_i32(const fb_t *f, const fb_vec_t *v, uint32_t i) { return rd_i32(f->b + v->data + 4U * (size_t)i); }

#define TRY(expr)                      \
    do {                               \
        int rc_ = (expr);              \
        if (rc_ != TRT_OK) return rc_; \
    } while (0)

/* ------------------------------------------------------------------------------------------ */
/* gemmlowp / TFLite fixed-point arithmetic                                                    */

static int32_t saturating_rounding_doubling_high_mul(int32_t a, int32_t b)
{
    int64_t ab;
    int64_t nudge;
    if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
    ab = (int64_t)a * (int64_t)b;
    nudge = ab >= 0 ? (int64_t)(1L << 30) : (int64_t)(1L - (1L << 30));
    /* division, not a shift: gemmlowp rounds toward zero here */
    return (int32_t)((ab + nudge) / (int64_t)(1LL << 31));
}

static int32_t rounding_divide_by_pot(int32_t x, int exponent)
{
    int32_t mask = (int32_t)((1LL << exponent) - 1);
    int32_t remainder = x & mask;
    int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

static int32_t multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int shift)
{
    int left = shift > 0 ? shift : 0;
    int right = shift > 0 ? 0 : -shift;
    /* TFLite computes x * (1 << left) in int32; it wraps in practice, so wrap explicitly */
    int32_t shifted = (int32_t)((uint32_t)x << left);
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), right);
}

/* TFLite's QuantizeMultiplier; TRT_ERR_QUANT where the multiplier is not finite, negative or
 * needs a left shift the int32 arithmetic cannot hold. */
static int quantize_multiplier(double real, int32_t *multiplier, int8_t *shift)
{
    int exponent;
    double q;
    int64_t q_fixed;
    if (!(real >= 0.0) || real > 1e300) return TRT_ERR_QUANT;
    if (real == 0.0) {
        *multiplier = 0;
        *shift = 0;
        return TRT_OK;
    }
    q = frexp(real, &exponent);
    q_fixed = (int64_t)round(q * 2147483648.0);
    if (q_fixed == (int64_t)(1LL << 31)) {
        q_fixed /= 2;
        ++exponent;
    }
    if (exponent < -31) {
        exponent = 0;
        q_fixed = 0;
    }
    if (exponent > 30) return TRT_ERR_QUANT;
    *multiplier = (int32_t)q_fixed;
    *shift = (int8_t)exponent; /* in -31..30 here */
    return TRT_OK;
}

/* zero_point + round(f / scale), as CalculateActivationRangeQuantized; clamped before the
 * conversion so a tiny scale cannot overflow it (the result is clamped to int8 anyway). */
static int32_t quantize_bound(float f, float scale, int32_t zero_point)
{
    float q = roundf(f / scale);
    if (q > 1e6f) q = 1e6f;
    if (q < -1e6f) q = -1e6f;
    return zero_point + (int32_t)q;
}

/* ------------------------------------------------------------------------------------------ */
/* Model parsing                                                                               */

typedef struct {
    fb_t f;
    fb_vec_t buffers, tensors, opcodes, operators;
} parse_t;

typedef struct {
    fb_vec_t scale, zero_point;
    uint32_t dimension;
} quant_t;

static int elem_size(uint8_t type) { return type == TYPE_INT8 ? 1 : type == TYPE_INT32 ? 4 : 0; }

static int tensor_table(const parse_t *p, int32_t index, fb_table_t *t)
{
    return fb_vec_table(&p->f, &p->tensors, (uint32_t)index, t);
}

static int read_quant(const parse_t *p, int32_t index, quant_t *q)
{
    fb_table_t t, qt;
    int present;
    TRY(tensor_table(p, index, &t));
    TRY(fb_table_field(&p->f, &t, TENSOR_QUANTIZATION, &qt, &present));
    if (!present) return TRT_ERR_QUANT;
    TRY(fb_vector(&p->f, &qt, QUANT_SCALE, 4, &q->scale));
    TRY(fb_vector(&p->f, &qt, QUANT_ZERO_POINT, 8, &q->zero_point));
    TRY(fb_u32(&p->f, &qt, QUANT_DIMENSION, 0, &q->dimension));
    return TRT_OK;
}

static float quant_scale(const parse_t *p, const quant_t *q, uint32_t i) { return rd_f32(p->f.b + q->scale.data + 4U * (size_t)i); }

/* Low 32 bits of zero point i (zero points are int64 in the schema). */
static int64_t quant_zero_point(const parse_t *p, const quant_t *q, uint32_t i)
{
    const uint8_t *at = p->f.b + q->zero_point.data + 8U * (size_t)i;
    uint64_t v = (uint64_t)rd_u32(at) | ((uint64_t)rd_u32(at + 4) << 32);
    return (int64_t)v;
}

static int scale_ok(float s) { return s > 0.0f && s <= 3.4e38f; }

/* Scale and zero point of an int8 activation tensor (per-tensor). */
static int activation_quant(const parse_t *p, int32_t index, float *scale, int32_t *zero_point)
{
    quant_t q;
    int64_t zp = 0;
    TRY(read_quant(p, index, &q));
    if (q.scale.count < 1 || !scale_ok(quant_scale(p, &q, 0))) return TRT_ERR_QUANT;
    if (q.zero_point.count > 0) zp = quant_zero_point(p, &q, 0);
    if (zp < -128 || zp > 127) return TRT_ERR_QUANT;
    *scale = quant_scale(p, &q, 0);
    *zero_point = (int32_t)zp;
    return TRT_OK;
}

static int parse_tensor(trt_model_t *m, const parse_t *p, int32_t index)
{
    const fb_t *f = &p->f;
    struct trt_tensor *tt = &m->tensors[index];
    fb_table_t t, bt;
    fb_vec_t shape, data;
    uint32_t buffer, i, elements = 1;
    uint8_t is_variable;
    size_t at;
    long external;
    int esize;

    TRY(tensor_table(p, index, &t));
    TRY(fb_vector(f, &t, TENSOR_SHAPE, 4, &shape));
    TRY(fb_u8(f, &t, TENSOR_TYPE, 0, &tt->type));
    TRY(fb_u32(f, &t, TENSOR_BUFFER, 0, &buffer));
    TRY(fb_u8(f, &t, TENSOR_IS_VARIABLE, 0, &is_variable));
    TRY(fb_ref(f, &t, TENSOR_SPARSITY, &at));
    external = fb_field(f, &t, TENSOR_EXTERNAL_BUFFER, 4);
    if (external < 0 || at != 0 || is_variable) return TRT_ERR_FORMAT; /* sparse, external or variable: not ours */
    if (shape.count > TRT_MAX_DIMS) return TRT_ERR_LIMIT;
    for (i = 0; i < shape.count; ++i) {
        int32_t d = fb_vec_i32(f, &shape, i);
        if (d < 1) return TRT_ERR_SHAPE;
        if ((uint32_t)d > MAX_ELEMENTS || elements > MAX_ELEMENTS / (uint32_t)d) return TRT_ERR_LIMIT;
        elements *= (uint32_t)d;
    }
    esize = elem_size(tt->type);
    tt->bytes = elements * (uint32_t)(esize ? esize : 1);
    tt->alias_of = -1;
    tt->is_const = 0;
    tt->const_data = NULL;
    if (external > 0 && rd_u32(f->b + external) != 0) return TRT_ERR_FORMAT;
    if (buffer == 0) return TRT_OK; /* buffer 0 is the empty sentinel: not constant */
    if (buffer >= p->buffers.count) return TRT_ERR_FORMAT;
    TRY(fb_vec_table(f, &p->buffers, buffer, &bt));
    {
        long offset = fb_field(f, &bt, BUFFER_OFFSET, 8);
        if (offset < 0) return TRT_ERR_FORMAT;
        if (offset > 0 && (rd_u32(f->b + offset) | rd_u32(f->b + offset + 4)) > 1U) return TRT_ERR_FORMAT;
    }
    TRY(fb_vector(f, &bt, BUFFER_DATA, 1, &data));
    if (data.count == 0) return TRT_OK;
    if (!esize) return TRT_ERR_TYPE; /* constant data of a type no op here reads */
    if (data.count < tt->bytes) return TRT_ERR_FORMAT;
    tt->is_const = 1;
    tt->const_data = f->b + data.data;
    return TRT_OK;
}

/* The op's builtin code, max(deprecated_builtin_code, builtin_code) as TFLite reads it. */
static int op_builtin(const parse_t *p, const fb_table_t *op, int32_t *code)
{
    fb_table_t oc;
    uint32_t index, builtin;
    uint8_t deprecated;
    TRY(fb_u32(&p->f, op, OPERATOR_OPCODE, 0, &index));
    if (index >= p->opcodes.count) return TRT_ERR_FORMAT;
    TRY(fb_vec_table(&p->f, &p->opcodes, index, &oc));
    TRY(fb_u8(&p->f, &oc, OPCODE_DEPRECATED_BUILTIN, 0, &deprecated));
    TRY(fb_u32(&p->f, &oc, OPCODE_BUILTIN, 0, &builtin));
    if (builtin > 0xFFFFU) builtin = 0xFFFFU; /* an unknown code all the same */
    *code = (int32_t)builtin > (int8_t)deprecated ? (int32_t)builtin : (int32_t)(int8_t)deprecated;
    return TRT_OK;
}

/* A tensor index from an op's inputs/outputs: -1 allowed only where optional. */
static int tensor_index(const trt_model_t *m, int32_t raw, int optional, int16_t *index)
{
    if (raw == -1 && optional) {
        *index = -1;
        return TRT_OK;
    }
    if (raw < 0 || raw >= (int32_t)m->n_tensors) return TRT_ERR_FORMAT;
    *index = (int16_t)raw;
    return TRT_OK;
}

static uint32_t elements_of(const trt_model_t *m, int16_t index)
{
    const struct trt_tensor *t = &m->tensors[index];
    return t->type == TYPE_INT32 ? t->bytes / 4U : t->bytes;
}

/* Per-channel multipliers and shifts (PopulateConvolutionQuantizationParams: all in double); with
 * NULL arrays only checks that every channel has a usable multiplier. */
static int channel_multipliers(const parse_t *p, const struct trt_op *op, int32_t *multiplier, int8_t *shift)
{
    quant_t q;
    float in_scale, out_scale;
    int32_t zero_point, mult;
    int8_t sh;
    uint32_t c;
    TRY(activation_quant(p, op->in, &in_scale, &zero_point));
    TRY(activation_quant(p, op->out, &out_scale, &zero_point));
    TRY(read_quant(p, op->weights, &q));
    for (c = 0; c < op->out_channels; ++c) {
        float w_scale = quant_scale(p, &q, c);
        if (!scale_ok(w_scale)) return TRT_ERR_QUANT;
        TRY(quantize_multiplier((double)in_scale * (double)w_scale / (double)out_scale, &mult, &sh));
        if (multiplier) {
            multiplier[c] = mult;
            shift[c] = sh;
        }
    }
    return TRT_OK;
}

static int parse_fully_connected(trt_model_t *m, const parse_t *p, const fb_table_t *opt, struct trt_op *op,
                                 fb_vec_t *ins, int *per_channel)
{
    const fb_t *f = &p->f;
    fb_table_t options;
    int present = 0;
    uint8_t options_type, activation = ACT_NONE, weights_format = 0;
    const struct trt_tensor *w;
    float in_scale, out_scale;
    quant_t wq;
    uint32_t c;
    size_t quant_spec = 0;

    if (ins->count < 2 || ins->count > 3) return TRT_ERR_FORMAT;
    TRY(tensor_index(m, fb_vec_i32(f, ins, 0), 0, &op->in));
    TRY(tensor_index(m, fb_vec_i32(f, ins, 1), 0, &op->weights));
    op->bias = -1;
    if (ins->count == 3) TRY(tensor_index(m, fb_vec_i32(f, ins, 2), 1, &op->bias));

    TRY(fb_u8(f, opt, OPERATOR_OPTIONS_TYPE, 0, &options_type));
    if (options_type != 0 && options_type != OPTIONS_FULLY_CONNECTED) return TRT_ERR_FORMAT;
    if (options_type) TRY(fb_table_field(f, opt, OPERATOR_OPTIONS, &options, &present));
    if (present) {
        TRY(fb_u8(f, &options, FC_ACTIVATION, ACT_NONE, &activation));
        TRY(fb_u8(f, &options, FC_WEIGHTS_FORMAT, 0, &weights_format));
        TRY(fb_ref(f, &options, FC_QUANT_SPEC, &quant_spec));
    }
    if (activation > ACT_RELU6 || weights_format != 0 || quant_spec != 0) return TRT_ERR_UNSUPPORTED_OP;

    w = &m->tensors[op->weights];
    if (m->tensors[op->in].type != TYPE_INT8 || m->tensors[op->out].type != TYPE_INT8 || w->type != TYPE_INT8)
        return TRT_ERR_TYPE;
    if (m->tensors[op->in].is_const || !w->is_const) return TRT_ERR_FORMAT;
    {
        fb_table_t wt;
        fb_vec_t shape;
        TRY(tensor_table(p, op->weights, &wt));
        TRY(fb_vector(f, &wt, TENSOR_SHAPE, 4, &shape));
        if (shape.count != 2) return TRT_ERR_SHAPE;
        op->out_channels = (uint32_t)fb_vec_i32(f, &shape, 0);
        op->depth = (uint32_t)fb_vec_i32(f, &shape, 1);
    }
    if (op->depth > TRT_MAX_DEPTH || op->out_channels > TRT_MAX_CHANNELS) return TRT_ERR_LIMIT;
    if (elements_of(m, op->in) % op->depth != 0) return TRT_ERR_SHAPE;
    op->batches = elements_of(m, op->in) / op->depth;
    if (elements_of(m, op->out) != op->batches * op->out_channels) return TRT_ERR_SHAPE;
    if (op->bias >= 0) {
        const struct trt_tensor *b = &m->tensors[op->bias];
        if (b->type != TYPE_INT32) return TRT_ERR_TYPE;
        if (!b->is_const) return TRT_ERR_FORMAT;
        if (elements_of(m, op->bias) != op->out_channels) return TRT_ERR_SHAPE;
    }

    TRY(activation_quant(p, op->in, &in_scale, &op->input_offset));
    op->input_offset = -op->input_offset;
    TRY(activation_quant(p, op->out, &out_scale, &op->output_offset));
    TRY(read_quant(p, op->weights, &wq));
    if (wq.scale.count != 1 && wq.scale.count != op->out_channels) return TRT_ERR_QUANT;
    if (wq.zero_point.count != 0 && wq.zero_point.count != wq.scale.count) return TRT_ERR_QUANT;
    for (c = 0; c < wq.zero_point.count; ++c)
        if (quant_zero_point(p, &wq, c) != 0) return TRT_ERR_QUANT; /* int8 weights are symmetric */
    *per_channel = wq.scale.count > 1;
    if (*per_channel && wq.dimension != 0) return TRT_ERR_QUANT;
    op->multiplier = 0;
    op->shift = 0;
    if (*per_channel) {
        TRY(channel_multipliers(p, op, NULL, NULL)); /* checked now: the status must not depend on the arena */
    } else {
        float w_scale = quant_scale(p, &wq, 0);
        if (!scale_ok(w_scale)) return TRT_ERR_QUANT;
        /* all in double, as per channel: the float product (GetQuantizedConvolutionMultipler) differs
         * from TFLM in the last bits (tests/test_tinyrt.py rigs a model that tells them apart) */
        TRY(quantize_multiplier((double)in_scale * (double)w_scale / (double)out_scale, &op->multiplier, &op->shift));
    }

    op->act_min = -128;
    op->act_max = 127;
    if (activation == ACT_RELU || activation == ACT_RELU6) {
        int32_t lo = quantize_bound(0.0f, out_scale, op->output_offset);
        op->act_min = lo > -128 ? lo : -128;
    }
    if (activation == ACT_RELU6) {
        int32_t hi = quantize_bound(6.0f, out_scale, op->output_offset);
        op->act_max = hi < 127 ? hi : 127;
    }
    if (activation == ACT_RELU_N1_TO_1) {
        int32_t lo = quantize_bound(-1.0f, out_scale, op->output_offset);
        int32_t hi = quantize_bound(1.0f, out_scale, op->output_offset);
        op->act_min = lo > -128 ? lo : -128;
        op->act_max = hi < 127 ? hi : 127;
    }
    return TRT_OK;
}

static int parse_reshape(trt_model_t *m, const parse_t *p, struct trt_op *op, const fb_vec_t *ins)
{
    if (ins->count < 1 || ins->count > 2) return TRT_ERR_FORMAT; /* the optional 2nd input is the new shape */
    TRY(tensor_index(m, fb_vec_i32(&p->f, ins, 0), 0, &op->in));
    if (m->tensors[op->in].type != TYPE_INT8 || m->tensors[op->out].type != TYPE_INT8) return TRT_ERR_TYPE;
    if (m->tensors[op->in].bytes != m->tensors[op->out].bytes) return TRT_ERR_SHAPE;
    if (m->tensors[op->in].is_const) return TRT_ERR_UNSUPPORTED_OP; /* the converter folds these */
    m->tensors[op->out].alias_of = op->in;
    return TRT_OK;
}

/* Builtin codes of every op first, so an unsupported op is reported as such whatever else is wrong. */
static int check_op_codes(trt_model_t *m, const parse_t *p)
{
    uint32_t i;
    for (i = 0; i < m->n_ops; ++i) {
        fb_table_t op;
        int32_t code;
        TRY(fb_vec_table(&p->f, &p->operators, i, &op));
        TRY(op_builtin(p, &op, &code));
        if (code != OP_FULLY_CONNECTED && code != OP_RESHAPE) {
            m->failed_op = (int32_t)i;
            m->failed_builtin = code;
            return TRT_ERR_UNSUPPORTED_OP;
        }
        m->ops[i].kind = code == OP_FULLY_CONNECTED ? KIND_FULLY_CONNECTED : KIND_RESHAPE;
    }
    return TRT_OK;
}

static int parse_op(trt_model_t *m, const parse_t *p, uint32_t i, uint8_t *produced)
{
    struct trt_op *op = &m->ops[i];
    fb_table_t t;
    fb_vec_t ins, outs;
    uint32_t k;
    int rc;
    TRY(fb_vec_table(&p->f, &p->operators, i, &t));
    TRY(fb_vector(&p->f, &t, OPERATOR_INPUTS, 4, &ins));
    TRY(fb_vector(&p->f, &t, OPERATOR_OUTPUTS, 4, &outs));
    if (outs.count != 1) return TRT_ERR_FORMAT;
    TRY(tensor_index(m, fb_vec_i32(&p->f, &outs, 0), 0, &op->out));
    if (m->tensors[op->out].is_const || produced[op->out]) return TRT_ERR_FORMAT;
    op->per_channel = 0;
    if (op->kind == KIND_FULLY_CONNECTED) {
        int per_channel = 0;
        rc = parse_fully_connected(m, p, &t, op, &ins, &per_channel);
        op->per_channel = (uint8_t)per_channel;
    } else {
        rc = parse_reshape(m, p, op, &ins);
    }
    if (rc != TRT_OK) {
        m->failed_op = (int32_t)i;
        m->failed_builtin = op->kind == KIND_FULLY_CONNECTED ? OP_FULLY_CONNECTED : OP_RESHAPE;
        return rc;
    }
    for (k = 0; k < ins.count; ++k) { /* data inputs must exist before the op runs */
        int16_t in;
        if (op->kind == KIND_RESHAPE && k == 1) break;
        TRY(tensor_index(m, fb_vec_i32(&p->f, &ins, k), 1, &in));
        if (in >= 0 && !m->tensors[in].is_const && !produced[in]) return TRT_ERR_FORMAT;
    }
    produced[op->out] = 1;
    return TRT_OK;
}

static int parse_model(trt_model_t *m, parse_t *p)
{
    const fb_t *f = &p->f;
    fb_table_t root, graph;
    fb_vec_t subgraphs, inputs, outputs;
    uint32_t version, i;
    uint8_t produced[TRT_MAX_TENSORS];
    int16_t in, out;

    if (f->n < 8 || memcmp(f->b + 4, "TFL3", 4) != 0) return TRT_ERR_FORMAT;
    TRY(fb_table_at(f, rd_u32(f->b), &root));
    TRY(fb_u32(f, &root, MODEL_VERSION, 0, &version));
    if (version != SCHEMA_VERSION) return TRT_ERR_VERSION;
    TRY(fb_vector(f, &root, MODEL_OPERATOR_CODES, 4, &p->opcodes));
    TRY(fb_vector(f, &root, MODEL_SUBGRAPHS, 4, &subgraphs));
    TRY(fb_vector(f, &root, MODEL_BUFFERS, 4, &p->buffers));
    if (subgraphs.count < 1) return TRT_ERR_FORMAT;
    TRY(fb_vec_table(f, &subgraphs, 0, &graph));
    TRY(fb_vector(f, &graph, SUBGRAPH_TENSORS, 4, &p->tensors));
    TRY(fb_vector(f, &graph, SUBGRAPH_INPUTS, 4, &inputs));
    TRY(fb_vector(f, &graph, SUBGRAPH_OUTPUTS, 4, &outputs));
    TRY(fb_vector(f, &graph, SUBGRAPH_OPERATORS, 4, &p->operators));
    if (p->tensors.count > TRT_MAX_TENSORS || p->operators.count > TRT_MAX_OPS) return TRT_ERR_LIMIT;
    m->n_tensors = (uint16_t)p->tensors.count;
    m->n_ops = (uint16_t)p->operators.count;
    TRY(check_op_codes(m, p));
    for (i = 0; i < m->n_tensors; ++i) TRY(parse_tensor(m, p, (int32_t)i));

    if (inputs.count != 1 || outputs.count != 1) return TRT_ERR_IO;
    TRY(tensor_index(m, fb_vec_i32(f, &inputs, 0), 0, &in));
    TRY(tensor_index(m, fb_vec_i32(f, &outputs, 0), 0, &out));
    if (m->tensors[in].type != TYPE_INT8 || m->tensors[out].type != TYPE_INT8) return TRT_ERR_TYPE;
    if (m->tensors[in].is_const || m->tensors[out].is_const) return TRT_ERR_FORMAT;
    TRY(activation_quant(p, in, &m->input.scale, &m->input.zero_point));
    TRY(activation_quant(p, out, &m->output.scale, &m->output.zero_point));
    m->input.size = m->tensors[in].bytes;
    m->output.size = m->tensors[out].bytes;

    memset(produced, 0, sizeof produced);
    produced[in] = 1;
    for (i = 0; i < m->n_ops; ++i) TRY(parse_op(m, p, i, produced));
    if (!produced[out]) return TRT_ERR_FORMAT;
    m->in_index = in;
    m->out_index = out;
    return TRT_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Arena planning                                                                              */

/* The tensor whose buffer t uses (itself unless t is a RESHAPE output). */
static int16_t buffer_root(const trt_model_t *m, int16_t t)
{
    int hops;
    for (hops = 0; hops < TRT_MAX_TENSORS && m->tensors[t].alias_of >= 0; ++hops) t = m->tensors[t].alias_of;
    return t;
}

/* Bytes of per-op parameters (folded bias, per-channel multipliers and shifts), at the arena's start. */
static size_t params_bytes(const trt_model_t *m)
{
    size_t total = 0;
    uint32_t i;
    for (i = 0; i < m->n_ops; ++i) {
        const struct trt_op *op = &m->ops[i];
        if (op->kind != KIND_FULLY_CONNECTED) continue;
        total += (size_t)op->out_channels * 4U; /* the folded bias */
        if (op->per_channel) total += (size_t)op->out_channels * 4U + ALIGN4((size_t)op->out_channels);
    }
    return total;
}

/* Greedy by size, largest first, each at the lowest offset clear of every placed buffer whose
 * lifetime (first write .. last read, in op steps) overlaps: TFLM's GreedyMemoryPlanner idea.
 * Returns the bytes the activations need; fills tensors[].arena_offset for buffer roots. */
static size_t plan_activations(trt_model_t *m)
{
    int16_t first[TRT_MAX_TENSORS], last[TRT_MAX_TENSORS];
    uint8_t placed[TRT_MAX_TENSORS];
    int16_t t;
    uint32_t i, n_placed;
    size_t total = 0;

    for (t = 0; t < (int16_t)m->n_tensors; ++t) {
        first[t] = -1;
        last[t] = -1;
        placed[t] = 0;
    }
    first[m->in_index] = 0; /* the input is written before op 0 runs (step 1) */
    last[m->in_index] = 0;
    for (i = 0; i < m->n_ops; ++i) {
        const struct trt_op *op = &m->ops[i];
        int16_t step = (int16_t)(i + 1);
        int16_t in = buffer_root(m, op->in), out = buffer_root(m, op->out);
        if (last[in] < step) last[in] = step;
        if (first[out] < 0) first[out] = step;
        if (last[out] < step) last[out] = step;
    }
    t = buffer_root(m, m->out_index);
    last[t] = (int16_t)(m->n_ops + 1); /* read after the last op */

    for (n_placed = 0;; ++n_placed) {
        int16_t best = -1, other;
        uint32_t offset = 0;
        int moved = 1;
        for (t = 0; t < (int16_t)m->n_tensors; ++t)
            if (first[t] >= 0 && !placed[t] && (best < 0 || m->tensors[t].bytes > m->tensors[best].bytes)) best = t;
        if (best < 0) break;
        while (moved) { /* bump past every overlapping placed buffer until none overlaps */
            moved = 0;
            for (other = 0; other < (int16_t)m->n_tensors; ++other) {
                const struct trt_tensor *o = &m->tensors[other];
                if (!placed[other] || last[other] < first[best] || last[best] < first[other]) continue;
                if (offset < o->arena_offset + ALIGN4(o->bytes) && o->arena_offset < offset + ALIGN4(m->tensors[best].bytes)) {
                    offset = (uint32_t)(o->arena_offset + ALIGN4(o->bytes));
                    moved = 1;
                }
            }
        }
        m->tensors[best].arena_offset = offset;
        placed[best] = 1;
        if (total < offset + ALIGN4(m->tensors[best].bytes)) total = offset + ALIGN4(m->tensors[best].bytes);
    }
    return total;
}

/* Write the per-op parameters into the arena and point every tensor at its buffer. */
static int bind(trt_model_t *m, const parse_t *p, uint8_t *base, size_t params)
{
    int32_t *param = (int32_t *)(void *)base;
    uint32_t i, c, d;
    int16_t t;
    for (i = 0; i < m->n_ops; ++i) {
        struct trt_op *op = &m->ops[i];
        const int8_t *w;
        if (op->kind != KIND_FULLY_CONNECTED) continue;
        w = (const int8_t *)(const void *)m->tensors[op->weights].const_data;
        op->bias_offset = param;
        param += op->out_channels;
        for (c = 0; c < op->out_channels; ++c) {
            /* sum((x + off) * w) + b == sum(x * w) + (b + off * sum(w)): integer sums, exact */
            int32_t row_sum = 0;
            uint32_t folded = 0;
            for (d = 0; d < op->depth; ++d) row_sum += w[(size_t)c * op->depth + d];
            if (op->bias >= 0) folded = rd_u32(m->tensors[op->bias].const_data + 4U * (size_t)c);
            folded += (uint32_t)op->input_offset * (uint32_t)row_sum;
            op->bias_offset[c] = (int32_t)folded;
        }
        op->per_channel_multiplier = NULL;
        op->per_channel_shift = NULL;
        if (op->per_channel) {
            op->per_channel_multiplier = param;
            param += op->out_channels;
            op->per_channel_shift = (int8_t *)(void *)param;
            param += ALIGN4((size_t)op->out_channels) / 4U;
            TRY(channel_multipliers(p, op, op->per_channel_multiplier, op->per_channel_shift));
        }
    }
    for (t = 0; t < (int16_t)m->n_tensors; ++t) {
        struct trt_tensor *tt = &m->tensors[t];
        tt->data = tt->is_const ? NULL : (int8_t *)(void *)(base + params + m->tensors[buffer_root(m, t)].arena_offset);
    }
    m->input.data = m->tensors[m->in_index].data;
    m->output.data = m->tensors[m->out_index].data;
    return TRT_OK;
}

int trt_init(trt_model_t *m, const uint8_t *model, size_t model_len, uint8_t *arena, size_t arena_len)
{
    parse_t p;
    size_t params, pad = 0;
    int rc;
    if (!m) return TRT_ERR_NULL;
    memset(m, 0, sizeof *m);
    m->failed_op = -1;
    m->failed_builtin = -1;
    if (!model || (!arena && arena_len)) return TRT_ERR_NULL;
    if (model_len > 0x7FFFFFFFUL) return TRT_ERR_LIMIT; /* field positions are kept in a long */
    memset(&p, 0, sizeof p);
    p.f.b = model;
    p.f.n = model_len;
    rc = parse_model(m, &p);
    if (rc != TRT_OK) return rc;

    params = params_bytes(m);
    if (arena) pad = (size_t)((4U - ((uintptr_t)arena & 3U)) & 3U);
    m->arena_required = pad + params + plan_activations(m);
    if (arena_len < m->arena_required) return TRT_ERR_ARENA;
    m->model = model;
    m->model_len = model_len;
    m->arena = arena;
    m->arena_len = arena_len;
    TRY(bind(m, &p, arena + pad, params));
    m->initialised = 1;
    return TRT_OK;
}

size_t trt_arena_required(const trt_model_t *m) { return m ? m->arena_required : 0; }

const trt_io_t *trt_input(const trt_model_t *m) { return m && m->initialised ? &m->input : NULL; }

const trt_io_t *trt_output(const trt_model_t *m) { return m && m->initialised ? &m->output : NULL; }

int32_t trt_failed_op(const trt_model_t *m, int32_t *builtin_code)
{
    if (builtin_code) *builtin_code = m ? m->failed_builtin : -1;
    return m ? m->failed_op : -1;
}

size_t trt_model_size(void) { return sizeof(trt_model_t); }

/* ------------------------------------------------------------------------------------------ */
/* Kernels                                                                                     */

#if defined(__ARM_FEATURE_DSP)
static int32_t ror8(int32_t v) { return (int32_t)(((uint32_t)v >> 8) | ((uint32_t)v << 24)); }

/* Four products per two SMLADs: SXTB16 sign-extends bytes 0 and 2 (then, rotated, 1 and 3) into
 * halfword pairs. Rows need no alignment: these cores load unaligned words. */
static int32_t dot_s8(const int8_t *x, const int8_t *w, uint32_t n)
{
    int32_t acc = 0;
    const int8_t *end = x + (n & ~3U);
    while (x != end) {
        int32_t xv, wv;
        memcpy(&xv, x, 4);
        memcpy(&wv, w, 4);
        acc = __smlad(__sxtb16(xv), __sxtb16(wv), acc);
        acc = __smlad(__sxtb16(ror8(xv)), __sxtb16(ror8(wv)), acc);
        x += 4;
        w += 4;
    }
    for (n &= 3U; n; --n) acc += *x++ * *w++;
    return acc;
}
#else
static int32_t dot_s8(const int8_t *x, const int8_t *w, uint32_t n)
{
    int32_t acc = 0;
    uint32_t d = 0;
    for (; d + 4U <= n; d += 4U) acc += x[d] * w[d] + x[d + 1] * w[d + 1] + x[d + 2] * w[d + 2] + x[d + 3] * w[d + 3];
    for (; d < n; ++d) acc += x[d] * w[d];
    return acc;
}
#endif

static void fully_connected(const trt_model_t *m, const struct trt_op *op)
{
    /* everything the loop reads, in locals: the int8 output stores may alias any memory, so fields
     * read through op would be reloaded after every store */
    const int8_t *x = m->tensors[op->in].data;
    const int8_t *weights = (const int8_t *)(const void *)m->tensors[op->weights].const_data;
    int8_t *y = m->tensors[op->out].data;
    const int32_t *bias = op->bias_offset;
    const int32_t *multiplier = op->per_channel ? op->per_channel_multiplier : &op->multiplier;
    const int8_t *shift = op->per_channel ? op->per_channel_shift : &op->shift;
    const uint32_t step = op->per_channel ? 1U : 0U; /* per-tensor: the one multiplier for every channel */
    const uint32_t depth = op->depth, out_channels = op->out_channels, batches = op->batches;
    const int32_t act_min = op->act_min, act_max = op->act_max, output_offset = op->output_offset;
    uint32_t b, c;
    for (b = 0; b < batches; ++b, x += depth, y += out_channels) {
        const int8_t *w = weights;
        for (c = 0; c < out_channels; ++c, w += depth) {
            /* |dot| <= depth * 2^14 < 2^31 (TRT_MAX_DEPTH); the folded bias adds modulo 2^32 as int32 does */
            int32_t acc = (int32_t)((uint32_t)dot_s8(x, w, depth) + (uint32_t)bias[c]);
            acc = multiply_by_quantized_multiplier(acc, multiplier[c * step], shift[c * step]);
            acc = (int32_t)((uint32_t)acc + (uint32_t)output_offset);
            if (acc < act_min) acc = act_min;
            if (acc > act_max) acc = act_max;
            y[c] = (int8_t)acc;
        }
    }
}

int trt_invoke(trt_model_t *m)
{
    uint32_t i;
    if (!m) return TRT_ERR_NULL;
    if (!m->initialised) return TRT_ERR_STATE;
    for (i = 0; i < m->n_ops; ++i)
        if (m->ops[i].kind == KIND_FULLY_CONNECTED) fully_connected(m, &m->ops[i]);
    return TRT_OK; /* RESHAPE outputs alias their inputs: nothing to run */
}

const char *trt_status_name(int code)
{
    switch (code) {
    case TRT_OK: return "OK";
    case TRT_ERR_NULL: return "ERR_NULL";
    case TRT_ERR_FORMAT: return "ERR_FORMAT";
    case TRT_ERR_VERSION: return "ERR_VERSION";
    case TRT_ERR_UNSUPPORTED_OP: return "ERR_UNSUPPORTED_OP";
    case TRT_ERR_TYPE: return "ERR_TYPE";
    case TRT_ERR_SHAPE: return "ERR_SHAPE";
    case TRT_ERR_QUANT: return "ERR_QUANT";
    case TRT_ERR_ARENA: return "ERR_ARENA";
    case TRT_ERR_LIMIT: return "ERR_LIMIT";
    case TRT_ERR_IO: return "ERR_IO";
    case TRT_ERR_STATE: return "ERR_STATE";
    default: return "ERR_UNKNOWN";
    }
}
