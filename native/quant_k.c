/* K-quant codecs: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of 256 weights) and qrealign's QR5_K128 (Q5_K on
 * 128-weight super-blocks, native/qr_custom.h) — the row drivers.
 *
 * The per-block math (scale searches, requantization, bit layouts) lives in native/blocks_k.h, shared
 * with the CUDA kernels in native/codec_cuda.cu so both paths write the same bytes. Output is bit-exact
 * with ggml_quantize_chunk (tests/test_codec_k.py). Build with -ffp-contract=off.
 */
#include "internal.h"
#include "blocks_k.h"

static void quant_row(const kinfo *k, const float *x, void *vy, int64_t n, const float *qw) {
    uint8_t *y = (uint8_t *)vy;
    for (int64_t i = 0; i < n / k->n; ++i, x += k->n, y += k->size)
        qrk_quant_block(k, x, qw ? qw + i * k->n : NULL, y);
}

static void dequant_row(const kinfo *k, const void *vx, float *y, int64_t n) {
    const uint8_t *x = (const uint8_t *)vx;
    for (int64_t i = 0; i < n / k->n; ++i, x += k->size, y += k->n) qrk_dequant_block(k, x, y);
}

static int pack_row(const kinfo *k, const uint8_t *q, const uint16_t *d, const uint16_t *dmin,
                    const uint8_t *sc, const uint8_t *mn, void *vy, int64_t n) {
    uint8_t *y = (uint8_t *)vy;
    for (int64_t i = 0; i < n / k->n; ++i, q += k->n, sc += k->nsub, y += k->size) {
        if (qrk_pack_block(k, q, d[i], k->mnmax ? dmin[i] : 0, sc, k->mnmax ? mn : NULL, y) != QR_OK)
            return QR_E_ARG;
        if (k->mnmax) mn += k->nsub;
    }
    return QR_OK;
}

static void unpack_row(const kinfo *k, const void *vx, uint8_t *q, uint16_t *d, uint16_t *dmin,
                       uint8_t *sc, uint8_t *mn, int64_t n) {
    const uint8_t *x = (const uint8_t *)vx;
    for (int64_t i = 0; i < n / k->n; ++i, x += k->size, q += k->n, sc += k->nsub) {
        uint16_t dm = 0;
        qrk_unpack_block(k, x, q, &d[i], &dm, sc, mn);
        if (k->mnmax) { mn += k->nsub; dmin[i] = dm; }
    }
}

/* qr_codec's row functions carry no context: one thin wrapper set per type */
#define K_CODEC(T, TYPE)                                                                             \
    static void quantize_##T(const float *x, void *y, int64_t n, const float *im) {                  \
        const kinfo k = qrk_info(TYPE);                                                              \
        quant_row(&k, x, y, n, im);                                                                  \
    }                                                                                                \
    static void dequantize_##T(const void *x, float *y, int64_t n) {                                 \
        const kinfo k = qrk_info(TYPE);                                                              \
        dequant_row(&k, x, y, n);                                                                    \
    }                                                                                                \
    static int pack_##T(const uint8_t *q, const uint16_t *d, const uint16_t *dmin, const uint8_t *sc, \
                        const uint8_t *mn, void *y, int64_t n) {                                     \
        const kinfo k = qrk_info(TYPE);                                                              \
        return pack_row(&k, q, d, dmin, sc, mn, y, n);                                               \
    }                                                                                                \
    static void unpack_##T(const void *x, uint8_t *q, uint16_t *d, uint16_t *dmin, uint8_t *sc,      \
                           uint8_t *mn, int64_t n) {                                                 \
        const kinfo k = qrk_info(TYPE);                                                              \
        unpack_row(&k, x, q, d, dmin, sc, mn, n);                                                    \
    }

K_CODEC(q2k, QR_Q2_K)
K_CODEC(q3k, QR_Q3_K)
K_CODEC(q4k, QR_Q4_K)
K_CODEC(q5k, QR_Q5_K)
K_CODEC(q6k, QR_Q6_K)
K_CODEC(qr5k128, QR_QR5_K128)

static const qr_codec CODECS[6] = {
    {QR_Q2_K, QK_K, 84, 16, 1, 1, quantize_q2k, dequantize_q2k, pack_q2k, unpack_q2k},
    {QR_Q3_K, QK_K, 110, 16, 0, 0, quantize_q3k, dequantize_q3k, pack_q3k, unpack_q3k},
    {QR_Q4_K, QK_K, 144, 8, 1, 1, quantize_q4k, dequantize_q4k, pack_q4k, unpack_q4k},
    {QR_Q5_K, QK_K, 176, 8, 1, 1, quantize_q5k, dequantize_q5k, pack_q5k, unpack_q5k},
    {QR_Q6_K, QK_K, 210, 16, 0, 0, quantize_q6k, dequantize_q6k, pack_q6k, unpack_q6k},
    {QR_QR5_K128, 128, QR5_K128_SIZE, 4, 1, 1, quantize_qr5k128, dequantize_qr5k128, pack_qr5k128, unpack_qr5k128},
};

const qr_codec *qr_codec_k(int type) {
    for (int i = 0; i < 6; ++i)
        if (CODECS[i].type == type) return &CODECS[i];
    return NULL;
}
