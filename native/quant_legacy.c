/* Legacy 32-weight block codecs: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL.
 *
 * Formats and algorithms follow ggml (ggml-common.h block layouts, ggml-quants.c quantizers), and the
 * output is bit-exact with ggml_quantize_chunk with and without an importance matrix. That is why the
 * float code below keeps ggml's exact operation order (products grouped as ggml groups them, 1/d
 * taken once and multiplied, int->float conversions at the same places): reordering any of it moves
 * rounding and flips codes near ties. Build with -ffp-contract=off for the same reason.
 *
 * Every quantizer reduces a block to (d, m, codes L[32]) and hands it to one store routine, which
 * qr_pack shares, so the bytes of a block are written in exactly one place.
 */
#include <float.h>
#include "internal.h"

#define QB 32               /* weights per block, all six types */
#define EPS_ZERO 1e-15f     /* ggml's GROUP_MAX_EPS: below this a block counts as all zero */

/* ---- block layouts ---------------------------------------------------------------------------- */

typedef struct {
    int type;
    int bits;       /* 4, 5 or 8 bits per code */
    int has_m;      /* fp16 min after d (Q4_1, Q5_1) */
    size_t size;    /* bytes per block */
} fmt;

/* Byte layout: d (fp16 LE) [m (fp16 LE)] [qh: bit i = bit 4 of code i] qs.
 * 4/5-bit qs: byte j holds code j in the low nibble and code j+16 in the high one. */
static void store_block(const fmt *f, uint16_t d, uint16_t m, const uint8_t *L, uint8_t *y) {
    y[0] = (uint8_t)d; y[1] = (uint8_t)(d >> 8); y += 2;
    if (f->has_m) { y[0] = (uint8_t)m; y[1] = (uint8_t)(m >> 8); y += 2; }
    if (f->bits == 8) { memcpy(y, L, QB); return; }
    if (f->bits == 5) {
        uint32_t qh = 0;
        for (int j = 0; j < QB; ++j) qh |= (uint32_t)((L[j] >> 4) & 1) << j;
        for (int k = 0; k < 4; ++k) y[k] = (uint8_t)(qh >> 8 * k);
        y += 4;
    }
    for (int j = 0; j < QB / 2; ++j) y[j] = (uint8_t)((L[j] & 15) | (L[j + QB / 2] & 15) << 4);
}

static void load_block(const fmt *f, const uint8_t *x, uint16_t *d, uint16_t *m, uint8_t *L) {
    *d = (uint16_t)(x[0] | x[1] << 8); x += 2;
    if (f->has_m) { *m = (uint16_t)(x[0] | x[1] << 8); x += 2; }
    if (f->bits == 8) { memcpy(L, x, QB); return; }
    uint32_t qh = 0;
    if (f->bits == 5) {
        for (int k = 0; k < 4; ++k) qh |= (uint32_t)x[k] << 8 * k;
        x += 4;
    }
    for (int j = 0; j < QB / 2; ++j) {
        L[j] = (uint8_t)((x[j] & 15) | ((qh >> j) & 1) << 4);
        L[j + QB / 2] = (uint8_t)((x[j] >> 4) | ((qh >> (j + QB / 2)) & 1) << 4);
    }
}

static const int8_t IQ4NL_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* ---- shared helpers --------------------------------------------------------------------------- */

/* The entry of largest magnitude, signed; the first one wins ties (ggml scans with a strict '>'). */
static float signed_absmax(const float *x, float *amax_out) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QB; ++j)
        if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
    if (amax_out) *amax_out = amax;
    return max;
}

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* ggml's importance weights for the legacy types: imatrix scaled by sqrt(sigma2 + x^2), where sigma2
 * is the row's (Q4/Q5) or block's (IQ4_NL) mean square. */
static void importance(const float *x, const float *qw, float sigma2, float *w) {
    for (int j = 0; j < QB; ++j) w[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
}

/* ---- round to nearest (ggml's quantize_row_*_ref) --------------------------------------------- */

/* Symmetric: d = -max/half, so the largest-magnitude weight lands exactly on code 0 and the codes of
 * the opposite sign get the extra level. Code = trunc(x/d + half + 0.5), capped at 2*half-1. */
static uint16_t rtn_sym(const float *x, int half, uint8_t *L) {
    const float d = signed_absmax(x, NULL) / (float)-half;
    const float id = d ? 1.0f / d : 0.0f;
    const float off = (float)half + 0.5f;
    for (int j = 0; j < QB; ++j) L[j] = (uint8_t)clampi((int8_t)(x[j] * id + off), 0, 2 * half - 1);
    return qr_f32_to_f16(d);
}

/* Affine: d spans [min, max] in nmax steps; m = min. */
static void rtn_affine(const float *x, int nmax, uint8_t *L, uint16_t *dh, uint16_t *mh) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < QB; ++j) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
    }
    const float d = (max - min) / (float)nmax;
    const float id = d ? 1.0f / d : 0.0f;
    /* (x - min)*id is in [0, nmax] up to rounding; truncating +0.5 is ggml's round half up */
    for (int j = 0; j < QB; ++j) L[j] = (uint8_t)clampi((int)((x[j] - min) * id + 0.5f), 0, nmax);
    *dh = qr_f32_to_f16(d);
    *mh = qr_f32_to_f16(min);
}

