/* Per-block math of the legacy 32-weight codecs (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL), shared by the
 * C row drivers (native/quant_legacy.c) and the CUDA kernels (native/codec_cuda.cu): one source of
 * truth, so both produce the same bytes by construction (see native/qr_hd.h for the numerics rules).
 *
 * Formats and algorithms follow ggml (ggml-common.h block layouts, ggml-quants.c quantizers), and the
 * output is bit-exact with ggml_quantize_chunk with and without an importance matrix. That is why the
 * float code below keeps ggml's exact operation order (products grouped as ggml groups them, 1/d
 * taken once and multiplied, int->float conversions at the same places): reordering any of it moves
 * rounding and flips codes near ties.
 *
 * Every quantizer reduces a block to (d, m, codes L[32]) and hands it to one store routine, which
 * qr_pack shares, so the bytes of a block are written in exactly one place.
 *
 * Must stay valid C11 and CUDA C++: no function pointers, no file-scope tables (device code cannot read
 * host statics), explicit casts from void *.
 */
#ifndef QR_BLOCKS_LEGACY_H
#define QR_BLOCKS_LEGACY_H
#include <float.h>
#include "qr_hd.h"
#include "qr_types.h"

#define QRL_QB 32               /* weights per block, all six types */
#define QRL_EPS_ZERO 1e-15f     /* ggml's GROUP_MAX_EPS: below this a block counts as all zero */

/* ---- block layouts ---------------------------------------------------------------------------- */

typedef struct {
    int type;
    int bits;       /* 4, 5 or 8 bits per code */
    int has_m;      /* fp16 min after d (Q4_1, Q5_1) */
    int size;       /* bytes per block */
} qrl_fmt;

/* the layout of a legacy type; .type == -1 for any other type */
QR_HD qrl_fmt qrl_format(int type) {
    qrl_fmt f = {-1, 0, 0, 0};
    switch (type) {
    case QR_Q4_0: f.bits = 4; f.has_m = 0; f.size = 18; break;
    case QR_Q4_1: f.bits = 4; f.has_m = 1; f.size = 20; break;
    case QR_Q5_0: f.bits = 5; f.has_m = 0; f.size = 22; break;
    case QR_Q5_1: f.bits = 5; f.has_m = 1; f.size = 24; break;
    case QR_Q8_0: f.bits = 8; f.has_m = 0; f.size = 34; break;
    case QR_IQ4_NL: f.bits = 4; f.has_m = 0; f.size = 18; break;
    default: return f;
    }
    f.type = type;
    return f;
}

/* Byte layout: d (fp16 LE) [m (fp16 LE)] [qh: bit i = bit 4 of code i] qs.
 * 4/5-bit qs: byte j holds code j in the low nibble and code j+16 in the high one. */
QR_HD void qrl_store_block(const qrl_fmt *f, uint16_t d, uint16_t m, const uint8_t *L, uint8_t *y) {
    y[0] = (uint8_t)d; y[1] = (uint8_t)(d >> 8); y += 2;
    if (f->has_m) { y[0] = (uint8_t)m; y[1] = (uint8_t)(m >> 8); y += 2; }
    if (f->bits == 8) { memcpy(y, L, QRL_QB); return; }
    if (f->bits == 5) {
        uint32_t qh = 0;
        for (int j = 0; j < QRL_QB; ++j) qh |= (uint32_t)((L[j] >> 4) & 1) << j;
        for (int k = 0; k < 4; ++k) y[k] = (uint8_t)(qh >> 8 * k);
        y += 4;
    }
    for (int j = 0; j < QRL_QB / 2; ++j) y[j] = (uint8_t)((L[j] & 15) | (L[j + QRL_QB / 2] & 15) << 4);
}

QR_HD void qrl_load_block(const qrl_fmt *f, const uint8_t *x, uint16_t *d, uint16_t *m, uint8_t *L) {
    *d = (uint16_t)(x[0] | x[1] << 8); x += 2;
    if (f->has_m) { *m = (uint16_t)(x[0] | x[1] << 8); x += 2; }
    if (f->bits == 8) { memcpy(L, x, QRL_QB); return; }
    uint32_t qh = 0;
    if (f->bits == 5) {
        for (int k = 0; k < 4; ++k) qh |= (uint32_t)x[k] << 8 * k;
        x += 4;
    }
    for (int j = 0; j < QRL_QB / 2; ++j) {
        L[j] = (uint8_t)((x[j] & 15) | ((qh >> j) & 1) << 4);
        L[j + QRL_QB / 2] = (uint8_t)((x[j] >> 4) | ((qh >> (j + QRL_QB / 2)) & 1) << 4);
    }
}

