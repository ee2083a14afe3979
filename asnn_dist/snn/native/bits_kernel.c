/* Spike tensors (every value exactly 0 or 1) as 1 bit per value, for models.lean.
 *
 * Why: layers that read spikes save them for backward; 1 byte per value is already 4x
 * smaller than float32, 1 bit is 32x. Packing also checks the values: a tensor holding
 * anything but 0 and 1 (a residual sum of spikes, say) is reported, and the caller keeps it
 * as uint8 instead. Bit b of byte j is value 8 j + b (memory order of the input).
 * Element types (dtype code): float32 (0), float64 (1), bfloat16 (2).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"

typedef struct BitsJob {
    int64_t lo, hi; /* bytes [lo, hi) */
    int64_t n;      /* values */
    const void *x;
    uint8_t *bits;
    void *y;
    int bad;
    void (*fn)(struct BitsJob *);
} BitsJob;

/* STORE: element type; CALC: the type its values are compared in; LD / ST: bf16.h. */
#define DEFINE_BITS(STORE, CALC, SUFFIX, LD, ST)                                                                     \
    static void pack_##SUFFIX(BitsJob *j) {                                                          \
        const STORE *restrict x = (const STORE *)j->x;                                                   \
        uint8_t *restrict out = j->bits;                                                               \
        int bad = 0;                                                                                   \
        int64_t full = j->n / 8 < j->hi ? j->n / 8 : j->hi;                                            \
        for (int64_t b = j->lo; b < full; ++b) {                                                       \
            const STORE *v = x + 8 * b;                                                                 \
            uint8_t byte = 0;                                                                          \
            for (int k = 0; k < 8; ++k) {                                                              \
                bad |= (LD(v[k]) != (CALC)0) & (LD(v[k]) != (CALC)1);                                          \
                byte |= (uint8_t)((LD(v[k]) != (CALC)0) << k);                                             \
            }                                                                                          \
            out[b] = byte;                                                                             \
        }                                                                                              \
        if (full < j->hi) { /* the last, partial byte */                                               \
            uint8_t byte = 0;                                                                          \
            for (int64_t i = 8 * full; i < j->n; ++i) {                                                \
                bad |= (LD(x[i]) != (CALC)0) & (LD(x[i]) != (CALC)1);                                          \
                byte |= (uint8_t)((LD(x[i]) != (CALC)0) << (i - 8 * full));                                \
            }                                                                                          \
            out[full] = byte;                                                                          \
        }                                                                                              \
        j->bad = bad;                                                                                  \
    }                                                                                                  \
                                                                                                       \
    static void unpack_##SUFFIX(BitsJob *j) {                                                        \
        const uint8_t *restrict in = j->bits;                                                          \
        STORE *restrict y = (STORE *)j->y;                                                               \
        int64_t full = j->n / 8 < j->hi ? j->n / 8 : j->hi;                                            \
        for (int64_t b = j->lo; b < full; ++b)                                                         \
            for (int k = 0; k < 8; ++k) y[8 * b + k] = ST((CALC)((in[b] >> k) & 1));                       \
        if (full < j->hi)                                                                              \
            for (int64_t i = 8 * full; i < j->n; ++i) y[i] = ST((CALC)((in[full] >> (i - 8 * full)) & 1));  \
    }

DEFINE_BITS(float, float, f32, ID_LD, ID_ST)
DEFINE_BITS(double, double, f64, ID_LD, ID_ST)
DEFINE_BITS(bf16_t, float, bf16, bf16_ld, bf16_st)

#define PICK(dtype, name) ((dtype) == 2 ? name##_bf16 : (dtype) == 1 ? name##_f64 : name##_f32)

static void bits_run(void *arg) {
    BitsJob *j = (BitsJob *)arg;
    j->fn(j);
}

static int bits_parallel(BitsJob base, void (*fn)(BitsJob *), int threads) {
    int64_t bytes = (base.n + 7) / 8;
    if (threads < 1) threads = 1;
    if (bytes < (1 << 16)) threads = 1; /* small tensors: not worth a parallel region */
    BitsJob *jobs = calloc((size_t)threads, sizeof(BitsJob));
    if (!jobs) return -1;
    int64_t per = (bytes + threads - 1) / threads;
    for (int k = 0; k < threads; ++k) {
        jobs[k] = base;
        jobs[k].fn = fn;
        jobs[k].lo = k * per < bytes ? k * per : bytes;
        jobs[k].hi = (k + 1) * per < bytes ? (k + 1) * per : bytes;
    }
    run_jobs(threads, sizeof(BitsJob), (char *)jobs, bits_run);
    int bad = 0;
    for (int k = 0; k < threads; ++k) bad |= jobs[k].bad;
    free(jobs);
    return bad;
}

/* Returns 0 when every value was 0 or 1 (bits then hold them), 1 otherwise, -1 on no memory. */
int asnn_pack_bits(int dtype, int64_t n, const void *x, uint8_t *bits, int threads) {
    BitsJob j;
    memset(&j, 0, sizeof j);
    j.n = n; j.x = x; j.bits = bits;
    return bits_parallel(j, PICK(dtype, pack), threads);
}

int asnn_unpack_bits(int dtype, int64_t n, const uint8_t *bits, void *y, int threads) {
    BitsJob j;
    memset(&j, 0, sizeof j);
    j.n = n; j.bits = (uint8_t *)bits; j.y = y;
    return bits_parallel(j, PICK(dtype, unpack), threads) < 0;
}
