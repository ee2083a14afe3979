/* bfloat16 storage for the kernels: values are loaded into float and stored back rounded to
 * nearest even (torch's float -> bfloat16 rule, NaN kept quiet), so a kernel on bf16 tensors
 * computes exactly what its float32 version computes on the same (bf16) values, then rounds
 * each output once. Branch-free, so the loops that use them vectorise.
 */
#ifndef ASNN_BF16_H
#define ASNN_BF16_H

#include <stdint.h>
#include <string.h>

typedef uint16_t bf16_t;

static inline float bf16_ld(bf16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16_t bf16_st(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet = (u >> 16) | 0x40u;
    return (bf16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet : rounded);
}

static inline bf16_t bf16_st_d(double d) { return bf16_st((float)d); }

/* identity load/store for the float and double kernels */
#define ID_LD(v) (v)
#define ID_ST(v) (v)

#endif
