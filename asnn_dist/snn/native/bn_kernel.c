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
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

typedef struct BnJob {
    int64_t T, M, C, lo, hi; /* rows [lo, hi) of every step */
    const void *x, *gy, *scale, *shift;
    const double *mean, *invstd;
    void *y, *gx;
    double *acc; /* per thread: [2 T C] */
    void (*fn)(struct BnJob *);
} BnJob;

#define DEFINE_BN(REAL, SUFFIX)                                                                       \
    static void stats_##SUFFIX(BnJob *j) {                                                           \
        const REAL *x = (const REAL *)j->x;                                                            \
        const int64_t C = j->C;                                                                        \
        for (int64_t t = 0; t < j->T; ++t) {                                                           \
            double *restrict s1 = j->acc + 2 * t * C, *restrict s2 = s1 + C;                           \
            for (int64_t m = j->lo; m < j->hi; ++m) {                                                  \
                const REAL *restrict row = x + (t * j->M + m) * C;                                     \
                for (int64_t c = 0; c < C; ++c) {                                                      \
                    double v = (double)row[c];                                                         \
                    s1[c] += v;                                                                        \
                    s2[c] += v * v;                                                                    \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    static void apply_##SUFFIX(BnJob *j) {                                                           \
        const REAL *x = (const REAL *)j->x, *sc = (const REAL *)j->scale, *sh = (const REAL *)j->shift; \
        REAL *y = (REAL *)j->y;                                                                        \
        const int64_t C = j->C;                                                                        \
        for (int64_t t = 0; t < j->T; ++t) {                                                           \
            const REAL *restrict a = sc + t * C, *restrict b = sh + t * C;                             \
            for (int64_t m = j->lo; m < j->hi; ++m) {                                                  \
                const REAL *restrict row = x + (t * j->M + m) * C;                                     \
                REAL *restrict out = y + (t * j->M + m) * C;                                           \
                for (int64_t c = 0; c < C; ++c) out[c] = row[c] * a[c] + b[c];                         \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    static void grad_sums_##SUFFIX(BnJob *j) {                                                       \
        const REAL *x = (const REAL *)j->x, *gy = (const REAL *)j->gy;                                 \
        const int64_t C = j->C;                                                                        \
        for (int64_t t = 0; t < j->T; ++t) {                                                           \
            double *restrict s1 = j->acc + 2 * t * C, *restrict s2 = s1 + C;                           \
            const double *restrict mu = j->mean + t * C;                                               \
            for (int64_t m = j->lo; m < j->hi; ++m) {                                                  \
                const REAL *restrict row = x + (t * j->M + m) * C, *restrict g = gy + (t * j->M + m) * C; \
                for (int64_t c = 0; c < C; ++c) {                                                      \
                    double gv = (double)g[c];                                                          \
                    s1[c] += gv;                                                                       \
                    s2[c] += gv * ((double)row[c] - mu[c]);                                            \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    /* gx from the summed statistics: acc here holds, per step, k1 = sum_gy / M and              \
     * k2 = dotp invstd^2 / M (set by asnn_bn_backward before this pass). */                        \
    static void grad_input_##SUFFIX(BnJob *j) {                                                      \
        const REAL *x = (const REAL *)j->x, *gy = (const REAL *)j->gy, *sc = (const REAL *)j->scale;   \
        REAL *gx = (REAL *)j->gx;                                                                      \
        const int64_t C = j->C;                                                                        \
        for (int64_t t = 0; t < j->T; ++t) {                                                           \
            const double *restrict k1 = j->acc + 2 * t * C, *restrict k2 = k1 + C;                     \
            const double *restrict mu = j->mean + t * C;                                               \
            const REAL *restrict a = sc + t * C;                                                       \
            for (int64_t m = j->lo; m < j->hi; ++m) {                                                  \
                const int64_t off = (t * j->M + m) * C;                                                \
                const REAL *restrict row = x + off, *restrict g = gy + off;                            \
                REAL *restrict out = gx + off;                                                         \
                for (int64_t c = 0; c < C; ++c)                                                        \
                    out[c] = (REAL)(((double)g[c] - k1[c] - ((double)row[c] - mu[c]) * k2[c]) * (double)a[c]); \
            }                                                                                          \
        }                                                                                              \
    }

DEFINE_BN(float, f32)
DEFINE_BN(double, f64)

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
    int rc = bn_parallel(j, dtype ? stats_f64 : stats_f32, threads, acc, NULL);
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
    return bn_parallel(j, dtype ? apply_f64 : apply_f32, threads, NULL, NULL);
}

/* sums_out [2 T C]: sum_gy then dotp per step; gx (may be NULL) from them. */
int asnn_bn_backward(int dtype, int64_t T, int64_t M, int64_t C, const void *x, const void *gy, const double *mean,
                     const double *invstd, const void *scale, void *gx, double *sums_out, int threads) {
    BnJob j;
    memset(&j, 0, sizeof j);
    j.T = T; j.M = M; j.C = C; j.x = x; j.gy = gy; j.mean = mean; j.invstd = invstd; j.scale = scale; j.gx = gx;
    int rc = bn_parallel(j, dtype ? grad_sums_f64 : grad_sums_f32, threads, sums_out, NULL);
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
    rc = bn_parallel(j, dtype ? grad_input_f64 : grad_input_f32, threads, NULL, k);
    free(k);
    return rc;
}
