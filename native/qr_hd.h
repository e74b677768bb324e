/* Scalar primitives shared by the C codec and the CUDA kernels (native/codec_cuda.cu).
 *
 * Everything in native/blocks_*.h is written once and compiled twice: as C11 by the cffi build and as
 * CUDA C++ by nvcc (QR_HD = __host__ __device__). Byte equality between the two then rests on
 * (a) IEEE float32 arithmetic with round-to-nearest on both sides, no FMA contraction (C:
 *     -ffp-contract=off, nvcc: -fmad=false), no flush-to-zero (-ftz=false), IEEE div/sqrt
 *     (-prec-div=true -prec-sqrt=true), no reassociation (no fast-math anywhere); and
 * (b) the few places where the C code's result depends on the CPU rather than on IEEE 754 going through
 *     the helpers below, whose device versions reproduce what x86-64 does:
 *       - float -> int conversion of NaN or out-of-range values (cvttss2si gives INT_MIN; CUDA saturates),
 *       - the bits of a NaN (x86 makes the "default NaN" 0xFFC00000 and propagates operand NaNs;
 *         CUDA makes the canonical 0x7FFFFFFF), which reach qr_nearest_int, fp16 conversion and the
 *         dequantized floats.
 * QR_PORTABLE_NUMERICS selects the device versions on the host too, so the CPU oracle tests can check
 * them (build the extension with QREALIGN_CFLAGS=-DQR_PORTABLE_NUMERICS).
 */
#ifndef QR_HD_H
#define QR_HD_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <limits.h>

#ifdef __CUDACC__
#define QR_HD __host__ __device__ static inline
#else
#define QR_HD static inline
#endif

/* x86's answers where C leaves them to the machine (out-of-range float->int casts, NaN bits): on the GPU, and on
 * every CPU that is not x86 -- ARM's conversions saturate (+inf -> INT_MAX, so a Q8_0 block of float32 denormals,
 * whose 1/d overflows, got code -1 instead of 0), and the files must not depend on the machine that wrote them
 * (tests/test_edge.py runs the codec under qemu-aarch64) */
#if defined(__CUDA_ARCH__) || defined(QR_PORTABLE_NUMERICS) || !(defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86))
#define QR_EMULATE_X86 1
#else
#define QR_EMULATE_X86 0
#endif

QR_HD uint32_t qr_f2u(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u; memcpy(&u, &f, 4); return u;
#endif
}

QR_HD float qr_u2f(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f; memcpy(&f, &u, 4); return f;
#endif
}

QR_HD int qr_isnan(float f) { return (qr_f2u(f) & 0x7fffffffu) > 0x7f800000u; }

/* C's (int)v as x86-64 computes it: truncation toward zero, NaN and out-of-range give INT_MIN.
 * Narrower casts are taken from this int ((int8_t)qr_ftoi(v)), which is what gcc emits on x86-64. */
QR_HD int qr_ftoi(float v) {
#if QR_EMULATE_X86
    if (qr_isnan(v) || v >= 2147483648.0f || v < -2147483648.0f) return INT_MIN;
#endif
    return (int)v;
}

/* ggml's round-to-nearest: the magic-number trick, which rounds half to even for |x| < 2^22. Every
 * codec must round with it. A NaN argument: on x86 every NaN the codec can make is a quiet NaN with a
 * zero payload, which gives 0 here; the device's NaN has another payload, so it is mapped explicitly. */
QR_HD int qr_nearest_int(float fval) {
#if QR_EMULATE_X86
    if (qr_isnan(fval)) return 0;
#endif
    const float val = fval + 12582912.f;
    const int i = (int)qr_f2u(val);
    return (i & 0x007fffff) - 0x00400000;
}

/* x86's NaN result of one binary operation r = a op b: the first NaN operand, quieted, or the default
 * NaN when the operation itself is invalid. Applied where NaN bits are written out (dequantization). */
QR_HD float qr_nanfix(float r, float a, float b) {
#if QR_EMULATE_X86
    if (qr_isnan(r)) {
        if (qr_isnan(a)) return qr_u2f(qr_f2u(a) | 0x00400000u);
        if (qr_isnan(b)) return qr_u2f(qr_f2u(b) | 0x00400000u);
        return qr_u2f(0xffc00000u);
    }
#else
    (void)a; (void)b;
#endif
    return r;
}
QR_HD float qr_fmul(float a, float b) { return qr_nanfix(a * b, a, b); }
QR_HD float qr_fadd(float a, float b) { return qr_nanfix(a + b, a, b); }
QR_HD float qr_fsub(float a, float b) { return qr_nanfix(a - b, a, b); }

/* fp32 -> fp16, IEEE binary16 round to nearest even (identical to ggml's conversion). A NaN becomes
 * a quiet fp16 NaN with the NaN's sign. */
QR_HD uint16_t qr_f32_to_f16(float f) {
    uint32_t x = qr_f2u(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);        /* NaN -> quiet NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);       /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {                                         /* result is subnormal or zero */
        /* exact: the half subnormal grid is 2^-24, so add 0.5 (2^-1) to align and let fp32 RNE round */
        float r = qr_u2f(ax) + 0.5f;
        return (uint16_t)(sign | (qr_f2u(r) - 0x3f000000u));
    }
    uint32_t mant_odd = (ax >> 13) & 1u;
    ax += 0xc8000fffu + mant_odd;                                   /* rebias exponent 127->15, RNE */
    return (uint16_t)(sign | (ax >> 13));
}

QR_HD float qr_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return qr_u2f(sign | 0x7f800000u | (m << 13));
    if (e == 0) {                                                   /* subnormal: m * 2^-24 exactly */
        float v = (float)m * qr_u2f(0x33800000u);
        return qr_u2f(sign | qr_f2u(v));
    }
    return qr_u2f(sign | ((e + 112u) << 23) | (m << 13));
}

/* fp16 of a scale the codec computed: as qr_f32_to_f16, but a NaN (degenerate input) gets x86's sign,
 * set, since the device's NaN has another sign bit than the x86 NaN the C code produced. */
QR_HD uint16_t qr_f16_scale(float f) {
#if QR_EMULATE_X86
    if (qr_isnan(f)) return (uint16_t)0xfe00u;
#endif
    return qr_f32_to_f16(f);
}

QR_HD int qr_imin(int a, int b) { return a < b ? a : b; }
QR_HD int qr_imax(int a, int b) { return a > b ? a : b; }
QR_HD int qr_clampi(int v, int lo, int hi) { return qr_imax(lo, qr_imin(hi, v)); }

#endif