static uint16_t rtn_q8_0(const float *x, uint8_t *L) {
    float amax = 0.0f;
    for (int j = 0; j < QB; ++j) amax = amax > fabsf(x[j]) ? amax : fabsf(x[j]);
    const float d = amax / 127.0f;
    const float id = d ? 1.0f / d : 0.0f;
    for (int j = 0; j < QB; ++j) L[j] = (uint8_t)(int8_t)roundf(x[j] * id);   /* half away from zero */
    return qr_f32_to_f16(d);
}

/* ---- importance-weighted search (ggml's quantize_row_*_impl) ---------------------------------- */

/* Symmetric codes l in [-nmax, nmax-1] (stored l+nmax). Tries the inverse scales -(nmax + 0.1*is)/max,
 * is = 0, +-1..+-9, rounds every weight for each, and keeps the one maximizing (sum w x l)^2 / sum w l^2,
 * i.e. the least weighted squared error once d is the least-squares scale sum(w x l)/sum(w l^2).
 * Returns that d. (ggml's make_qx_quants, rmse_type 1 with weights.) */
static float search_sym(const float *x, const float *w, int nmax, uint8_t *L) {
    float amax;
    const float max = signed_absmax(x, &amax);
    if (amax < EPS_ZERO) { memset(L, 0, QB); return 0.0f; }
    float iscale = (float)-nmax / max, sumlx = 0.0f, suml2 = 0.0f;
    for (int j = 0; j < QB; ++j) {
        const int l = clampi(qr_nearest_int(iscale * x[j]), -nmax, nmax - 1);
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
        for (int j = 0; j < QB; ++j) {
            const float l = (float)clampi(qr_nearest_int(iscale * x[j]), -nmax, nmax - 1);
            sumlx += w[j] * x[j] * l;
            suml2 += w[j] * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int j = 0; j < QB; ++j) L[j] = (uint8_t)(clampi(qr_nearest_int(iscale * x[j]), -nmax, nmax - 1) + nmax);
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
static float search_affine(const float *x, const float *w, int nmax, uint8_t *L, float *m_out) {
    uint8_t Laux[QB];
    float min = x[0], max = x[0], sum_w = w[0], sum_x = sum_w * x[0];
    for (int j = 1; j < QB; ++j) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
        sum_w += w[j];
        sum_x += w[j] * x[j];
    }
    if (min > 0) min = 0;
    if (max <= min) { memset(L, 0, QB); *m_out = min; return 0.0f; }
    float iscale = (float)nmax / (max - min), scale = 1 / iscale, best_err = 0.0f;
    for (int j = 0; j < QB; ++j) {
        L[j] = (uint8_t)clampi(qr_nearest_int(iscale * (x[j] - min)), 0, nmax);
        const float diff = scale * (float)L[j] + min - x[j];
        best_err += w[j] * (diff * diff);
    }
    for (int is = 0; is <= 36; ++is) {
        iscale = (-0.9f + 0.05f * (float)is + (float)nmax) / (max - min);
        float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
        for (int j = 0; j < QB; ++j) {
            const int l = clampi(qr_nearest_int(iscale * (x[j] - min)), 0, nmax);
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
        for (int j = 0; j < QB; ++j) {
            const float diff = this_scale * (float)Laux[j] + this_min - x[j];
            err += w[j] * (diff * diff);
        }
        if (err < best_err) { memcpy(L, Laux, QB); best_err = err; scale = this_scale; min = this_min; }
    }
    *m_out = min;
    return scale;
}

/* Index of the IQ4_NL value nearest to v; an exact midpoint goes to the upper value. */
static int iq4nl_index(float v) {
    if (v <= IQ4NL_VALUES[0]) return 0;
    if (v >= IQ4NL_VALUES[15]) return 15;
    int lo = 0, hi = 15;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (v < IQ4NL_VALUES[mid]) hi = mid; else lo = mid;
    }
    return v - IQ4NL_VALUES[hi - 1] < IQ4NL_VALUES[hi] - v ? hi - 1 : hi;
}

/* IQ4_NL always searches, imatrix or not (weights x^2 without one): 15 inverse scales
 * (-127 + t)/max, t = -7..7, each scored by the weighted least-squares fit (sum w q x)^2 / sum w q^2,
 * plus the starting scale max/127. The codes are then re-rounded against the winning fp32 d.
 * (ggml's quantize_row_iq4_nl_impl with one 32-weight block and ntry 7.) */
static uint16_t search_iq4nl(const float *x, const float *qw, uint8_t *L) {
    float w[QB], sigma2 = 0.0f, amax;
    for (int j = 0; j < QB; ++j) sigma2 += x[j] * x[j];
    sigma2 *= 2.f / QB;
    if (qw) importance(x, qw, sigma2, w);
    else for (int j = 0; j < QB; ++j) w[j] = x[j] * x[j];
    const float max = signed_absmax(x, &amax);
    float d = 0.0f;
    if (amax >= EPS_ZERO) {
        d = -max / (float)IQ4NL_VALUES[0];
        float id = 1 / d, sumqx = 0.0f, sumq2 = 0.0f;
        for (int j = 0; j < QB; ++j) {
            const float q = IQ4NL_VALUES[iq4nl_index(id * x[j])];
            sumqx += w[j] * q * x[j];
            sumq2 += w[j] * q * q;
        }
        d = sumq2 > 0 ? sumqx / sumq2 : 0.0f;
        float best = d * sumqx;
        for (int t = -7; t <= 7; ++t) {
            id = (float)(t + IQ4NL_VALUES[0]) / max;
            sumqx = sumq2 = 0.0f;
            for (int j = 0; j < QB; ++j) {
                const float q = IQ4NL_VALUES[iq4nl_index(id * x[j])];
                sumqx += w[j] * q * x[j];
                sumq2 += w[j] * q * q;
            }
            if (sumq2 > 0 && sumqx * sumqx > best * sumq2) { d = sumqx / sumq2; best = d * sumqx; }
        }
    }
    const float id = d ? 1 / d : 0.0f;
    for (int j = 0; j < QB; ++j) L[j] = (uint8_t)iq4nl_index(id * x[j]);
    return qr_f32_to_f16(d);
}

/* ---- row entry points ------------------------------------------------------------------------- */

static const fmt FMTS[] = {
    {QR_Q4_0, 4, 0, 18}, {QR_Q4_1, 4, 1, 20}, {QR_Q5_0, 5, 0, 22},
    {QR_Q5_1, 5, 1, 24}, {QR_Q8_0, 8, 0, 34}, {QR_IQ4_NL, 4, 0, 18},
};

static void quantize_row(const fmt *f, const float *x, uint8_t *y, int64_t n, const float *imatrix) {
    /* Q8_0 ignores the imatrix, as in ggml; IQ4_NL takes it per block */
    const int weighted = imatrix && f->type != QR_Q8_0 && f->type != QR_IQ4_NL;
    float sigma2 = 0.0f, w[QB];
    if (weighted) {
        float sum_x2 = 0.0f;
        for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
        sigma2 = sum_x2 / (float)n;
    }
    for (int64_t ib = 0; ib < n / QB; ++ib, x += QB, y += f->size) {
        uint8_t L[QB];
        uint16_t d = 0, m = 0;
        if (weighted) importance(x, imatrix + ib * QB, sigma2, w);
        switch (f->type) {
        case QR_Q4_0:
        case QR_Q5_0: {
            const int half = f->bits == 4 ? 8 : 16;
            d = weighted ? qr_f32_to_f16(search_sym(x, w, half, L)) : rtn_sym(x, half, L);
            break;
        }
        case QR_Q4_1:
        case QR_Q5_1: {
            const int nmax = f->bits == 4 ? 15 : 31;
            if (!weighted) { rtn_affine(x, nmax, L, &d, &m); break; }
            float min;
            d = qr_f32_to_f16(search_affine(x, w, nmax, L, &min));
            m = qr_f32_to_f16(min);
            break;
        }
        case QR_Q8_0: d = rtn_q8_0(x, L); break;
        default: d = search_iq4nl(x, imatrix ? imatrix + ib * QB : NULL, L); break;
        }
        store_block(f, d, m, L, y);
    }
}

/* Dequantized value = level(code) * d (+ m): the level is the signed integer (or the IQ4_NL table
 * entry) that ggml multiplies by d, as a float, in ggml's operand order. */
static void dequantize_row(const fmt *f, const uint8_t *x, float *y, int64_t n) {
    for (int64_t ib = 0; ib < n / QB; ++ib, x += f->size, y += QB) {
        uint8_t L[QB];
        uint16_t dh, mh = 0;
        load_block(f, x, &dh, &mh, L);
        const float d = qr_f16_to_f32(dh), m = qr_f16_to_f32(mh);
        for (int j = 0; j < QB; ++j) {
            switch (f->type) {
            case QR_Q4_0: y[j] = (float)(L[j] - 8) * d; break;
            case QR_Q5_0: y[j] = (float)(L[j] - 16) * d; break;
            case QR_Q8_0: y[j] = (float)(int8_t)L[j] * d; break;
            case QR_IQ4_NL: y[j] = d * (float)IQ4NL_VALUES[L[j]]; break;
            default: y[j] = (float)L[j] * d + m; break;   /* Q4_1, Q5_1 */
            }
        }
    }
}

static int pack_row(const fmt *f, const uint8_t *q, const uint16_t *d, const uint16_t *dmin, uint8_t *y, int64_t n) {
    const unsigned limit = 1u << f->bits;
    for (int64_t ib = 0; ib < n / QB; ++ib, q += QB, y += f->size) {
        for (int j = 0; j < QB; ++j)
            if (q[j] >= limit) return QR_E_ARG;
        store_block(f, d[ib], f->has_m ? dmin[ib] : 0, q, y);
    }
    return QR_OK;
}

static void unpack_row(const fmt *f, const uint8_t *x, uint8_t *q, uint16_t *d, uint16_t *dmin, int64_t n) {
    for (int64_t ib = 0; ib < n / QB; ++ib, x += f->size, q += QB) {
        uint16_t m = 0;
        load_block(f, x, &d[ib], &m, q);
        if (f->has_m) dmin[ib] = m;
    }
}

/* qr_codec's row functions carry no type, so each type gets thin wrappers bound to its layout. */
#define ROW_FNS(name, idx)                                                                                   \
    static void name##_quant(const float *x, void *y, int64_t n, const float *im) {                         \
        quantize_row(&FMTS[idx], x, (uint8_t *)y, n, im);                                                    \
    }                                                                                                        \
    static void name##_dequant(const void *x, float *y, int64_t n) {                                        \
        dequantize_row(&FMTS[idx], (const uint8_t *)x, y, n);                                                \
    }                                                                                                        \
    static int name##_pack(const uint8_t *q, const uint16_t *d, const uint16_t *dmin, const uint8_t *sc,     \
                           const uint8_t *mn, void *y, int64_t n) {                                          \
        (void)sc; (void)mn;                                                                                  \
        if (FMTS[idx].has_m && !dmin) return QR_E_ARG;                                                       \
        return pack_row(&FMTS[idx], q, d, dmin, (uint8_t *)y, n);                                            \
    }                                                                                                        \
    static void name##_unpack(const void *x, uint8_t *q, uint16_t *d, uint16_t *dmin, uint8_t *sc,           \
                              uint8_t *mn, int64_t n) {                                                      \
        (void)sc; (void)mn;                                                                                  \
        unpack_row(&FMTS[idx], (const uint8_t *)x, q, d, dmin, n);                                           \
    }