/* IQ4_NL's 16 levels (ggml kvalues_iq4nl); a function, not a table, so device code can read it */
QR_HD int qrl_iq4nl_value(int i) {
    const int8_t v[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
    return v[i & 15];
}

/* ---- shared helpers --------------------------------------------------------------------------- */

/* The entry of largest magnitude, signed; the first one wins ties (ggml scans with a strict '>'). */
QR_HD float qrl_signed_absmax(const float *x, float *amax_out) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QRL_QB; ++j)
        if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
    if (amax_out) *amax_out = amax;
    return max;
}

/* ggml's importance weights for the legacy types: imatrix scaled by sqrt(sigma2 + x^2), where sigma2
 * is the row's (Q4/Q5) or block's (IQ4_NL) mean square. */
QR_HD void qrl_importance(const float *x, const float *qw, float sigma2, float *w) {
    for (int j = 0; j < QRL_QB; ++j) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
}

/* The row's mean square, summed in ggml's order (Q4_0/Q4_1/Q5_0/Q5_1 with an imatrix). */
QR_HD float qrl_row_sigma2(const float *x, int64_t n) {
    float sum_x2 = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
    return sum_x2 / (float)n;
}

/* ---- round to nearest (ggml's quantize_row_*_ref) --------------------------------------------- */

/* Symmetric: d = -max/half, so the largest-magnitude weight lands exactly on code 0 and the codes of
 * the opposite sign get the extra level. Code = trunc(x/d + half + 0.5), capped at 2*half-1. */
QR_HD uint16_t qrl_rtn_sym(const float *x, int half, uint8_t *L) {
    const float d = qrl_signed_absmax(x, NULL) / (float)-half;
    const float id = d ? 1.0f / d : 0.0f;
    const float off = (float)half + 0.5f;
    for (int j = 0; j < QRL_QB; ++j) L[j] = (uint8_t)qr_clampi((int8_t)qr_ftoi(x[j] * id + off), 0, 2 * half - 1);
    return qr_f16_scale(d);
}

/* Affine: d spans [min, max] in nmax steps; m = min. */
QR_HD void qrl_rtn_affine(const float *x, int nmax, uint8_t *L, uint16_t *dh, uint16_t *mh) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < QRL_QB; ++j) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
    }
    const float d = (max - min) / (float)nmax;
    const float id = d ? 1.0f / d : 0.0f;
    /* (x - min)*id is in [0, nmax] up to rounding; truncating +0.5 is ggml's round half up */
    for (int j = 0; j < QRL_QB; ++j) L[j] = (uint8_t)qr_clampi(qr_ftoi((x[j] - min) * id + 0.5f), 0, nmax);
    *dh = qr_f16_scale(d);
    *mh = qr_f16_scale(min);
}

QR_HD uint16_t qrl_rtn_q8_0(const float *x, uint8_t *L) {
    float amax = 0.0f;
    for (int j = 0; j < QRL_QB; ++j) amax = amax > fabsf(x[j]) ? amax : fabsf(x[j]);
    const float d = amax / 127.0f;
    const float id = d ? 1.0f / d : 0.0f;
    for (int j = 0; j < QRL_QB; ++j) L[j] = (uint8_t)(int8_t)qr_ftoi(roundf(x[j] * id));   /* half away from zero */
    return qr_f16_scale(d);
}

/* ---- importance-weighted search (ggml's quantize_row_*_impl) ---------------------------------- */

/* Symmetric codes l in [-nmax, nmax-1] (stored l+nmax). Tries the inverse scales -(nmax + 0.1*is)/max,
 * is = 0, +-1..+-9, rounds every weight for each, and keeps the one maximizing (sum w x l)^2 / sum w l^2,
 * i.e. the least weighted squared error once d is the least-squares scale sum(w x l)/sum(w l^2).
 * Returns that d. (ggml's make_qx_quants, rmse_type 1 with weights.) */
