/* BatchNorm with statistics per time step on channels-last data x [T, M, C] (M = batch x
 * space or tokens): statistics, affine apply and backward, for models.step_norm.
 *
 * Why C: the torch path normalises step by step (one batch_norm call per step, then a stack
 * copy); here each pass reads x once for all steps, with per-channel accumulators in double
 * (vectorised over the contiguous channels) and rows split over threads (parallel.h). Sums
 * are combined in range order, so results are deterministic for a given thread count.
 *
 *   mean[t,c] = sum_m x / M;  var[t,c] = sum_m x^2 / M - mean^2   (biased; accumulated in double)
 *   y = x * scale[t,c] + shift[t,c]      (scale = w invstd, shift = b - mean scale: the affine
 *                                          folding of torch's CPU batch_norm)
 *   backward: sum_gy[t,c] = sum_m gy;  dotp[t,c] = sum_m gy (x - mean)
 *             gx = (gy - sum_gy / M - (x - mean) dotp invstd^2 / M) scale
 * Element types (dtype code): float32 (0), float64 (1), bfloat16 (2). bf16 tensors are read
 * into float / double, scale and shift are float32, and every output is rounded once (bf16.h).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"

typedef struct BnJob {
    int64_t T, M, C, lo, hi; /* rows [lo, hi) of every step */
    const void *x, *gy, *scale, *shift;
    const double *mean, *invstd;
    void *y, *gx;
    double *acc; /* per thread: [2 T C] */
    void (*fn)(struct BnJob *);
} BnJob;

/* STORE: the element type of x, y, gy, gx; AFF: of scale and shift (and the arithmetic of
 * apply); LD / ST / STD: load an element, store a value of AFF / of double (bf16.h). */
