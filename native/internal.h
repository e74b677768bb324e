/* Private plumbing between native/common.c (API, threading) and the per-family codec files. */
#ifndef QREALIGN_INTERNAL_H
#define QREALIGN_INTERNAL_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "qrealign.h"
#include "qr_types.h"
#include "qr_hd.h"   /* qr_nearest_int, qr_f32_to_f16, qr_f16_to_f32, ... (shared with the CUDA kernels) */

/* One row at a time; common.c hands each thread a range of rows and offsets every pointer.
 * n is the row length (a multiple of the block size). imatrix may be NULL. */
typedef void (*qr_quant_row_fn)(const float *x, void *y, int64_t n, const float *imatrix);
typedef void (*qr_dequant_row_fn)(const void *x, float *y, int64_t n);
/* pack returns QR_OK or QR_E_ARG (a code out of range, or a NULL array the type needs) */
typedef int (*qr_pack_row_fn)(const uint8_t *q, const uint16_t *d, const uint16_t *dmin,
                              const uint8_t *sc, const uint8_t *mn, void *y, int64_t n);
typedef void (*qr_unpack_row_fn)(const void *x, uint8_t *q, uint16_t *d, uint16_t *dmin,
                                 uint8_t *sc, uint8_t *mn, int64_t n);

/* types with outliers (qr_codec.nout > 0): the same plus nout positions / fp16 values per block */
typedef int (*qr_pack_out_row_fn)(const uint8_t *q, const uint16_t *d, const uint16_t *dmin,
                                  const uint8_t *sc, const uint8_t *mn, const uint8_t *oidx,
                                  const uint16_t *oval, void *y, int64_t n);
typedef void (*qr_unpack_out_row_fn)(const void *x, uint8_t *q, uint16_t *d, uint16_t *dmin,
                                     uint8_t *sc, uint8_t *mn, uint8_t *oidx, uint16_t *oval, int64_t n);

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
    int nout;           /* outliers per block (custom types); pack/unpack then NULL, these set */
    qr_pack_out_row_fn pack_out;
    qr_unpack_out_row_fn unpack_out;
} qr_codec;

/* Each codec file exports a lookup returning its codec for a type id, or NULL. */
const qr_codec *qr_codec_legacy(int type); /* quant_legacy.c: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL */
const qr_codec *qr_codec_k(int type);      /* quant_k.c: Q2_K Q3_K Q4_K Q5_K Q6_K, and QR5_K128 (id 241) */
const qr_codec *qr_codec_custom(int type); /* quant_custom.c: QR4_KO (qrealign's own, id 240) */

#endif