QR_HD float qrl_search_sym(const float *x, const float *w, int nmax, uint8_t *L) {
    float amax;
    const float max = qrl_signed_absmax(x, &amax);
    if (amax < QRL_EPS_ZERO) { memset(L, 0, QRL_QB); return 0.0f; }
    float iscale = (float)-nmax / max, sumlx = 0.0f, suml2 = 0.0f;
    for (int j = 0; j < QRL_QB; ++j) {
        const int l = qr_clampi(qr_nearest_int(iscale * x[j]), -nmax, nmax - 1);
        L[j] = (uint8_t)(l + nmax);
        sumlx += w[j] * x[j] * (float)l;
        suml2 += w[j] * (float)l * (float)l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)is) / max;
        sumlx = suml2 = 0.0f;
        for (int j = 0; j < QRL_QB; ++j) {
            const float l = (float)qr_clampi(qr_nearest_int(iscale * x[j]), -nmax, nmax - 1);
            sumlx += w[j] * x[j] * l;
            suml2 += w[j] * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int j = 0; j < QRL_QB; ++j) L[j] = (uint8_t)(qr_clampi(qr_nearest_int(iscale * x[j]), -nmax, nmax - 1) + nmax);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Affine codes 0..nmax with x ~ d*l + m, m <= 0. For each of 37 candidate inverse scales
 * (nmax - 0.9 + 0.05*is)/(max - min) it rounds, then solves the 2x2 weighted least squares for (d, m)
 * (m pinned to 0 if it comes out positive) and keeps the lowest weighted squared error.
 * The starting point is plain min/max rounding. (ggml's make_qkx3_quants, nstep 36, squared error.) */
QR_HD float qrl_search_affine(const float *x, const float *w, int nmax, uint8_t *L, float *m_out) {
    uint8_t Laux[QRL_QB];
    float min = x[0], max = x[0], sum_w = w[0], sum_x = sum_w * x[0];
    for (int j = 1; j < QRL_QB; ++j) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
        sum_w += w[j];
        sum_x += w[j] * x[j];
    }
    if (min > 0) min = 0;
    if (max <= min) { memset(L, 0, QRL_QB); *m_out = min; return 0.0f; }
    float iscale = (float)nmax / (max - min), scale = 1 / iscale, best_err = 0.0f;
    for (int j = 0; j < QRL_QB; ++j) {
        L[j] = (uint8_t)qr_clampi(qr_nearest_int(iscale * (x[j] - min)), 0, nmax);
        const float diff = scale * (float)L[j] + min - x[j];
        best_err += w[j] * (diff * diff);
    }
    for (int is = 0; is <= 36; ++is) {
        iscale = (-0.9f + 0.05f * (float)is + (float)nmax) / (max - min);
        float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
        for (int j = 0; j < QRL_QB; ++j) {
            const int l = qr_clampi(qr_nearest_int(iscale * (x[j] - min)), 0, nmax);
            Laux[j] = (uint8_t)l;
            sum_l += w[j] * (float)l;
            sum_l2 += w[j] * (float)l * (float)l;
            sum_xl += w[j] * (float)l * x[j];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (!(D > 0)) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        if (this_min > 0) { this_min = 0; this_scale = sum_xl / sum_l2; }
        float err = 0.0f;
        for (int j = 0; j < QRL_QB; ++j) {
            const float diff = this_scale * (float)Laux[j] + this_min - x[j];
            err += w[j] * (diff * diff);
        }
        if (err < best_err) { memcpy(L, Laux, QRL_QB); best_err = err; scale = this_scale; min = this_min; }
    }
    *m_out = min;
    return scale;
}

/* Index of the IQ4_NL value nearest to v; an exact midpoint goes to the upper value. */
QR_HD int qrl_iq4nl_index(float v) {
    if (v <= qrl_iq4nl_value(0)) return 0;
    if (v >= qrl_iq4nl_value(15)) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (v < qrl_iq4nl_value(mid)) hi = mid; else lo = mid;
    }
    return v - qrl_iq4nl_value(hi - 1) < qrl_iq4nl_value(hi) - v ? hi - 1 : hi;
}

/* IQ4_NL always searches, imatrix or not (weights x^2 without one): 15 inverse scales
 * (-127 + t)/max, t = -7..7, each scored by the weighted least-squares fit (sum w q x)^2 / sum w q^2,
 * plus the starting scale max/127. The codes are then re-rounded against the winning fp32 d.
 * (ggml's quantize_row_iq4_nl_impl with one 32-weight block and ntry 7.) */
