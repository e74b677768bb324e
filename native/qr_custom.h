/* qrealign's custom GGUF tensor types: ids, block geometry, byte layout. The one C definition of them
 * (the Python twin is qrealign_gguf/formats/types.py, the llama.cpp side native/llama_patches/).
 *
 * Type ids: qrealign reserves 240..249, far from upstream ggml (ids <= 42 in the pinned tree) and from
 * the ids forks have taken (142, 143). Stock llama.cpp rejects a file using them ("invalid ggml type").
 *
 * QR4_KO (240), "Q4_K + outliers": a super-block of 256 weights, 156 bytes (4.875 bits per weight):
 *   bytes   0..143  a standard Q4_K block (fp16 d, fp16 dmin, 12 scale bytes, 128 bytes of 4-bit codes),
 *                   same layout and meaning as ggml's block_q4_K
 *   bytes 144..147  uint8 idx[4]: outlier positions inside the 256, strictly increasing
 *   bytes 148..155  fp16 val[4] (little endian): the outliers' values
 * Dequantization: the Q4_K dequantization of bytes 0..143, then y[idx[j]] = fp16_to_fp32(val[j]).
 *
 * QR5_K128 (241), "Q5_K on 128-weight super-blocks": for rows that are a multiple of 128 but not of 256
 * (hidden sizes 640, 896, ...), where ggml's K-quants do not fit and llama.cpp falls back to Q5_0 / Q5_1.
 * 4 affine sub-blocks of 32, 90 bytes per 128 weights (5.625 bits per weight):
 *   bytes  0..1   fp16 d      super-scale of the sub-block scales
 *   bytes  2..3   fp16 dmin   super-scale of the sub-block mins
 *   bytes  4..9   scales[6]   4 six-bit scale codes sc[j] in bits 0-5 of byte j; 4 six-bit min codes mn[j]:
 *                             low nibble in byte 4 + j/2 (bits 4*(j%2)..), top two bits in bits 6-7 of byte j
 *   bytes 10..25  qh[16]      bit 4 of weight i's 5-bit code at bit i/16 of byte i%16
 *   bytes 26..89  qs[64]      bits 0-3: byte 32g+l holds weight 64g+l (low nibble) and 64g+32+l (high), g=0,1
 * Dequantization (as Q5_K): y[32j+l] = d*sc[j] * q - dmin*mn[j], q = 0..31.
 * Encoder: Q5_K's (ggml quantize_row_q5_K_impl / _ref) on the 128 weights, native/blocks_k.h.
 */
#ifndef QR_CUSTOM_H
#define QR_CUSTOM_H
#include <stdint.h>

#define QR_QR4_KO 240
#define QR4_KO_NOUT 4                               /* outliers per super-block */
#define QR4_KO_Q4K_BYTES 144                        /* the embedded Q4_K block */
#define QR4_KO_IDX_OFF QR4_KO_Q4K_BYTES             /* uint8 idx[4] */
#define QR4_KO_VAL_OFF (QR4_KO_IDX_OFF + QR4_KO_NOUT) /* fp16 val[4] */
#define QR4_KO_SIZE (QR4_KO_VAL_OFF + 2 * QR4_KO_NOUT) /* 156 */

#define QR_QR5_K128 241
#define QR5_K128_SIZE 90

/* the layout as a struct, for readers of the format (the codec reads bytes, not this struct) */
typedef struct {
    uint16_t d, dmin;            /* fp16 */
    uint8_t scales[12];
    uint8_t qs[128];
    uint8_t idx[QR4_KO_NOUT];
    uint16_t val[QR4_KO_NOUT];   /* fp16 */
} qr_block_qr4_ko;

typedef struct {
    uint16_t d, dmin;            /* fp16 */
    uint8_t scales[6];
    uint8_t qh[16];
    uint8_t qs[64];
} qr_block_qr5_k128;

#if !defined(__cplusplus) && defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(qr_block_qr4_ko) == QR4_KO_SIZE, "QR4_KO block must be 156 bytes");
_Static_assert(sizeof(qr_block_qr5_k128) == QR5_K128_SIZE, "QR5_K128 block must be 90 bytes");
#endif

#endif
