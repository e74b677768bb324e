/* qrealign native codec: GGUF block encoders/decoders, bit-exact with ggml's layouts.
 *
 * Types are identified by their ggml type id (GGML_TYPE_Q4_0 = 2, ...). Rows are contiguous
 * float32 of length ncols; a quantized row is qr_row_size(type, ncols) bytes, blocks back to back.
 * All functions return 0 on success or a negative QR_E* code. nthreads <= 0 means "all cores".
 *
 * The declarations between the CFFI markers are parsed by native/build_ffi.py: keep them plain C.
 */
#ifndef QREALIGN_H
#define QREALIGN_H
#include <stdint.h>
#include <stddef.h>

/* CFFI-BEGIN */
#define QR_OK 0
#define QR_E_TYPE -1      /* unsupported type id */
#define QR_E_NCOLS -2     /* ncols not a multiple of the type's block size */
#define QR_E_ARG -3       /* bad argument (NULL pointer where data is required, code out of range, ...) */
#define QR_E_NOMEM -4

/* block size (weights per block) and bytes per block; 0 for unknown types */
int64_t qr_block_size(int type);
size_t qr_type_size(int type);
size_t qr_row_size(int type, int64_t ncols);

/* Quantize nrows x ncols float32 rows. imatrix: NULL for round-to-nearest (bit-exact with
 * ggml_quantize_chunk(type, ..., NULL)), or ncols per-column importance weights. */
int qr_quantize(int type, const float *src, void *dst, int64_t nrows, int64_t ncols,
                const float *imatrix, int nthreads);

/* Dequantize to float32, identical to ggml's dequantize_row_* for the type. */
int qr_dequantize(int type, const void *src, float *dst, int64_t nrows, int64_t ncols, int nthreads);

/* Pack caller-chosen parameters exactly (no re-rounding, no search). Per type, with nb = ncols/block_size
 * blocks per row and nsub sub-blocks per block:
 *   q    : nrows*ncols uint8 integer codes, in the type's unsigned code range
 *          (Q4_0/Q4_1/IQ4_NL: 0..15, Q5_0/Q5_1: 0..31, Q8_0: int8 stored as uint8 two's complement,
 *           Q2_K: 0..3, Q3_K: 0..7, Q4_K: 0..15, Q5_K: 0..31, Q6_K: 0..63; qrealign's QR5_K128: 0..31)
 *   d    : nrows*nb fp16 bit patterns: the block's (super-)scale d
 *   dmin : nrows*nb fp16 bit patterns for types with a min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K, QR5_K128), else NULL
 *   sc   : nrows*nb*nsub sub-block scale codes for K-quants (Q2_K: 0..15 (nsub=16), Q3_K: 0..63 (16),
 *          Q4_K/Q5_K: 0..63 (8), Q6_K: int8 two's complement (16), QR5_K128: 0..63 (4)); else NULL
 *   mn   : nrows*nb*nsub sub-block min codes (Q2_K: 0..15, Q4_K/Q5_K/QR5_K128: 0..63), else NULL
 * Code meaning follows ggml's dequantization formula of the type exactly. */
int qr_pack(int type, const uint8_t *q, const uint16_t *d, const uint16_t *dmin,
            const uint8_t *sc, const uint8_t *mn, void *dst, int64_t nrows, int64_t ncols);

/* Inverse of qr_pack: read the parameters back out of packed rows (same array shapes). */
int qr_unpack(int type, const void *src, uint8_t *q, uint16_t *d, uint16_t *dmin,
              uint8_t *sc, uint8_t *mn, int64_t nrows, int64_t ncols);

/* Types with outliers (qrealign's custom QR4_KO, id 240, native/qr_custom.h): nout outliers per block,
 * 0 for every other type. qr_pack / qr_unpack reject such a type (QR_E_ARG); use these, which add
 *   oidx : nrows*nb*nout uint8 outlier positions inside their block, strictly increasing per block
 *   oval : nrows*nb*nout fp16 bit patterns of the outliers' values
 * For a type without outliers they are qr_pack / qr_unpack (oidx, oval ignored). */
int qr_type_outliers(int type);
int qr_pack_outliers(int type, const uint8_t *q, const uint16_t *d, const uint16_t *dmin,
                     const uint8_t *sc, const uint8_t *mn, const uint8_t *oidx, const uint16_t *oval,
                     void *dst, int64_t nrows, int64_t ncols);
int qr_unpack_outliers(int type, const void *src, uint8_t *q, uint16_t *d, uint16_t *dmin,
                       uint8_t *sc, uint8_t *mn, uint8_t *oidx, uint16_t *oval, int64_t nrows, int64_t ncols);

/* fp32 <-> fp16 / bf16 with ggml's rounding (round to nearest even; bf16 keeps NaN quiet). */
void qr_fp32_to_fp16(const float *src, uint16_t *dst, int64_t n);
void qr_fp16_to_fp32(const uint16_t *src, float *dst, int64_t n);
void qr_fp32_to_bf16(const float *src, uint16_t *dst, int64_t n);
/* CFFI-END */

#endif
