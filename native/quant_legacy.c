/* Legacy 32-weight block codecs: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL — the row drivers.
 *
 * The per-block math (layouts, round-to-nearest, importance-weighted searches) lives in
 * native/blocks_legacy.h, shared with the CUDA kernels in native/codec_cuda.cu so both paths write the
 * same bytes. Output is bit-exact with ggml_quantize_chunk with and without an importance matrix (see
 * the header). Build with -ffp-contract=off.
 */
#include "internal.h"
#include "blocks_legacy.h"

#define QB QRL_QB

static void quantize_row(const qrl_fmt *f, const float *x, uint8_t *y, int64_t n, const float *imatrix) {
    /* only Q4_0/Q4_1/Q5_0/Q5_1 weight by the row's mean square */
    const int weighted = imatrix && f->type != QR_Q8_0 && f->type != QR_IQ4_NL;
    const float sigma2 = weighted ? qrl_row_sigma2(x, n) : 0.0f;
    for (int64_t ib = 0; ib < n / QB; ++ib, x += QB, y += f->size)
        qrl_quant_block(f, x, imatrix ? imatrix + ib * QB : NULL, sigma2, y);
}

static void dequantize_row(const qrl_fmt *f, const uint8_t *x, float *y, int64_t n) {
    for (int64_t ib = 0; ib < n / QB; ++ib, x += f->size, y += QB) qrl_dequant_block(f, x, y);
}

static int pack_row(const qrl_fmt *f, const uint8_t *q, const uint16_t *d, const uint16_t *dmin, uint8_t *y, int64_t n) {
    for (int64_t ib = 0; ib < n / QB; ++ib, q += QB, y += f->size)
        if (qrl_pack_block(f, q, d[ib], f->has_m ? dmin[ib] : 0, y) != QR_OK) return QR_E_ARG;
    return QR_OK;
}

static void unpack_row(const qrl_fmt *f, const uint8_t *x, uint8_t *q, uint16_t *d, uint16_t *dmin, int64_t n) {
    for (int64_t ib = 0; ib < n / QB; ++ib, x += f->size, q += QB) {
        uint16_t m = 0;
        qrl_load_block(f, x, &d[ib], &m, q);
        if (f->has_m) dmin[ib] = m;
    }
}

/* qr_codec's row functions carry no type, so each type gets thin wrappers bound to its layout. */
#define ROW_FNS(name, TYPE)                                                                                  \
    static void name##_quant(const float *x, void *y, int64_t n, const float *im) {                         \
        const qrl_fmt f = qrl_format(TYPE);                                                                  \
        quantize_row(&f, x, (uint8_t *)y, n, im);                                                            \
    }                                                                                                        \
    static void name##_dequant(const void *x, float *y, int64_t n) {                                        \
        const qrl_fmt f = qrl_format(TYPE);                                                                  \
        dequantize_row(&f, (const uint8_t *)x, y, n);                                                        \
    }                                                                                                        \
    static int name##_pack(const uint8_t *q, const uint16_t *d, const uint16_t *dmin, const uint8_t *sc,     \
                           const uint8_t *mn, void *y, int64_t n) {                                          \
        const qrl_fmt f = qrl_format(TYPE);                                                                  \
        (void)sc; (void)mn;                                                                                  \
        if (f.has_m && !dmin) return QR_E_ARG;                                                               \
        return pack_row(&f, q, d, dmin, (uint8_t *)y, n);                                                    \
    }                                                                                                        \
    static void name##_unpack(const void *x, uint8_t *q, uint16_t *d, uint16_t *dmin, uint8_t *sc,           \
                              uint8_t *mn, int64_t n) {                                                      \
        const qrl_fmt f = qrl_format(TYPE);                                                                  \
        (void)sc; (void)mn;                                                                                  \
        unpack_row(&f, (const uint8_t *)x, q, d, dmin, n);                                                   \
    }

ROW_FNS(q4_0, QR_Q4_0)
ROW_FNS(q4_1, QR_Q4_1)
ROW_FNS(q5_0, QR_Q5_0)
ROW_FNS(q5_1, QR_Q5_1)
ROW_FNS(q8_0, QR_Q8_0)
ROW_FNS(iq4_nl, QR_IQ4_NL)

const qr_codec *qr_codec_legacy(int type) {
    /* sizes and flags spelled out: a static initializer cannot call qrl_format */
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
