/* Adaptive LIF over T steps on the CPU: forward and hand-written BPTT in one pass each.
 *
 * Why C: the torch-op kernel (snn/fused.py) makes ~10 passes over memory per step and
 * ~20 small op dispatches per chunk and step; here every element's T steps run in
 * registers/L1 (blocks of BLK elements, vectorised by the compiler over the block), so the
 * forward reads x and writes spikes once, and the backward reads x and the upstream
 * gradient once and writes dx once. Built at first use by native.py (cc -O3, no fast-math:
 * the forward and the backward's recomputation must round identically, so spikes seen by
 * backward equal the forward's; -ffp-contract=off keeps a*b + c*d from becoming an FMA in
 * one loop and not the other).
 *
 * Recurrence (asnn-method.md section 1; the reference is snn.functional.adaptive_lif_step):
 *   h[t] = gain[t] x[t] + leak[t] v[t-1]    (no leak term at t = 0 without an entry membrane)
 *   s[t] = h[t] > thr        (strictly, as the method and the authors' code)
 *   v[t] = h[t] - thr s[t]  (soft)   or   h[t] if s[t] == 0 else 0  (hard)
 * Backward with g_v = dL/dv[t] (dL/dv of the returned last membrane after the last step,
 * else 0) and sg = surrogate'(h[t] - thr):
 *   g_s = dL/ds[t] + g_v dv/ds   (dv/ds = -thr soft, -h hard; 0 with detach_reset)
 *   g_h = g_s sg + g_v dv/dh     (dv/dh = 1 soft, 1 - s hard)
 *   dx[t] = gain[t] g_h;  dgain[t] = <g_h, x[t]>;  dleak[t] = <g_h, v[t-1]>;
 *   dthr = sum_t -<g_s, sg> (- <g_v, s[t]> soft);  g_v(t-1) = leak[t] g_h;  dv0 = leak[0] g_h[0].
 * Parameter gradients are summed per block of BLK elements in the element type (vectorised),
 * then in double over blocks and threads, in a fixed order (per thread, then threads in
 * order), so results are deterministic for a given thread count.
 * bfloat16 tensors (x, spikes, gout, gx) are read into float and outputs rounded once
 * (bf16.h); the membrane and all arithmetic are float32, so the bf16 kernel computes exactly
 * what the float32 kernel computes on the same values.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "parallel.h"

#define BLK 256
#define SUR_SIGMOID 0
#define SUR_ATAN 1
#define HALF_PI 1.57079632679489661923

typedef struct Job {
    int64_t T, n, lo, hi;
    const void *x, *v0, *gout, *glast;
    void *spikes, *vlast, *gx, *gv0;
    const double *leak, *gain;
    double thr, alpha;
    int hard, detach, sur;
    double *acc; /* [2T + 1]: dleak[T], dgain[T], dthr */
    int failed;
    void (*fn)(struct Job *);
} Job;

/* exp(-|a|), branch-free so that loops over it vectorise (Cephes' polynomials). |a| is
 * clamped to 87 (float) / 708 (double) by an integer min on its bits (monotonic for
 * non-negative floats): a float select here keeps GCC from vectorising the loop. */
