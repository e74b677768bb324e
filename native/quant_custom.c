/* Row drivers of qrealign's custom types (native/qr_custom.h): QR4_KO = Q4_K + 4 fp16 outliers per
 * 256 weights. The per-block math is in native/blocks_custom.h (CUDA-ready, like blocks_k.h). */
#include "internal.h"
#include "blocks_custom.h"

static void qr4ko_quant(const float *x, void *vy, int64_t n, const float *im) {
    uint8_t *y = (uint8_t *)vy;
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K, y += QR4_KO_SIZE)
        qr4ko_quant_block(x, im ? im + i * QK_K : NULL, y);
}

static void qr4ko_dequant(const void *vx, float *y, int64_t n) {
    const uint8_t *x = (const uint8_t *)vx;
    for (int64_t i = 0; i < n / QK_K; ++i, x += QR4_KO_SIZE, y += QK_K) qr4ko_dequant_block(x, y);
}

static int qr4ko_pack(const uint8_t *q, const uint16_t *d, const uint16_t *dmin, const uint8_t *sc,
                      const uint8_t *mn, const uint8_t *oidx, const uint16_t *oval, void *vy, int64_t n) {
    uint8_t *y = (uint8_t *)vy;
    for (int64_t i = 0; i < n / QK_K; ++i, q += QK_K, sc += 8, mn += 8, oidx += QR4_KO_NOUT, oval += QR4_KO_NOUT,
                                       y += QR4_KO_SIZE)
        if (qr4ko_pack_block(q, d[i], dmin[i], sc, mn, oidx, oval, y) != QR_OK) return QR_E_ARG;
    return QR_OK;
}

static void qr4ko_unpack(const void *vx, uint8_t *q, uint16_t *d, uint16_t *dmin, uint8_t *sc, uint8_t *mn,
                         uint8_t *oidx, uint16_t *oval, int64_t n) {
    const uint8_t *x = (const uint8_t *)vx;
    for (int64_t i = 0; i < n / QK_K; ++i, x += QR4_KO_SIZE, q += QK_K, sc += 8, mn += 8, oidx += QR4_KO_NOUT,
                                       oval += QR4_KO_NOUT)
        qr4ko_unpack_block(x, q, &d[i], &dmin[i], sc, mn, oidx, oval);
}

const qr_codec *qr_codec_custom(int type) {
    static const qr_codec codecs[] = {
        {QR_QR4_KO, QK_K, QR4_KO_SIZE, 8, 1, 1, qr4ko_quant, qr4ko_dequant, NULL, NULL, QR4_KO_NOUT, qr4ko_pack,
         qr4ko_unpack},
    };
    for (size_t i = 0; i < sizeof codecs / sizeof codecs[0]; ++i)
        if (codecs[i].type == type) return &codecs[i];
    return NULL;
}