#define DEFINE_BN(STORE, AFF, SUFFIX, LD, ST, STD)                                                    \
    static void stats_##SUFFIX(BnJob *j) {                                                           \
        const STORE *x = (const STORE *)j->x;                                                          \
        const int64_t C = j->C;                                                                        \
        for (int64_t t = 0; t < j->T; ++t) {                                                           \
            double *restrict s1 = j->acc + 2 * t * C, *restrict s2 = s1 + C;                           \
            for (int64_t m = j->lo; m < j->hi; ++m) {                                                  \
                const STORE *restrict row = x + (t * j->M + m) * C;                                    \
                for (int64_t c = 0; c < C; ++c) {                                                      \
                    double v = (double)LD(row[c]);                                                     \
                    s1[c] += v;                                                                        \
                    s2[c] += v * v;                                                                    \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    static void apply_##SUFFIX(BnJob *j) {                                                           \
        const STORE *x = (const STORE *)j->x;                                                          \
        const AFF *sc = (const AFF *)j->scale, *sh = (const AFF *)j->shift;                            \
        STORE *y = (STORE *)j->y;                                                                      \
        const int64_t C = j->C;                                                                        \
        for (int64_t t = 0; t < j->T; ++t) {                                                           \
            const AFF *restrict a = sc + t * C, *restrict b = sh + t * C;                              \
            for (int64_t m = j->lo; m < j->hi; ++m) {                                                  \
                const STORE *restrict row = x + (t * j->M + m) * C;                                    \
                STORE *restrict out = y + (t * j->M + m) * C;                                          \
                for (int64_t c = 0; c < C; ++c) out[c] = ST(LD(row[c]) * a[c] + b[c]);                 \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    static void grad_sums_##SUFFIX(BnJob *j) {                                                       \
        const STORE *x = (const STORE *)j->x, *gy = (const STORE *)j->gy;                              \
        const int64_t C = j->C;                                                                        \
        for (int64_t t = 0; t < j->T; ++t) {                                                           \
            double *restrict s1 = j->acc + 2 * t * C, *restrict s2 = s1 + C;                           \
            const double *restrict mu = j->mean + t * C;                                               \
            for (int64_t m = j->lo; m < j->hi; ++m) {                                                  \
                const STORE *restrict row = x + (t * j->M + m) * C, *restrict g = gy + (t * j->M + m) * C; \
                for (int64_t c = 0; c < C; ++c) {                                                      \
                    double gv = (double)LD(g[c]);                                                      \
                    s1[c] += gv;                                                                       \
                    s2[c] += gv * ((double)LD(row[c]) - mu[c]);                                        \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    /* gx from the summed statistics: acc here holds, per step, k1 = sum_gy / M and              \
     * k2 = dotp invstd^2 / M (set by asnn_bn_backward before this pass). */                        \
    static void grad_input_##SUFFIX(BnJob *j) {                                                      \
        const STORE *x = (const STORE *)j->x, *gy = (const STORE *)j->gy;                              \
        const AFF *sc = (const AFF *)j->scale;                                                         \
        STORE *gx = (STORE *)j->gx;                                                                    \
        const int64_t C = j->C;                                                                        \
        for (int64_t t = 0; t < j->T; ++t) {                                                           \
            const double *restrict k1 = j->acc + 2 * t * C, *restrict k2 = k1 + C;                     \
            const double *restrict mu = j->mean + t * C;                                               \
            const AFF *restrict a = sc + t * C;                                                        \
            for (int64_t m = j->lo; m < j->hi; ++m) {                                                  \
                const int64_t off = (t * j->M + m) * C;                                                \
                const STORE *restrict row = x + off, *restrict g = gy + off;                           \
                STORE *restrict out = gx + off;                                                        \
                for (int64_t c = 0; c < C; ++c)                                                        \
                    out[c] = STD(((double)LD(g[c]) - k1[c] - ((double)LD(row[c]) - mu[c]) * k2[c]) * (double)a[c]); \
            }                                                                                          \
        }                                                                                              \
    }

#define F32_STD(v) ((float)(v))
DEFINE_BN(float, float, f32, ID_LD, ID_ST, F32_STD)
DEFINE_BN(double, double, f64, ID_LD, ID_ST, ID_ST)
DEFINE_BN(bf16_t, float, bf16, bf16_ld, bf16_st, bf16_st_d)

#define PICK(dtype, name) ((dtype) == 2 ? name##_bf16 : (dtype) == 1 ? name##_f64 : name##_f32)

static void bn_run(void *arg) {
    BnJob *j = (BnJob *)arg;
    j->fn(j);
}

/* Split rows [0, M) into `threads` ranges (parallel.h); each range gets its own zeroed
 * [2 T C] accumulator, or (shared_acc) reads the given one; the per-range sums are added in
 * range order to acc_out. */
static int bn_parallel(BnJob base, void (*fn)(BnJob *), int threads, double *acc_out, const double *shared_acc) {
    if (threads < 1) threads = 1;
    if (threads > base.M) threads = base.M > 0 ? (int)base.M : 1;
    size_t acc_len = (size_t)(2 * base.T * base.C);
    BnJob *jobs = calloc((size_t)threads, sizeof(BnJob));
    double *acc = acc_out ? calloc((size_t)threads * acc_len, sizeof(double)) : NULL;
    int rc = 0;
    if (!jobs || (acc_out && !acc)) { rc = 1; goto done; }
    int64_t per = (base.M + threads - 1) / threads;
    for (int k = 0; k < threads; ++k) {
        BnJob *j = &jobs[k];
        *j = base;
        j->fn = fn;
        j->lo = k * per < base.M ? k * per : base.M;
        j->hi = (k + 1) * per < base.M ? (k + 1) * per : base.M;
        j->acc = acc_out ? acc + k * acc_len : (double *)shared_acc;
    }
    run_jobs(threads, sizeof(BnJob), (char *)jobs, bn_run);
    if (acc_out)
        for (int k = 0; k < threads; ++k)
            for (size_t a = 0; a < acc_len; ++a) acc_out[a] += jobs[k].acc[a];
done:
    free(jobs);
    free(acc);
    return rc;
}

/* mean and biased variance per (t, c), as doubles [T C] each. */
int asnn_bn_stats(int dtype, int64_t T, int64_t M, int64_t C, const void *x, double *mean, double *var, int threads) {
    BnJob j;
    memset(&j, 0, sizeof j);
    j.T = T; j.M = M; j.C = C; j.x = x;
    double *acc = calloc((size_t)(2 * T * C), sizeof(double));
    if (!acc) return 1;
    int rc = bn_parallel(j, PICK(dtype, stats), threads, acc, NULL);
    for (int64_t t = 0; t < T && !rc; ++t)
        for (int64_t c = 0; c < C; ++c) {
            double mu = acc[2 * t * C + c] / (double)M;
            double v = acc[2 * t * C + C + c] / (double)M - mu * mu;
            mean[t * C + c] = mu;
            var[t * C + c] = v > 0 ? v : 0;
        }
    free(acc);
    return rc;
}

int asnn_bn_apply(int dtype, int64_t T, int64_t M, int64_t C, const void *x, const void *scale, const void *shift,
                  void *y, int threads) {
    BnJob j;
    memset(&j, 0, sizeof j);
    j.T = T; j.M = M; j.C = C; j.x = x; j.scale = scale; j.shift = shift; j.y = y;
    return bn_parallel(j, PICK(dtype, apply), threads, NULL, NULL);
}

/* sums_out [2 T C]: sum_gy then dotp per step; gx (may be NULL) from them. */
int asnn_bn_backward(int dtype, int64_t T, int64_t M, int64_t C, const void *x, const void *gy, const double *mean,
                     const double *invstd, const void *scale, void *gx, double *sums_out, int threads) {
    BnJob j;
    memset(&j, 0, sizeof j);
    j.T = T; j.M = M; j.C = C; j.x = x; j.gy = gy; j.mean = mean; j.invstd = invstd; j.scale = scale; j.gx = gx;
    int rc = bn_parallel(j, PICK(dtype, grad_sums), threads, sums_out, NULL);
    if (rc || !gx) return rc;
    size_t n = (size_t)(2 * T * C);
    double *k = malloc(n * sizeof(double));
    if (!k) return 1;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < C; ++c) {
            int64_t i = t * C + c;
            k[2 * t * C + c] = sums_out[2 * t * C + c] / (double)M;
            k[2 * t * C + C + c] = sums_out[2 * t * C + C + c] * invstd[i] * invstd[i] / (double)M;
        }
    rc = bn_parallel(j, PICK(dtype, grad_input), threads, NULL, k);
    free(k);
    return rc;
}
