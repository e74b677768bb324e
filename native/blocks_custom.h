/* Per-block math of qrealign's custom types (native/qr_custom.h), shared by the C row drivers
 * (native/quant_custom.c) and, later, CUDA kernels: valid C11 and CUDA C++, no tables, no function
 * pointers (same rules as native/blocks_k.h).
 *
 * QR4_KO encoder, deterministic:
 *   1. importance of weight l: x[l]^2, times imatrix[l] when there is one (float: (x*x)*im);
 *   2. the 4 most important weights are the outliers (4 argmax passes, strict '>', so on ties the lower
 *      index wins), stored in increasing position order as fp16(x);
 *   3. the other 252 weights go through Q4_K's importance search (blocks_k.h quant_q4k + requantize,
 *      ggml's quantize_row_q4_K_impl) with per-weight importance imatrix[l] (1 without imatrix) and 0 at
 *      the outliers; the outliers' inputs are replaced by the mean of the non-outlier weights of their
 *      32-weight sub-block (float sum in index order, divided by the count), so that they stretch neither
 *      the sub-block's range nor the block's sigma. Their Q4_K codes are whatever that gives; the
 *      decoder overwrites those positions.
 */
#ifndef QR_BLOCKS_CUSTOM_H
#define QR_BLOCKS_CUSTOM_H
#include "blocks_k.h"
#include "qr_custom.h"

/* The outliers of one block: positions (increasing) of the QR4_KO_NOUT largest x^2 * im. */
QR_HD void qr4ko_select(const float *x, const float *im, uint8_t *idx) {
    int taken[QR4_KO_NOUT];
    for (int j = 0; j < QR4_KO_NOUT; ++j) {
        int best = -1;
        float best_imp = 0.f;
        for (int l = 0; l < QK_K; ++l) {
            int used = 0;
            for (int t = 0; t < j; ++t) used |= taken[t] == l;
            if (used) continue;
            float imp = x[l] * x[l];
            if (im) imp = imp * im[l];
            if (qr_isnan(imp)) imp = -1.0f;  /* a NaN input is the least important */
            if (best < 0 || imp > best_imp) { best = l; best_imp = imp; }
        }
        taken[j] = best;
    }
    for (int a = 1; a < QR4_KO_NOUT; ++a)  /* insertion sort, increasing position */
        for (int b = a; b > 0 && taken[b - 1] > taken[b]; --b) { int t = taken[b]; taken[b] = taken[b - 1]; taken[b - 1] = t; }
    for (int j = 0; j < QR4_KO_NOUT; ++j) idx[j] = (uint8_t)taken[j];
}

/* Quantize one super-block x[256] into y (QR4_KO_SIZE bytes); im: its 256 importance weights or NULL. */
QR_HD void qr4ko_quant_block(const float *x, const float *im, uint8_t *y) {
    uint8_t idx[QR4_KO_NOUT];
    qr4ko_select(x, im, idx);
    float xr[QK_K], qw[QK_K];
    uint8_t out[QK_K];
    for (int l = 0; l < QK_K; ++l) { xr[l] = x[l]; qw[l] = im ? im[l] : 1.0f; out[l] = 0; }
    for (int j = 0; j < QR4_KO_NOUT; ++j) { qw[idx[j]] = 0.0f; out[idx[j]] = 1; }
    for (int s = 0; s < QK_K / 32; ++s) {
        float sum = 0.0f;
        int cnt = 0;
        for (int l = 32 * s; l < 32 * s + 32; ++l) if (!out[l]) { sum += x[l]; ++cnt; }
        const float mean = sum / (float)cnt;  /* cnt >= 32 - QR4_KO_NOUT > 0 */
        for (int l = 32 * s; l < 32 * s + 32; ++l) if (out[l]) xr[l] = mean;
    }
    const kinfo k = qrk_info(QR_Q4_K);
    qrk_quant_block(&k, xr, qw, y);
    for (int j = 0; j < QR4_KO_NOUT; ++j) {
        y[QR4_KO_IDX_OFF + j] = idx[j];
        put16(y + QR4_KO_VAL_OFF + 2 * j, qr_f32_to_f16(x[idx[j]]));
    }
}

/* Decode one block: Q4_K, then the outliers replace their positions (in j order). */
QR_HD void qr4ko_dequant_block(const uint8_t *x, float *y) {
    const kinfo k = qrk_info(QR_Q4_K);
    qrk_dequant_block(&k, x, y);
    for (int j = 0; j < QR4_KO_NOUT; ++j)
        y[x[QR4_KO_IDX_OFF + j]] = qr_f16_to_f32(get16(x + QR4_KO_VAL_OFF + 2 * j));
}

/* Pack caller-chosen parameters: the Q4_K part as qrk_pack_block, plus oidx[4] (strictly increasing)
 * and oval[4] (fp16 bits). QR_E_ARG (nothing written) on a code out of range or bad positions. */
QR_HD int qr4ko_pack_block(const uint8_t *q, uint16_t d, uint16_t dmin, const uint8_t *sc, const uint8_t *mn,
                           const uint8_t *oidx, const uint16_t *oval, uint8_t *y) {
    for (int j = 1; j < QR4_KO_NOUT; ++j) if (oidx[j] <= oidx[j - 1]) return QR_E_ARG;
    const kinfo k = qrk_info(QR_Q4_K);
    if (qrk_pack_block(&k, q, d, dmin, sc, mn, y) != QR_OK) return QR_E_ARG;
    for (int j = 0; j < QR4_KO_NOUT; ++j) {
        y[QR4_KO_IDX_OFF + j] = oidx[j];
        put16(y + QR4_KO_VAL_OFF + 2 * j, oval[j]);
    }
    return QR_OK;
}

QR_HD void qr4ko_unpack_block(const uint8_t *x, uint8_t *q, uint16_t *d, uint16_t *dmin, uint8_t *sc, uint8_t *mn,
                              uint8_t *oidx, uint16_t *oval) {
    const kinfo k = qrk_info(QR_Q4_K);
    qrk_unpack_block(&k, x, q, d, dmin, sc, mn);
    for (int j = 0; j < QR4_KO_NOUT; ++j) {
        oidx[j] = x[QR4_KO_IDX_OFF + j];
        oval[j] = get16(x + QR4_KO_VAL_OFF + 2 * j);
    }
}

#endif
