/* Per-block math of the K-quant codecs (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; super-blocks of 256 weights, and
 * qrealign's QR5_K128: Q5_K's math on 128-weight super-blocks, native/qr_custom.h),
 * shared by the C row drivers (native/quant_k.c) and the CUDA kernels (native/codec_cuda.cu): one
 * source of truth, so both produce the same bytes by construction (numerics rules: native/qr_hd.h).
 *
 * Layouts and algorithms follow ggml-quants.c / ggml-common.h of the pinned llama.cpp. Every block is
 * handled as a decoded `kblock` (codes in the convention of qrealign.h): the quantizers fill one, the
 * per-type writer packs it; unpack/dequantize go the other way. So qr_pack and qr_quantize share
 * one byte layout by construction.
 *
 * Bit-exactness: the searches below repeat ggml's float arithmetic operation for operation (same
 * association, same int->float conversions, same uint8/int8 truncations); the build uses
 * -ffp-contract=off (nvcc: -fmad=false) so no FMA fuses what ggml computes in two roundings. Change
 * expressions only with the oracle tests (tests/test_codec_k.py) at hand.
 *
 * Must stay valid C11 and CUDA C++: no function pointers, no file-scope tables, explicit casts.
 */
#ifndef QR_BLOCKS_K_H
#define QR_BLOCKS_K_H
#include "qr_hd.h"
#include "qr_types.h"
#include "blocks_k_layout.h"  /* kblock, bit fields, per-type byte layouts */
#include "qr_custom.h"        /* QR_QR5_K128 */

#define GROUP_MAX_EPS 1e-15f  /* ggml: a group whose max |x| is below this is all zero */

/* ---- scale searches (ggml's make_*_quants, same float operation order) ----------------------- */