ROW_FNS(q4_0, 0)
ROW_FNS(q4_1, 1)
ROW_FNS(q5_0, 2)
ROW_FNS(q5_1, 3)
ROW_FNS(q8_0, 4)
ROW_FNS(iq4_nl, 5)

const qr_codec *qr_codec_legacy(int type) {
    /* sizes and flags spelled out: a static initializer cannot read FMTS */
    static const qr_codec codecs[] = {
        {QR_Q4_0, QB, 18, 0, 0, 0, q4_0_quant, q4_0_dequant, q4_0_pack, q4_0_unpack},
        {QR_Q4_1, QB, 20, 0, 1, 0, q4_1_quant, q4_1_dequant, q4_1_pack, q4_1_unpack},
        {QR_Q5_0, QB, 22, 0, 0, 0, q5_0_quant, q5_0_dequant, q5_0_pack, q5_0_unpack},
        {QR_Q5_1, QB, 24, 0, 1, 0, q5_1_quant, q5_1_dequant, q5_1_pack, q5_1_unpack},
        {QR_Q8_0, QB, 34, 0, 0, 0, q8_0_quant, q8_0_dequant, q8_0_pack, q8_0_unpack},
        {QR_IQ4_NL, QB, 18, 0, 0, 0, iq4_nl_quant, iq4_nl_dequant, iq4_nl_pack, iq4_nl_unpack},
    };
    for (size_t i = 0; i < sizeof codecs / sizeof codecs[0]; ++i)
        if (codecs[i].type == type) return &codecs[i];
    return NULL;
}
