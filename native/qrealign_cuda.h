/* qrealign CUDA codec: the C codec's quantize / dequantize / pack / unpack run on the GPU, with the
 * very same per-block functions (native/blocks_legacy.h, native/blocks_k.h) compiled for the device,
 * so the bytes equal the CPU path's (qrealign.h) for the same inputs.
 *
 * Every data pointer is a DEVICE pointer (cudaMalloc / a torch CUDA tensor's data_ptr()), all on one
 * device; the work is queued on `stream` (a cudaStream_t; NULL = the legacy default stream) and the
 * call returns without waiting, except qr_cuda_pack, which waits for its range check. Array shapes
 * and code conventions are those of qrealign.h. Returns 0 or a negative QR_E_* code;
 * qr_cuda_last_error() describes the last QR_E_CUDA of the calling thread.
 *
 * Built by tools/build/build_cuda.sh into qrealign_gguf/_cuda/libqrealign_cuda.so (nvcc, sm_80/86/89/90 +
 * compute_90 PTX) and loaded by qrealign_gguf/formats/cuda_codec.py. The declarations between the CFFI
 * markers are parsed by that module: keep them plain C.
 */
#ifndef QREALIGN_CUDA_H
#define QREALIGN_CUDA_H
#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CFFI-BEGIN */
#define QR_E_CUDA -5      /* a CUDA runtime error (see qr_cuda_last_error), or a host pointer given */

/* 1 if a CUDA device is usable, else 0 */
int qr_cuda_available(void);
const char *qr_cuda_last_error(void);

int qr_cuda_quantize(int type, const float *src, void *dst, int64_t nrows, int64_t ncols,
                     const float *imatrix, void *stream);
int qr_cuda_dequantize(int type, const void *src, float *dst, int64_t nrows, int64_t ncols, void *stream);
int qr_cuda_pack(int type, const uint8_t *q, const uint16_t *d, const uint16_t *dmin, const uint8_t *sc,
                 const uint8_t *mn, void *dst, int64_t nrows, int64_t ncols, void *stream);
int qr_cuda_unpack(int type, const void *src, uint8_t *q, uint16_t *d, uint16_t *dmin, uint8_t *sc,
                   uint8_t *mn, int64_t nrows, int64_t ncols, void *stream);
/* CFFI-END */

#ifdef __cplusplus
}
#endif
#endif