/* one rounding pass of make_qx at inverse scale iscale: codes into L (offset by nmax), fit sums out */
QR_HD void qx_pass(int n, int nmax, const float *x, const float *qw, float iscale, int8_t *L,
                    float *sumlx, float *suml2) {
    float slx = 0, sl2 = 0;
    for (int i = 0; i < n; ++i) {
        const int l = qr_clampi(qr_nearest_int(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)(l + nmax);
        const float w = qw ? qw[i] : x[i] * x[i];
        slx += w * x[i] * l;
        sl2 += w * l * l;
    }
    *sumlx = slx; *suml2 = sl2;
}

/* Symmetric codes in [-nmax, nmax-1] with a weighted least-squares scale, trying 18 perturbed
 * inverse scales around -nmax/max (ggml make_qx_quants, rmse_type 1). Weights qw, or x^2 if NULL.
 * L gets the codes offset by nmax; returns the scale. */
QR_HD float make_qx(int n, int nmax, const float *x, int8_t *L, const float *qw) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < GROUP_MAX_EPS) { memset(L, 0, (size_t)n); return 0.f; }
    float sumlx, suml2;
    qx_pass(n, nmax, x, qw, -nmax / max, L, &sumlx, &suml2);
    float scale = suml2 ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    int8_t Laux[32];
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        qx_pass(n, nmax, x, qw, -(nmax + 0.1f * is) / max, Laux, &sumlx, &suml2);
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {  /* better fit: sumlx^2/suml2 is larger */
            memcpy(L, Laux, (size_t)n);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Q3_K's RTN search (ggml make_q3_quants with do_rmse): start from -nmax/max, then up to 5 sweeps
 * moving single codes whenever that raises the x^2-weighted fit (sumlx^2/suml2). L offset by nmax. */
QR_HD float make_q3(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = fabsf(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < GROUP_MAX_EPS) { memset(L, 0, (size_t)n); return 0.f; }
    const float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        const int l = qr_clampi(qr_nearest_int(iscale * x[i]), -nmax, nmax - 1);
        L[i] = (int8_t)l;
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (slx > 0) {
                float sl2 = suml2 - w * L[i] * L[i];
                const int new_l = qr_clampi(qr_nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1);
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (int8_t)new_l; sumlx = slx; suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    for (int i = 0; i < n; ++i) L[i] = (int8_t)(L[i] + nmax);
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* Affine codes 0..nmax for x ~ scale*L - the_min (min clamped to <= 0): start from the range, then
 * try nstep+1 inverse scales (rmin + rdelta*is + nmax)/range, each with a closed-form weighted
 * least-squares (scale, min), keeping the lowest weighted error (|diff| if use_mad, else diff^2).
 * This is both ggml's make_qkx2_quants and make_qkx3_quants (identical for non-NULL weights). */
QR_HD float make_qkx(int n, int nmax, const float *x, const float *w, uint8_t *L, float *the_min,
                      float rmin, float rdelta, int nstep, int use_mad) {
    float min = x[0], max = x[0], sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) { memset(L, 0, (size_t)n); *the_min = -min; return 0.f; }
    float iscale = nmax / (max - min), scale = 1 / iscale, best = 0;
    for (int i = 0; i < n; ++i) {
        L[i] = (uint8_t)qr_clampi(qr_nearest_int(iscale * (x[i] - min)), 0, nmax);
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best += w[i] * diff;
    }
    uint8_t Laux[32];
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            const int l = qr_clampi(qr_nearest_int(iscale * (x[i] - min)), 0, nmax);
            Laux[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) { this_min = 0; this_scale = sum_xl / sum_l2; }
            float err = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = use_mad ? fabsf(diff) : diff * diff;
                err += w[i] * diff;
            }
            if (err < best) {
                memcpy(L, Laux, (size_t)n);
                best = err; scale = this_scale; min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* Quantize non-negative sub-block scales (or mins) x to codes 0..nmax under one super-scale,
 * importance qw (ggml make_qp_quants): best of 9 inverse scales by weighted MSE, then up to 5 sweeps
 * of single-code moves. L is uint8 like ggml's, so a (degenerate) negative code wraps the same way. */
QR_HD float make_qp(int n, int nmax, const float *x, uint8_t *L, const float *qw) {
    float max = 0;
    for (int i = 0; i < n; ++i) max = max > x[i] ? max : x[i];
    if (max < GROUP_MAX_EPS) { memset(L, 0, (size_t)n); return 0.f; }
    float iscale = nmax / max;
    for (int i = 0; i < n; ++i) L[i] = (uint8_t)qr_nearest_int(iscale * x[i]);
    const float scale = 1 / iscale;
    float best_mse = 0;
    for (int i = 0; i < n; ++i) {
        const float diff = x[i] - scale * L[i];
        best_mse += qw[i] * diff * diff;
    }
    for (int is = -4; is <= 4; ++is) {
        if (is == 0) continue;
        const float iscale_is = (0.1f * is + nmax) / max, scale_is = 1 / iscale_is;
        float mse = 0;
        for (int i = 0; i < n; ++i) {
            const int l = qr_imin(nmax, qr_nearest_int(iscale_is * x[i]));
            const float diff = x[i] - scale_is * l;
            mse += qw[i] * diff * diff;
        }
        if (mse < best_mse) { best_mse = mse; iscale = iscale_is; }
    }
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        const int l = qr_imin(nmax, qr_nearest_int(iscale * x[i]));
        L[i] = (uint8_t)l;
        sumlx += qw[i] * x[i] * l;
        suml2 += qw[i] * l * l;
    }
    for (int itry = 0; itry < 5; ++itry) {
        int n_changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = qw[i];
            float slx = sumlx - w * x[i] * L[i];
            float sl2 = suml2 - w * L[i] * L[i];
            if (slx > 0 && sl2 > 0) {
                const int new_l = qr_imin(nmax, qr_nearest_int(x[i] * sl2 / slx));
                if (new_l != L[i]) {
                    slx += w * x[i] * new_l;
                    sl2 += w * new_l * new_l;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)new_l; sumlx = slx; suml2 = sl2;
                        ++n_changed;
                    }
                }
            }
        }
        if (!n_changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

/* ---- quantizers: one super-block -> kblock (codes before the final requantization) ------------ */

/* Q2_K: 16 affine sub-blocks of 16, 4-bit scale and min codes. */
QR_HD void quant_q2k(const float *x, const float *qw, kblock *b) {
    float scales[16], mins[16], w[16];
    uint8_t bytes[16];  /* scale | min << 4, built with ggml's uint8 arithmetic */
    if (!qw) {
        /* RTN: |x|-weighted MAD fit per sub-block, codes relative to the largest scale / min */
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < 16; ++j) {
            for (int l = 0; l < 16; ++l) w[l] = fabsf(x[16 * j + l]);
            scales[j] = make_qkx(16, 3, x + 16 * j, w, b->q + 16 * j, &mins[j], -0.5f, 0.1f, 15, 1);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        memset(bytes, 0, sizeof bytes);
        b->d = b->dmin = qr_f16_scale(0.f);
        if (max_scale > 0) {
            const float iscale = 15.f / max_scale;
            for (int j = 0; j < 16; ++j) bytes[j] = (uint8_t)qr_nearest_int(iscale * scales[j]);
            b->d = qr_f16_scale(max_scale / 15.f);
        }
        if (max_min > 0) {
            const float iscale = 15.f / max_min;
            for (int j = 0; j < 16; ++j) bytes[j] |= (uint8_t)((unsigned)qr_nearest_int(iscale * mins[j]) << 4);
            b->dmin = qr_f16_scale(max_min / 15.f);
        }
    } else {
        /* importance: weights qw*sqrt(sigma^2 + x^2), squared-error fit, then fit the 4-bit codes */
        float sumx2 = 0, sw[16];
        for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
        const float sigma2 = sumx2 / QK_K;
        for (int j = 0; j < 16; ++j) {
            sw[j] = 0;
            for (int l = 0; l < 16; ++l) w[l] = qw[16 * j + l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
            for (int l = 0; l < 16; ++l) sw[j] += w[l];
            scales[j] = make_qkx(16, 3, x + 16 * j, w, b->q + 16 * j, &mins[j], -0.9f, 0.05f, 36, 0);
        }
        uint8_t ls[16], lm[16];
        b->d = qr_f16_scale(make_qp(16, 15, scales, ls, sw));
        b->dmin = qr_f16_scale(make_qp(16, 15, mins, lm, sw));
        for (int j = 0; j < 16; ++j) bytes[j] = (uint8_t)(ls[j] | (lm[j] << 4));
    }
    for (int j = 0; j < 16; ++j) { b->sc[j] = bytes[j] & 0xF; b->mn[j] = bytes[j] >> 4; }
}

/* Q3_K: 16 symmetric sub-blocks of 16, signed 6-bit scale codes (stored +32). */
QR_HD void quant_q3k(const float *x, const float *qw, kblock *b) {
    float scales[16];
    int8_t L[QK_K];
    if (!qw) {
        float max_scale = 0, amax = 0;
        for (int j = 0; j < 16; ++j) {
            scales[j] = make_q3(16, 4, x + 16 * j, L + 16 * j);
            if (fabsf(scales[j]) > amax) { amax = fabsf(scales[j]); max_scale = scales[j]; }
        }
        memset(b->sc, 0, 16);
        b->d = qr_f16_scale(0.f);
        if (max_scale != 0) {
            const float iscale = -32.f / max_scale;
            for (int j = 0; j < 16; ++j) {
                const int8_t l = (int8_t)qr_nearest_int(iscale * scales[j]);
                b->sc[j] = (uint8_t)(qr_clampi(l, -32, 31) + 32);
            }
            b->d = qr_f16_scale(1 / iscale);
        }
    } else {
        float sumx2 = 0, w[16], sw[16];
        for (int j = 0; j < QK_K; ++j) sumx2 += x[j] * x[j];
        const float sigma2 = 2 * sumx2 / QK_K;
        for (int j = 0; j < 16; ++j) {
            for (int l = 0; l < 16; ++l) w[l] = qw[16 * j + l] * sqrtf(sigma2 + x[16 * j + l] * x[16 * j + l]);
            float sumw = 0;
            for (int l = 0; l < 16; ++l) sumw += w[l];
            sw[j] = sumw;
            scales[j] = make_qx(16, 4, x + 16 * j, L + 16 * j, w);
        }
        int8_t ls[16];  /* make_qx's codes are already offset by 32: exactly the stored 6-bit code */
        b->d = qr_f16_scale(make_qx(16, 32, scales, ls, sw));
        for (int j = 0; j < 16; ++j) b->sc[j] = (uint8_t)ls[j];
    }
    for (int i = 0; i < QK_K; ++i) b->q[i] = (uint8_t)L[i];
}

/* Q4_K (nmax 15) / Q5_K (nmax 31): nsub = 8 affine sub-blocks of 32, 6-bit scale and min codes.
 * QR5_K128 is Q5_K's search on nsub = 4 (128 weights): sigma^2 over its own 128, codes clamped to 63 and
 * kept as they are (its scale layout has no spill to emulate). */
QR_HD void quant_k4(const float *x, const float *qw, kblock *b, int nmax, int nsub) {
    const int q5 = nmax == 31, n = 32 * nsub;
    float scales[8], mins[8], w[32];
    uint8_t ls[8], lm[8], packed[12];
    if (!qw) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < nsub; ++j) {
            const float *xj = x + 32 * j;
            float sum_x2 = 0;
            for (int l = 0; l < 32; ++l) sum_x2 += xj[l] * xj[l];
            const float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; ++l) w[l] = av_x + fabsf(xj[l]);
            scales[j] = make_qkx(32, nmax, xj, w, b->q + 32 * j, &mins[j],
                                 q5 ? -0.5f : -1.f, 0.1f, q5 ? 15 : 20, 0);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        for (int j = 0; j < nsub; ++j) {  /* ggml truncates to uint8 before clamping */
            ls[j] = (uint8_t)qr_imin(63, (uint8_t)qr_nearest_int(inv_scale * scales[j]));
            lm[j] = (uint8_t)qr_imin(63, (uint8_t)qr_nearest_int(inv_min * mins[j]));
        }
        b->d = qr_f16_scale(max_scale / 63.f);
        b->dmin = qr_f16_scale(max_min / 63.f);
    } else {
        float sum_x2 = 0, sw[8];
        for (int l = 0; l < n; ++l) sum_x2 += x[l] * x[l];
        const float sigma2 = 2 * sum_x2 / n;
        for (int j = 0; j < nsub; ++j) {
            const float *xj = x + 32 * j;
            for (int l = 0; l < 32; ++l) w[l] = qw[32 * j + l] * sqrtf(sigma2 + xj[l] * xj[l]);
            float sumw = 0;
            for (int l = 0; l < 32; ++l) sumw += w[l];
            sw[j] = sumw;
            scales[j] = make_qkx(32, nmax, xj, w, b->q + 32 * j, &mins[j], -0.9f, 0.05f, 36, 0);
        }
        b->d = qr_f16_scale(make_qp(nsub, 63, scales, ls, sw));
        b->dmin = qr_f16_scale(make_qp(nsub, 63, mins, lm, sw));
        if (q5)  /* only ggml's Q5_K clamps here; Q4_K packs make_qp's codes as they are */
            for (int j = 0; j < nsub; ++j) { ls[j] = (uint8_t)qr_imin(63, ls[j]); lm[j] = (uint8_t)qr_imin(63, lm[j]); }
    }
    if (nsub == 8) {  /* decode from the packed bytes: identical to ggml even if a degenerate code spilled */
        put_scales_k4(packed, ls, lm);
        get_scales_k4(packed, b->sc, b->mn);
    } else {
        memcpy(b->sc, ls, (size_t)nsub);
        memcpy(b->mn, lm, (size_t)nsub);
    }
}
QR_HD void quant_q4k(const float *x, const float *qw, kblock *b) { quant_k4(x, qw, b, 15, 8); }
QR_HD void quant_q5k(const float *x, const float *qw, kblock *b) { quant_k4(x, qw, b, 31, 8); }

/* Q6_K: 16 symmetric sub-blocks of 16, int8 scale codes. The imatrix is used as the weights as is. */
QR_HD void quant_q6k(const float *x, const float *qw, kblock *b) {
    float scales[16], max_scale = 0, max_abs_scale = 0;
    int8_t L[QK_K];
    for (int j = 0; j < 16; ++j) {
        scales[j] = make_qx(16, 32, x + 16 * j, L + 16 * j, qw ? qw + 16 * j : NULL);
        if (fabsf(scales[j]) > max_abs_scale) { max_abs_scale = fabsf(scales[j]); max_scale = scales[j]; }
    }
    if (max_abs_scale < GROUP_MAX_EPS) { memset(b, 0, sizeof *b); return; }  /* ggml zeroes the block */
    const float iscale = -128.f / max_scale;
    b->d = qr_f16_scale(1 / iscale);
    for (int j = 0; j < 16; ++j) b->sc[j] = (uint8_t)(int8_t)qr_imin(127, qr_nearest_int(iscale * scales[j]));
    for (int i = 0; i < QK_K; ++i) b->q[i] = (uint8_t)L[i];
}

/* ---- per-type table and the block entry points ------------------------------------------------ */

typedef struct {
    int type, nsub;
    int size;                /* bytes per block */
    int qmax, scmax, mnmax;  /* largest legal code; mnmax 0: no mins (symmetric type) */
    int qoff;                /* symmetric types: weight = d * scale * (q - qoff) */
    int n;                   /* weights per super-block: QK_K, or 128 for QR5_K128 */
} kinfo;

/* the geometry of a K type; .type == -1 for any other type */
QR_HD kinfo qrk_info(int type) {
    kinfo k = {-1, 0, 0, 0, 0, 0, 0, 0};
    switch (type) {
    case QR_Q2_K: { const kinfo v = {QR_Q2_K, 16, 84, 3, 15, 15, 0, QK_K}; k = v; break; }
    case QR_Q3_K: { const kinfo v = {QR_Q3_K, 16, 110, 7, 63, 0, 4, QK_K}; k = v; break; }
    case QR_Q4_K: { const kinfo v = {QR_Q4_K, 8, 144, 15, 63, 63, 0, QK_K}; k = v; break; }
    case QR_Q5_K: { const kinfo v = {QR_Q5_K, 8, 176, 31, 63, 63, 0, QK_K}; k = v; break; }
    case QR_Q6_K: { const kinfo v = {QR_Q6_K, 16, 210, 63, 255, 0, 32, QK_K}; k = v; break; }
    case QR_QR5_K128: { const kinfo v = {QR_QR5_K128, 4, QR5_K128_SIZE, 31, 63, 63, 0, 128}; k = v; break; }
    default: break;
    }
    return k;
}

QR_HD void kquant(const kinfo *k, const float *x, const float *qw, kblock *b) {
    switch (k->type) {
    case QR_Q2_K: quant_q2k(x, qw, b); break;
    case QR_Q3_K: quant_q3k(x, qw, b); break;
    case QR_Q4_K: quant_q4k(x, qw, b); break;
    case QR_Q5_K: quant_q5k(x, qw, b); break;
    case QR_QR5_K128: quant_k4(x, qw, b, 31, 4); break;
    default: quant_q6k(x, qw, b); break;
    }
}

QR_HD void kwrite(const kinfo *k, const kblock *b, uint8_t *y) {
    switch (k->type) {
    case QR_Q2_K: write_q2k(b, y); break;
    case QR_Q3_K: write_q3k(b, y); break;
    case QR_Q4_K: write_q4k(b, y); break;
    case QR_Q5_K: write_q5k(b, y); break;
    case QR_QR5_K128: write_qr5k128(b, y); break;
    default: write_q6k(b, y); break;
    }
}

QR_HD void kread(const kinfo *k, const uint8_t *y, kblock *b) {
    switch (k->type) {
    case QR_Q2_K: read_q2k(y, b); break;
    case QR_Q3_K: read_q3k(y, b); break;
    case QR_Q4_K: read_q4k(y, b); break;
    case QR_Q5_K: read_q5k(y, b); break;
    case QR_QR5_K128: read_qr5k128(y, b); break;
    default: read_q6k(y, b); break;
    }
}

/* the signed multiplier a scale code stands for */
QR_HD int sub_scale(const kinfo *k, uint8_t c) {
    return k->type == QR_Q3_K ? c - 32 : k->type == QR_Q6_K ? (int8_t)c : c;
}

/* ggml's last step: re-round every weight against the final (fp16 / code-rounded) scales. A
 * sub-block whose effective scale is zero keeps the search's codes. */
QR_HD void requantize(const kinfo *k, const float *x, kblock *b) {
    const int sub = k->n / k->nsub;
    const float d = qr_f16_to_f32(b->d), dmin = qr_f16_to_f32(b->dmin);
    for (int j = 0; j < k->nsub; ++j) {
        const float dl = d * sub_scale(k, b->sc[j]);
        if (!dl) continue;
        const float *xj = x + sub * j;
        uint8_t *q = b->q + sub * j;
        if (k->mnmax) {
            const float dm = dmin * b->mn[j];
            for (int i = 0; i < sub; ++i) q[i] = (uint8_t)qr_clampi(qr_nearest_int((xj[i] + dm) / dl), 0, k->qmax);
        } else {
            for (int i = 0; i < sub; ++i)
                q[i] = (uint8_t)(qr_clampi(qr_nearest_int(xj[i] / dl), -k->qoff, k->qmax - k->qoff) + k->qoff);
        }
    }
}

/* Quantize one super-block x[k->n] into y; qw: its k->n importance weights or NULL (round to nearest). */
QR_HD void qrk_quant_block(const kinfo *k, const float *x, const float *qw, uint8_t *y) {
    kblock b;
    memset(&b, 0, sizeof b);
    kquant(k, x, qw, &b);
    requantize(k, x, &b);
    kwrite(k, &b, y);
}

/* same products in the same order as ggml's dequantize_row_q*_K */
QR_HD void qrk_dequant_block(const kinfo *k, const uint8_t *x, float *y) {
    const int sub = k->n / k->nsub;
    kblock b;
    memset(&b, 0, sizeof b);
    kread(k, x, &b);
    const float d = qr_f16_to_f32(b.d), dmin = qr_f16_to_f32(b.dmin);
    for (int j = 0; j < k->nsub; ++j, y += sub) {
        const float dl = qr_fmul(d, (float)sub_scale(k, b.sc[j]));
        const uint8_t *q = b.q + sub * j;
        if (k->mnmax) {
            const float ml = qr_fmul(dmin, (float)b.mn[j]);
            for (int l = 0; l < sub; ++l) y[l] = qr_fsub(qr_fmul(dl, (float)q[l]), ml);
        } else {
            for (int l = 0; l < sub; ++l) y[l] = qr_fmul(dl, (float)(q[l] - k->qoff));
        }
    }
}

/* Pack one super-block from caller-chosen codes: q[k->n], sc[nsub], mn[nsub] (types with mins, else
 * ignored), d and dmin fp16 bits. QR_E_ARG if a code is out of the type's range (nothing written). */
QR_HD int qrk_pack_block(const kinfo *k, const uint8_t *q, uint16_t d, uint16_t dmin, const uint8_t *sc,
                         const uint8_t *mn, uint8_t *y) {
    kblock b;
    memset(&b, 0, sizeof b);
    for (int l = 0; l < k->n; ++l) if (q[l] > k->qmax) return QR_E_ARG;
    for (int j = 0; j < k->nsub; ++j) if (sc[j] > k->scmax || (k->mnmax && mn[j] > k->mnmax)) return QR_E_ARG;
    memcpy(b.q, q, (size_t)k->n);
    memcpy(b.sc, sc, (size_t)k->nsub);
    b.d = d;
    if (k->mnmax) { memcpy(b.mn, mn, (size_t)k->nsub); b.dmin = dmin; }
    kwrite(k, &b, y);
    return QR_OK;
}

/* Inverse of qrk_pack_block. */
QR_HD void qrk_unpack_block(const kinfo *k, const uint8_t *x, uint8_t *q, uint16_t *d, uint16_t *dmin,
                            uint8_t *sc, uint8_t *mn) {
    kblock b;
    memset(&b, 0, sizeof b);
    kread(k, x, &b);
    memcpy(q, b.q, (size_t)k->n);
    memcpy(sc, b.sc, (size_t)k->nsub);
    *d = b.d;
    if (k->mnmax) { memcpy(mn, b.mn, (size_t)k->nsub); *dmin = b.dmin; }
}

#endif