static inline float exp_neg_abs_f(float a) {
    float x = fabsf(a);
    uint32_t bx;
    memcpy(&bx, &x, 4);
    bx = bx < 0x42AE0000u ? bx : 0x42AE0000u;
    memcpy(&x, &bx, 4);
    x = -x;
    int k = (int)(x * 1.44269504088896341f - 0.5f);
    float fk = (float)k;
    float r = x - fk * 0.693359375f - fk * -2.12194440e-4f;
    float z = r * r;
    float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r
               + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    int32_t bits = (int32_t)(k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline double exp_neg_abs_d(double a) {
    double x = fabs(a);
    uint64_t bx;
    memcpy(&bx, &x, 8);
    bx = bx < 0x4086200000000000ull ? bx : 0x4086200000000000ull;
    memcpy(&x, &bx, 8);
    x = -x;
    int k = (int)(x * 1.4426950408889634074 - 0.5);
    double fk = (double)k;
    double r = x - fk * 6.93145751953125e-1 - fk * 1.42860682030941723212e-6;
    double z = r * r;
    double p = r * ((1.26177193074810590878e-4 * z + 3.02994407707441961300e-2) * z + 9.99999999999999999910e-1);
    double q = ((3.00198505138664455042e-6 * z + 2.52448340349684104192e-3) * z + 2.27265548208155028766e-1) * z
               + 2.00000000000000000009e0;
    double e = 1.0 + 2.0 * p / (q - p);
    int64_t bits = (int64_t)(k + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, 8);
    return e * scale;
}

/* One kernel body per element type: REAL float with exp_neg_f, or double with exp_neg_d.
 * The membrane update is written once (LIF_H / LIF_V) and used by the forward and by the
 * backward's recomputation, so both round identically. */
#define LIF_H(g, xv, l, v) ((g) * (xv) + (l) * (v))
#define LIF_V(h, s, thr, hard) ((hard) ? ((h) > (thr) ? 0 : (h)) : (h) - (thr) * (s))

#define DEFINE_KERNELS(REAL, STORE, SUFFIX, EXPNEG, LD, ST)                                             \
    static inline REAL surrogate_##SUFFIX(REAL y, int sur, REAL alpha) {                              \
        if (sur == SUR_SIGMOID) { /* alpha sig(ay)(1 - sig(ay)) = alpha e / (1 + e)^2, e = exp(-|ay|) */ \
            REAL e = EXPNEG(alpha * y);                                                                \
            REAL d = (REAL)1 + e;                                                                      \
            return alpha * e / (d * d);                                                                \
        }                                                                                              \
        REAL w = (REAL)HALF_PI * alpha * y; /* atan: alpha/2 / (1 + (pi/2 alpha y)^2) */               \
        return (alpha / 2) / ((REAL)1 + w * w);                                                        \
    }                                                                                                  \
                                                                                                       \
    /* One step for m elements: v (in: v[t-1] unless first_rest; out: v[t]); h and s optional. */   \
    static inline __attribute__((always_inline)) void step_##SUFFIX(int64_t m, const STORE *restrict xt, const REAL *restrict vin, \
                                     REAL *restrict vout, REAL *restrict ht, STORE *restrict st,        \
                                     REAL g, REAL l, REAL thr, int hard) {                            \
        if (vin) {                                                                                     \
            for (int64_t i = 0; i < m; ++i) {                                                          \
                REAL h = LIF_H(g, LD(xt[i]), l, vin[i]);                                                \
                REAL s = h > thr ? (REAL)1 : (REAL)0;                                                  \
                vout[i] = LIF_V(h, s, thr, hard);                                                      \
                if (ht) ht[i] = h;                                                                     \
                if (st) st[i] = ST(s);                                                                  \
            }                                                                                          \
        } else {                                                                                       \
            for (int64_t i = 0; i < m; ++i) {                                                          \
                REAL h = g * LD(xt[i]);                                                                 \
                REAL s = h > thr ? (REAL)1 : (REAL)0;                                                  \
                vout[i] = LIF_V(h, s, thr, hard);                                                      \
                if (ht) ht[i] = h;                                                                     \
                if (st) st[i] = ST(s);                                                                  \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    static void forward_##SUFFIX(Job *j) {                                                            \
        REAL va[BLK], vb[BLK];                                                                         \
        const STORE *x = (const STORE *)j->x; const REAL *v0 = (const REAL *)j->v0;                     \
        STORE *sp = (STORE *)j->spikes;                                                                 \
        const int64_t n = j->n;                                                                        \
        for (int64_t i0 = j->lo; i0 < j->hi; i0 += BLK) {                                              \
            int64_t m = j->hi - i0 < BLK ? j->hi - i0 : BLK;                                           \
            const REAL *vin = v0 ? v0 + i0 : NULL;                                                     \
            REAL *vout = va;                                                                           \
            for (int64_t t = 0; t < j->T; ++t) {                                                       \
                step_##SUFFIX(m, x + t * n + i0, vin, vout, NULL, sp ? sp + t * n + i0 : NULL,         \
                              (REAL)j->gain[t], (REAL)j->leak[t], (REAL)j->thr, j->hard);              \
                vin = vout;                                                                            \
                vout = vout == va ? vb : va;                                                           \
            }                                                                                          \
            if (j->vlast) memcpy((REAL *)j->vlast + i0, vin, (size_t)m * sizeof(REAL));               \
        }                                                                                              \
    }                                                                                                  \
                                                                                                       \
    /* Reverse sweep of step t for m elements; sur/hard/detach are literals at every call     \
     * site (see backward), so each combination compiles to its own branch-free vector loop. \
     * The parameter sums of the step are reduced in the same loop (omp simd: a fixed order   \
     * for a given build, so results are reproducible), in the element type over one block;  \
     * callers add the block sums in double. vp: v[t-1] (zeros at rest).                      */ \
    static inline __attribute__((always_inline)) void reverse_##SUFFIX(                               \
        int64_t m, const REAL *restrict ht, const STORE *restrict got, const STORE *restrict xt,        \
        const REAL *restrict vp, STORE *restrict gxt, REAL *restrict gvv, REAL g, REAL l, REAL thr,     \
        REAL alpha, double *restrict sums, const int sur, const int hard, const int detach) {          \
        REAL s_gain = 0, s_leak = 0, s_thr = 0;                                                      \
        _Pragma("omp simd reduction(+ : s_gain, s_leak, s_thr)")                                      \
        for (int64_t i = 0; i < m; ++i) {                                                              \
            REAL h = ht[i], gv = gvv[i];                                                               \
            REAL s = h > thr ? (REAL)1 : (REAL)0;                                                      \
            REAL sg = surrogate_##SUFFIX(h - thr, sur, alpha);                                         \
            REAL gs = detach ? LD(got[i]) : LD(got[i]) + gv * (hard ? -h : -thr);                       \
            REAL gh = gs * sg + (hard ? gv * ((REAL)1 - s) : gv);                                      \
            gvv[i] = l * gh;                                                                           \
            gxt[i] = ST(g * gh);                                                                        \
            s_gain += gh * LD(xt[i]);                                                                   \
            s_leak += gh * vp[i];                                                      \
            s_thr += gs * sg + (hard ? (REAL)0 : gv * s);                              \
        }                                                                                              \
        sums[0] += s_gain;                                                                             \
        sums[1] += s_leak;                                                                             \
        sums[2] -= s_thr;                                                                              \
    }                                                                                                  \
                                                                                                       \
    static void backward_##SUFFIX(Job *j) {                                                           \
        const int64_t T = j->T, n = j->n;                                                              \
        REAL *H = malloc(sizeof(REAL) * (size_t)(2 * T + 3) * BLK);                                    \
        if (!H) { j->failed = 1; return; }                                                             \
        REAL *V = H + T * BLK, *GV = V + T * BLK, *GXS = GV + BLK, *ZERO = GXS + BLK;                  \
        memset(ZERO, 0, BLK * sizeof(REAL));                                                           \
        const STORE *x = (const STORE *)j->x, *go = (const STORE *)j->gout; const REAL *v0 = (const REAL *)j->v0; \
        const REAL *gl = (const REAL *)j->glast;                                                       \
        STORE *gx = (STORE *)j->gx; REAL *gv0 = (REAL *)j->gv0;                                         \
        const REAL thr = (REAL)j->thr, alpha = (REAL)j->alpha;                                         \
        const int mode = j->sur * 4 + j->hard * 2 + j->detach;                                         \
        double *d_leak = j->acc, *d_gain = j->acc + T, *d_thr = j->acc + 2 * T;                        \
        for (int64_t i0 = j->lo; i0 < j->hi; i0 += BLK) {                                              \
            int64_t m = j->hi - i0 < BLK ? j->hi - i0 : BLK;                                           \
            for (int64_t t = 0; t < T; ++t) /* recompute h[t], v[t] with the forward's ops */          \
                step_##SUFFIX(m, x + t * n + i0, t ? V + (t - 1) * BLK : (v0 ? v0 + i0 : NULL),        \
                              V + t * BLK, H + t * BLK, NULL, (REAL)j->gain[t], (REAL)j->leak[t], thr, \
                              j->hard);                                                                \
            if (gl) memcpy(GV, gl + i0, (size_t)m * sizeof(REAL));                                     \
            else memset(GV, 0, (size_t)m * sizeof(REAL));                                              \
            for (int64_t t = T - 1; t >= 0; --t) {                                                     \
                const REAL g = (REAL)j->gain[t], l = (REAL)j->leak[t];                                 \
                const REAL *ht = H + t * BLK; const STORE *got = go + t * n + i0, *xt = x + t * n + i0; \
                const REAL *vp = t ? V + (t - 1) * BLK : (v0 ? v0 + i0 : ZERO);                        \
                STORE *gxt = gx ? gx + t * n + i0 : (STORE *)GXS;                                       \
                double sums[3] = {0, 0, 0};                                                            \
                switch (mode) {                                                                        \
                    case 0: reverse_##SUFFIX(m, ht, got, xt, vp, gxt, GV, g, l, thr, alpha, sums, 0, 0, 0); break; \
                    case 1: reverse_##SUFFIX(m, ht, got, xt, vp, gxt, GV, g, l, thr, alpha, sums, 0, 0, 1); break; \
                    case 2: reverse_##SUFFIX(m, ht, got, xt, vp, gxt, GV, g, l, thr, alpha, sums, 0, 1, 0); break; \
                    case 3: reverse_##SUFFIX(m, ht, got, xt, vp, gxt, GV, g, l, thr, alpha, sums, 0, 1, 1); break; \
                    case 4: reverse_##SUFFIX(m, ht, got, xt, vp, gxt, GV, g, l, thr, alpha, sums, 1, 0, 0); break; \
                    case 5: reverse_##SUFFIX(m, ht, got, xt, vp, gxt, GV, g, l, thr, alpha, sums, 1, 0, 1); break; \
                    case 6: reverse_##SUFFIX(m, ht, got, xt, vp, gxt, GV, g, l, thr, alpha, sums, 1, 1, 0); break; \
                    default: reverse_##SUFFIX(m, ht, got, xt, vp, gxt, GV, g, l, thr, alpha, sums, 1, 1, 1); break; \
                }                                                                                      \
                d_gain[t] += sums[0];                                                                  \
                d_leak[t] += sums[1];                                                                  \
                d_thr[0] += sums[2];                                                                   \
            }                                                                                          \
            if (gv0) memcpy(gv0 + i0, GV, (size_t)m * sizeof(REAL));                                  \
        }                                                                                              \
        free(H);                                                                                       \
    }

