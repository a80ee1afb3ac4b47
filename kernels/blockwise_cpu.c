/* Blockwise 8-bit kernels for the CPU (quantize, dequantize, the 8-bit Adam and SGD-momentum steps),
 * loaded by blockwise_cpu.py.
 *
 * Each function is the loop form of its PyTorch reference (quantize.py, adamw8bit_step.py) and gives
 * the same bits: every operation is the reference's, in the same order and in fp32 (no fused
 * multiply-add: compiled with -ffp-contract=off and without -ffast-math), with the fp32 scalars torch
 * uses for a Python float. Only the square root is left to torch (see adam8bit_moments). A call works
 * on the blocks [b0, b1) of a flat tensor of n elements: the caller splits the blocks between threads.
 *
 * Nearest code (torch.bucketize over the 255 midpoints, a tie going to the lower code) without a
 * search: code(s) = #{k : mid[k] < s}. The floats sharing the top 16 bits of s (sign, exponent, 7
 * mantissa bits: its key) form an interval; the caller has checked that none holds more than one
 * midpoint, and lut[key] packs base = #{k : mid[k] < the interval's smallest float} (bits 0-7), the
 * low 16 bits of the midpoint inside the interval (bits 8-23) and whether there is one (bit 24).
 * Within one key the float order is the order of the low 16 bits (reversed for negative floats), so
 *     code(s) = base + (a midpoint in the interval and it is < s)
 * with one table load per element. The keys of NaN hold bucketize(NaN) and no midpoint, as torch.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_BLOCK 4096
/* Inner loops are functions of their own: their restrict parameters tell the vectorizer that the
 * table gathers and the stores do not overlap (GCC 12 loses that once they are inlined). */
#define NOINLINE __attribute__((noinline))

typedef struct {
    const float *code;    /* 256 map values, sorted */
    const int32_t *lut;   /* 65536 entries: base | midpoint's low 16 bits << 8 | has a midpoint << 24 */
    int32_t keep_sign;    /* momentum (signed map): x < 0 never takes a code of value >= 0 */
    int32_t first_nonneg; /* index of the first code value >= 0 */
} qmap;

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* All ones where x is finite, else 0. Selecting by masking the bits (0 bits: +0.0, the reference's
 * where(ok, ..., 0.0)) keeps the loops vectorized: `finite ? a : b` would become masked loads, which
 * the table gathers cannot be. */
static inline uint32_t finite_mask(float x) { return (bits_of(x) & 0x7F800000u) != 0x7F800000u ? ~0u : 0u; }

