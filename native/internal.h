/* Private plumbing between native/common.c (API, threading) and the per-family codec files. */
#ifndef QREALIGN_INTERNAL_H
#define QREALIGN_INTERNAL_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "qrealign.h"

/* ggml type ids we handle */
enum { QR_F32 = 0, QR_F16 = 1, QR_Q4_0 = 2, QR_Q4_1 = 3, QR_Q5_0 = 6, QR_Q5_1 = 7, QR_Q8_0 = 8,
       QR_Q2_K = 10, QR_Q3_K = 11, QR_Q4_K = 12, QR_Q5_K = 13, QR_Q6_K = 14, QR_IQ4_NL = 20, QR_BF16 = 30 };
#define QK_K 256

/* One row at a time; common.c hands each thread a range of rows and offsets every pointer.
 * n is the row length (a multiple of the block size). imatrix may be NULL. */
typedef void (*qr_quant_row_fn)(const float *x, void *y, int64_t n, const float *imatrix);
typedef void (*qr_dequant_row_fn)(const void *x, float *y, int64_t n);
/* pack returns QR_OK or QR_E_ARG (a code out of range, or a NULL array the type needs) */
typedef int (*qr_pack_row_fn)(const uint8_t *q, const uint16_t *d, const uint16_t *dmin,
                              const uint8_t *sc, const uint8_t *mn, void *y, int64_t n);
typedef void (*qr_unpack_row_fn)(const void *x, uint8_t *q, uint16_t *d, uint16_t *dmin,
                                 uint8_t *sc, uint8_t *mn, int64_t n);

typedef struct {
    int type;
    int64_t block;      /* weights per block */
    size_t size;        /* bytes per block */
    int nsub;           /* sub-block scale codes per block (K-quants), 0 otherwise */
    int has_dmin;       /* d and dmin per block */
    int has_mn;         /* per-sub-block min codes */
    qr_quant_row_fn quantize;
    qr_dequant_row_fn dequantize;
    qr_pack_row_fn pack;
    qr_unpack_row_fn unpack;
} qr_codec;

/* Each codec file exports a lookup returning its codec for a type id, or NULL. */
const qr_codec *qr_codec_legacy(int type); /* quant_legacy.c: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL */
const qr_codec *qr_codec_k(int type);      /* quant_k.c: Q2_K Q3_K Q4_K Q5_K Q6_K */

/* fp16 helpers (IEEE binary16, round to nearest even: identical to ggml's conversion) */
uint16_t qr_f32_to_f16(float f);
float qr_f16_to_f32(uint16_t h);

/* ggml's round-to-nearest: ties away from zero is NOT what it uses; it uses this magic-number
 * trick, which rounds half to even for |x| < 2^22. Every codec must round with it. */
static inline int qr_nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i;
    memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

#endif