DEFINE_KERNELS(float, float, f32, exp_neg_abs_f, ID_LD, ID_ST)
DEFINE_KERNELS(double, double, f64, exp_neg_abs_d, ID_LD, ID_ST)
/* bf16 x, spikes, gout, gx; float membranes (v0, vlast, glast, gv0) and arithmetic */
DEFINE_KERNELS(float, bf16_t, bf16, exp_neg_abs_f, bf16_ld, bf16_st)

#define PICK(dtype, name) ((dtype) == 2 ? name##_bf16 : (dtype) == 1 ? name##_f64 : name##_f32)

static void run_job(void *arg) {
    Job *j = (Job *)arg;
    j->fn(j);
}

/* Split [0, n) into `threads` block-aligned ranges, run fn on each (parallel.h), then add
 * the per-range accumulators in range order into acc_out. Returns 0 on success. */
static int parallel(Job base, void (*fn)(Job *), int threads, double *acc_out) {
    int64_t blocks = (base.n + BLK - 1) / BLK;
    if (threads < 1) threads = 1;
    if (threads > blocks) threads = blocks > 0 ? (int)blocks : 1;
    size_t acc_len = (size_t)(2 * base.T + 1);
    Job *jobs = calloc((size_t)threads, sizeof(Job));
    double *acc = calloc((size_t)threads * acc_len, sizeof(double));
    int rc = 0;
    if (!jobs || !acc) { rc = 1; goto done; }
    int64_t per = (blocks + threads - 1) / threads;
    for (int k = 0; k < threads; ++k) {
        Job *j = &jobs[k];
        *j = base;
        j->fn = fn;
        j->lo = k * per * BLK < base.n ? k * per * BLK : base.n;
        j->hi = (k + 1) * per * BLK < base.n ? (k + 1) * per * BLK : base.n;
        j->acc = acc + k * acc_len;
    }
    run_jobs(threads, sizeof(Job), (char *)jobs, run_job);
    for (int k = 0; k < threads; ++k) {
        if (jobs[k].failed) rc = 1;
        if (acc_out)
            for (size_t a = 0; a < acc_len; ++a) acc_out[a] += jobs[k].acc[a];
    }
done:
    free(jobs);
    free(acc);
    return rc;
}