QR_HD uint16_t qrl_search_iq4nl(const float *x, const float *qw, uint8_t *L) {
    float w[QRL_QB], sigma2 = 0.0f, amax;
    for (int j = 0; j < QRL_QB; ++j) sigma2 += x[j] * x[j];
    sigma2 *= 2.f / QRL_QB;
    if (qw) qrl_importance(x, qw, sigma2, w);
    else for (int j = 0; j < QRL_QB; ++j) w[j] = x[j] * x[j];
    const float max = qrl_signed_absmax(x, &amax);
    float d = 0.0f;
    if (amax >= QRL_EPS_ZERO) {
        d = -max / (float)qrl_iq4nl_value(0);
        float id = 1 / d, sumqx = 0.0f, sumq2 = 0.0f;
        for (int j = 0; j < QRL_QB; ++j) {
            const float q = (float)qrl_iq4nl_value(qrl_iq4nl_index(id * x[j]));
            sumqx += w[j] * q * x[j];
            sumq2 += w[j] * q * q;
        }
        d = sumq2 > 0 ? sumqx / sumq2 : 0.0f;
        float best = d * sumqx;
        for (int t = -7; t <= 7; ++t) {
            id = (float)(t + qrl_iq4nl_value(0)) / max;
            sumqx = sumq2 = 0.0f;
            for (int j = 0; j < QRL_QB; ++j) {
                const float q = (float)qrl_iq4nl_value(qrl_iq4nl_index(id * x[j]));
                sumqx += w[j] * q * x[j];
                sumq2 += w[j] * q * q;
            }
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) { d = sumqx / sumq2; best = d * sumqx; }
        }
    }
    const float id = d ? 1 / d : 0.0f;
    for (int j = 0; j < QRL_QB; ++j) L[j] = (uint8_t)qrl_iq4nl_index(id * x[j]);
    return qr_f16_scale(d);
}

/* ---- block entry points ----------------------------------------------------------------------- */

/* Quantize one block x[32] into y. imatrix: this block's 32 importance weights or NULL; sigma2: the
 * row's qrl_row_sigma2 (read only for Q4_0/Q4_1/Q5_0/Q5_1 with an imatrix). Q8_0 ignores the imatrix,
 * as in ggml; IQ4_NL takes it per block. */
QR_HD void qrl_quant_block(const qrl_fmt *f, const float *x, const float *imatrix, float sigma2, uint8_t *y) {
    const int weighted = imatrix && f->type != QR_Q8_0 && f->type != QR_IQ4_NL;
    float w[QRL_QB];
    uint8_t L[QRL_QB];
    uint16_t d = 0, m = 0;
    if (weighted) qrl_importance(x, imatrix, sigma2, w);
    switch (f->type) {
    case QR_Q4_0:
    case QR_Q5_0: {
        const int half = f->bits == 4 ? 8 : 16;
        d = weighted ? qr_f16_scale(qrl_search_sym(x, w, half, L)) : qrl_rtn_sym(x, half, L);
        break;
    }
    case QR_Q4_1:
    case QR_Q5_1: {
        const int nmax = f->bits == 4 ? 15 : 31;
        if (!weighted) { qrl_rtn_affine(x, nmax, L, &d, &m); break; }
        float min;
        d = qr_f16_scale(qrl_search_affine(x, w, nmax, L, &min));
        m = qr_f16_scale(min);
        break;
    }
    case QR_Q8_0: d = qrl_rtn_q8_0(x, L); break;
    default: d = qrl_search_iq4nl(x, imatrix, L); break;
    }
    qrl_store_block(f, d, m, L, y);
}

/* Dequantized value = level(code) * d (+ m): the level is the signed integer (or the IQ4_NL table
 * entry) that ggml multiplies by d, as a float, in ggml's operand order. */
QR_HD void qrl_dequant_block(const qrl_fmt *f, const uint8_t *x, float *y) {
    uint8_t L[QRL_QB];
    uint16_t dh, mh = 0;
    qrl_load_block(f, x, &dh, &mh, L);
    const float d = qr_f16_to_f32(dh), m = qr_f16_to_f32(mh);
    for (int j = 0; j < QRL_QB; ++j) {
        switch (f->type) {
        case QR_Q4_0: y[j] = qr_fmul((float)(L[j] - 8), d); break;
        case QR_Q5_0: y[j] = qr_fmul((float)(L[j] - 16), d); break;
        case QR_Q8_0: y[j] = qr_fmul((float)(int8_t)L[j], d); break;
        case QR_IQ4_NL: y[j] = qr_fmul(d, (float)qrl_iq4nl_value(L[j])); break;
        default: y[j] = qr_fadd(qr_fmul((float)L[j], d), m); break;   /* Q4_1, Q5_1 */
        }
    }
}

/* Pack one block from caller-chosen codes; QR_E_ARG if a code is out of the type's range. */
QR_HD int qrl_pack_block(const qrl_fmt *f, const uint8_t *q, uint16_t d, uint16_t dmin, uint8_t *y) {
    const unsigned limit = 1u << f->bits;
    for (int j = 0; j < QRL_QB; ++j)
        if (q[j] >= limit) return QR_E_ARG;
    qrl_store_block(f, d, f->has_m ? dmin : 0, q, y);
    return QR_OK;
}

#endif