/* Element types of p and g, converted as torch converts them. bf16: round to nearest even, NaN -> 0x7FC0. */
static inline float load_f32(float x) { return x; }
static inline float store_f32(float x) { return x; }
static inline float load_bf16(uint16_t x) { return float_of((uint32_t)x << 16); }
static inline uint16_t store_bf16(float f) {
    uint32_t u = bits_of(f);
    return f != f ? (uint16_t)0x7FC0 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
/* fp16: c10's fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value (round to nearest even), in portable
 * C (_Float16 is missing from older compilers). */
static inline float load_f16(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
    return float_of(sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized)));
}
static inline uint16_t store_f16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u, bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    uint32_t rounded = bits_of(float_of((bias >> 1) + 0x07800000u) + base);
    uint32_t nonsign = ((rounded >> 13) & 0x00007C00u) + (rounded & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* max |x| over len fp32 values as bits, NaN winning as in torch.amax: for non-negative floats (and
 * NaN, above +inf) the integer order is the float order. */
static inline uint32_t abs_bits(float x) { return bits_of(x) & 0x7FFFFFFFu; }

/* One block of len fp32 values x, whose max |x| has the bits top -> codes and absmax:
 * quantize_blockwise_ref, and with q->keep_sign the sign rule of adamw8bit_step._requantize_. */
static inline void quantize_block(const float *restrict x, int64_t len, uint32_t top, const qmap *q,
                                  uint8_t *restrict codes, float *restrict absmax) {
    const float amax = float_of(top), inv = amax > 0.0f ? 1.0f / amax : 0.0f;
    const int32_t *restrict lut = q->lut;
    const uint32_t fix = q->keep_sign ? (uint32_t)q->first_nonneg : 256u; /* c < 256: never fixed */
    for (int64_t i = 0; i < len; i++) {
        float s = x[i] * inv;
        s = s < -1.0f ? -1.0f : s;
        s = s > 1.0f ? 1.0f : s;
        uint32_t u = bits_of(s), e = (uint32_t)lut[u >> 16], low = u & 0xFFFFu, mid = (e >> 8) & 0xFFFFu;
        uint32_t neg = u >> 31, below = ((mid < low) & (neg ^ 1u)) | ((mid > low) & neg); /* midpoint < s */
        uint32_t c = (e & 0xFFu) + ((e >> 24) & below);
        c -= (x[i] < 0.0f) & (c >= fix);
        codes[i] = (uint8_t)c;
    }
    *absmax = amax;
}

static inline uint32_t block_top(const float *restrict x, int64_t len) {
    uint32_t top = 0;
    for (int64_t i = 0; i < len; i++)
        top = abs_bits(x[i]) > top ? abs_bits(x[i]) : top;
    return top;
}

void quantize_f32(const float *x, int64_t n, int64_t b0, int64_t b1, int32_t B, const qmap *q,
                  uint8_t *codes, float *absmax) {
    for (int64_t b = b0; b < b1; b++) {
        int64_t start = b * B, len = n - start < B ? n - start : B;
        quantize_block(x + start, len, block_top(x + start, len), q, codes + start, absmax + b);
    }
}

void dequantize_f32(const uint8_t *restrict codes, const float *restrict absmax, int64_t n, int64_t b0,
                    int64_t b1, int32_t B, const float *restrict code, float *restrict out) {
    for (int64_t b = b0; b < b1; b++) {
        int64_t start = b * B, len = n - start < B ? n - start : B;
        float a = absmax[b];
        for (int64_t i = 0; i < len; i++)
            out[start + i] = code[codes[start + i]] * a;
    }
}

/* 8-bit Adam, in two calls around torch's square root: torch's CPU sqrt of a contiguous fp32 tensor
 * is MKL's, within 1 ulp but not always correctly rounded, so sqrtf here would change some bits of p.
 * k: beta1, beta2, 1-beta1, 1-beta2, step_size, eps_hat, decay (AdamScalars).
 *
 * adam8bit_moments: blocks [b0, b1): dequantize, update m and v (both 0 where g is not finite),
 * requantize them, and write their fp32 values to m_out, v_out (element b0 * B at index 0).
 * adam8bit_param: n elements: p from m and sqrt(v), rounded to p's type after the update and again
 * after the decay, as the reference; left as it is where g is not finite. */
#define ADAM8BIT(SFX, T)                                                                                  \
static NOINLINE void adam_moments_block_##SFX(                                                            \
        const T *restrict g, const uint8_t *restrict c1, const uint8_t *restrict c2,                      \
        const float *restrict map1, const float *restrict map2, float A1, float A2, float beta1,          \
        float beta2, float omb1, float omb2, float *restrict m, float *restrict v, int64_t len,           \
        uint32_t *restrict tops) {                                                                        \
    uint32_t top1 = 0, top2 = 0;                                                                          \
    for (int64_t i = 0; i < len; i++) {                                                                   \
        float gi = load_##SFX(g[i]);                                                                      \
        uint32_t keep = finite_mask(gi);                                                                  \
        float gz = float_of(bits_of(gi) & keep);                                                          \
        float mi = float_of(bits_of(map1[c1[i]] * A1 * beta1 + gz * omb1) & keep);                        \
        float vi = float_of(bits_of(map2[c2[i]] * A2 * beta2 + gz * omb2 * gz) & keep);                   \
        m[i] = mi;                                                                                        \
        v[i] = vi;                                                                                        \
        top1 = abs_bits(mi) > top1 ? abs_bits(mi) : top1;                                                 \
        top2 = abs_bits(vi) > top2 ? abs_bits(vi) : top2;                                                 \
    }                                                                                                     \
    tops[0] = top1;                                                                                       \
    tops[1] = top2;                                                                                       \
}                                                                                                         \
void adam8bit_moments_##SFX(const T *g, uint8_t *c1, float *a1, uint8_t *c2, float *a2, int64_t n,         \
                            int64_t b0, int64_t b1, int32_t B, const float *k, const qmap *q1,             \
                            const qmap *q2, float *m_out, float *v_out) {                                  \
    uint32_t tops[2];                                                                                     \
    for (int64_t b = b0; b < b1; b++) {                                                                   \
        int64_t start = b * B, len = n - start < B ? n - start : B;                                       \
        float *m = m_out + (start - b0 * B), *v = v_out + (start - b0 * B);                               \
        adam_moments_block_##SFX(g + start, c1 + start, c2 + start, q1->code, q2->code, a1[b], a2[b],     \
                                 k[0], k[1], k[2], k[3], m, v, len, tops);                                \
        quantize_block(m, len, tops[0], q1, c1 + start, a1 + b);                                          \
        quantize_block(v, len, tops[1], q2, c2 + start, a2 + b);                                          \
    }                                                                                                     \
}                                                                                                         \
static NOINLINE void adam_param_##SFX(T *restrict p, const T *restrict g, const float *restrict m,        \
                                      const float *restrict sqrt_v, int64_t n, float step, float eps,     \
                                      float decay) {                                                      \
    for (int64_t i = 0; i < n; i++) {                                                                     \
        T pi = p[i];                                                                                      \
        float upd = load_##SFX(store_##SFX(load_##SFX(pi) + step * (m[i] / (sqrt_v[i] + eps))));          \
        T out = store_##SFX(upd * decay);                                                                 \
        p[i] = finite_mask(load_##SFX(g[i])) ? out : pi;                                                  \
    }                                                                                                     \
}                                                                                                         \
void adam8bit_param_##SFX(T *p, const T *g, const float *m, const float *sqrt_v, int64_t n, const float *k) { \
    adam_param_##SFX(p, g, m, sqrt_v, n, k[4], k[5], k[6]);                                               \
}