/* dtype: 0 float32, 1 float64, 2 bfloat16 (x, spikes, gout, gx; the membranes v0, vlast,
 * glast, gv0 are float32 then). Pointers may be NULL where documented in native.py. */
int asnn_lif_forward(int dtype, int64_t T, int64_t n, const void *x, const void *v0, const double *leak,
                     const double *gain, double thr, int hard, void *spikes, void *vlast, int threads) {
    Job j;
    memset(&j, 0, sizeof j);
    j.T = T; j.n = n; j.x = x; j.v0 = v0; j.leak = leak; j.gain = gain; j.thr = thr; j.hard = hard;
    j.spikes = spikes; j.vlast = vlast;
    return parallel(j, PICK(dtype, forward), threads, NULL);
}

int asnn_lif_backward(int dtype, int64_t T, int64_t n, const void *x, const void *v0, const void *gout,
                      const void *glast, const double *leak, const double *gain, double thr, int hard,
                      int detach, int sur, double alpha, void *gx, void *gv0, double *acc_out,
                      int threads) {
    Job j;
    memset(&j, 0, sizeof j);
    j.T = T; j.n = n; j.x = x; j.v0 = v0; j.gout = gout; j.glast = glast; j.leak = leak; j.gain = gain;
    j.thr = thr; j.hard = hard; j.detach = detach; j.sur = sur; j.alpha = alpha; j.gx = gx; j.gv0 = gv0;
    return parallel(j, PICK(dtype, backward), threads, acc_out);
}