/* 8-bit SGD with momentum, blocks [b0, b1): lr, beta1, wd as fp32; first: the first step (m = g). */
#define MOMENTUM8BIT(SFX, T)                                                                              \
static NOINLINE uint32_t momentum_block_##SFX(T *restrict p, const T *restrict g,                        \
                                              const uint8_t *restrict c1, const float *restrict map1,      \
                                              float A1, float lr, float beta1, float wd, uint32_t first,   \
                                              float *restrict m, int64_t len) {                            \
    uint32_t top = 0;                                                                                     \
    for (int64_t i = 0; i < len; i++) {                                                                   \
        float pi = load_##SFX(p[i]);                                                                      \
        float gi = load_##SFX(g[i]) + pi * wd;                                                            \
        float mi = float_of((bits_of(map1[c1[i]] * A1 * beta1 + gi) & ~first) | (bits_of(gi) & first));   \
        p[i] = store_##SFX(pi - lr * mi);                                                                 \
        m[i] = mi;                                                                                        \
        top = abs_bits(mi) > top ? abs_bits(mi) : top;                                                    \
    }                                                                                                     \
    return top;                                                                                           \
}                                                                                                         \
void momentum8bit_##SFX(T *p, const T *g, uint8_t *c1, float *a1, int64_t n, int64_t b0, int64_t b1,       \
                        int32_t B, float lr, float beta1, float wd, int32_t first, const qmap *q1) {       \
    float m[MAX_BLOCK];                                                                                   \
    for (int64_t b = b0; b < b1; b++) {                                                                   \
        int64_t start = b * B, len = n - start < B ? n - start : B;                                       \
        uint32_t top = momentum_block_##SFX(p + start, g + start, c1 + start, q1->code, a1[b], lr, beta1, \
                                            wd, first ? ~0u : 0u, m, len);                                \
        quantize_block(m, len, top, q1, c1 + start, a1 + b);                                              \
    }                                                                                                     \
}

ADAM8BIT(f32, float)
ADAM8BIT(bf16, uint16_t)
ADAM8BIT(f16, uint16_t)
MOMENTUM8BIT(f32, float)
MOMENTUM8BIT(bf16, uint16_t)
MOMENTUM8BIT(f16, uint16_t)
