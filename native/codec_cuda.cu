/* CUDA codec (API: native/qrealign_cuda.h): one CUDA thread per block (32 weights for the legacy types,
 * a 256-weight super-block for the K-quants), each calling the same QR_HD block functions as the C row
 * drivers in quant_legacy.c / quant_k.c. Byte equality with the CPU path rests on those shared sources
 * and on the numerics flags: nvcc -fmad=false -ftz=false -prec-div=true -prec-sqrt=true (no
 * --use_fast_math) — see native/qr_hd.h and tools/build/build_cuda.sh.
 *
 * Order-dependent sums stay sequential in one thread as in C: a block's own sums inside its thread, and
 * the row mean square the legacy imatrix path needs (qrl_row_sigma2) in one thread per row (one CTA per
 * row, its thread 0, shared with the CTA's block threads).
 */
#include <cuda_runtime.h>
#include <stdio.h>

#include "qrealign_cuda.h"
#include "blocks_legacy.h"
#include "blocks_k.h"
#include "blocks_custom.h"

namespace {

constexpr int THREADS_LEGACY = 128;
constexpr int THREADS_K = 64;  /* a K thread keeps ~1 KiB of block state in local memory */

/* ---- kernels ------------------------------------------------------------------------------------ */

/* legacy types without a row statistic (round to nearest, Q8_0, IQ4_NL): flat over all blocks */
__global__ void quant_legacy(qrl_fmt f, const float *src, uint8_t *dst, int64_t nblocks, int64_t nb,
                             const float *imatrix) {
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= nblocks) return;
    const float *im = imatrix ? imatrix + (g % nb) * QRL_QB : nullptr;
    qrl_quant_block(&f, src + g * QRL_QB, im, 0.0f, dst + g * f.size);
}

/* Q4_0/Q4_1/Q5_0/Q5_1 with an imatrix: one CTA per row; thread 0 sums the row's squares in C's order */
__global__ void quant_legacy_weighted(qrl_fmt f, const float *src, uint8_t *dst, int64_t ncols,
                                      const float *imatrix) {
    __shared__ float sigma2;
    const int64_t row = blockIdx.x, nb = ncols / QRL_QB;
    const float *x = src + row * ncols;
    if (threadIdx.x == 0) sigma2 = qrl_row_sigma2(x, ncols);
    __syncthreads();
    uint8_t *y = dst + row * nb * f.size;
    for (int64_t ib = threadIdx.x; ib < nb; ib += blockDim.x)
        qrl_quant_block(&f, x + ib * QRL_QB, imatrix + ib * QRL_QB, sigma2, y + ib * f.size);
}

__global__ void dequant_legacy(qrl_fmt f, const uint8_t *src, float *dst, int64_t nblocks) {
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= nblocks) return;
    qrl_dequant_block(&f, src + g * f.size, dst + g * QRL_QB);
}

__global__ void pack_legacy(qrl_fmt f, const uint8_t *q, const uint16_t *d, const uint16_t *dmin, uint8_t *dst,
                            int64_t nblocks, int *err) {
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= nblocks) return;
    if (qrl_pack_block(&f, q + g * QRL_QB, d[g], f.has_m ? dmin[g] : 0, dst + g * f.size) != QR_OK) *err = 1;
}

__global__ void unpack_legacy(qrl_fmt f, const uint8_t *src, uint8_t *q, uint16_t *d, uint16_t *dmin,
                              int64_t nblocks) {
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= nblocks) return;
    uint16_t m = 0;
    qrl_load_block(&f, src + g * f.size, &d[g], &m, q + g * QRL_QB);
    if (f.has_m) dmin[g] = m;
}

__global__ void quant_k(kinfo k, const float *src, uint8_t *dst, int64_t nblocks, int64_t nb, const float *imatrix) {
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= nblocks) return;
    const float *qw = imatrix ? imatrix + (g % nb) * k.n : nullptr;
    qrk_quant_block(&k, src + g * k.n, qw, dst + g * k.size);
}

__global__ void dequant_k(kinfo k, const uint8_t *src, float *dst, int64_t nblocks) {
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= nblocks) return;
    qrk_dequant_block(&k, src + g * k.size, dst + g * k.n);
}

__global__ void pack_k(kinfo k, const uint8_t *q, const uint16_t *d, const uint16_t *dmin, const uint8_t *sc,
                       const uint8_t *mn, uint8_t *dst, int64_t nblocks, int *err) {
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= nblocks) return;
    const int64_t s = g * k.nsub;
    if (qrk_pack_block(&k, q + g * k.n, d[g], k.mnmax ? dmin[g] : 0, sc + s, k.mnmax ? mn + s : nullptr,
                       dst + g * k.size) != QR_OK)
        *err = 1;
}

__global__ void unpack_k(kinfo k, const uint8_t *src, uint8_t *q, uint16_t *d, uint16_t *dmin, uint8_t *sc,
                         uint8_t *mn, int64_t nblocks) {
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= nblocks) return;
    const int64_t s = g * k.nsub;
    uint16_t dm = 0;
    qrk_unpack_block(&k, src + g * k.size, q + g * k.n, &d[g], &dm, sc + s, k.mnmax ? mn + s : nullptr);
    if (k.mnmax) dmin[g] = dm;
}

/* QR4_KO (qrealign's Q4_K + 4 fp16 outliers): quantize/dequantize only; its pack/unpack carry outliers,
 * which this API has no arguments for (the C codec's qr_pack_outliers does that). */
__global__ void quant_qr4ko(const float *src, uint8_t *dst, int64_t nblocks, int64_t nb, const float *imatrix) {
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= nblocks) return;
    qr4ko_quant_block(src + g * QK_K, imatrix ? imatrix + (g % nb) * QK_K : nullptr, dst + g * QR4_KO_SIZE);
}

__global__ void dequant_qr4ko(const uint8_t *src, float *dst, int64_t nblocks) {
    const int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= nblocks) return;
    qr4ko_dequant_block(src + g * QR4_KO_SIZE, dst + g * QK_K);
}

/* ---- host plumbing ------------------------------------------------------------------------------ */

thread_local char last_error[256] = "";

int cuda_fail(cudaError_t e, const char *what) {
    snprintf(last_error, sizeof last_error, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
    return QR_E_CUDA;
}

/* Which codec, and the checks of qrealign.h's API (same codes as the CPU path). */
struct Codec {
    int legacy;      /* 1: qrl_*, 0: qrk_* (or QR4_KO when custom) */
    int custom;      /* QR4_KO: quantize/dequantize only */
    qrl_fmt f;
    kinfo k;
    int64_t block;
    int nsub, has_dmin, has_mn;
};

int find_codec(int type, Codec *c) {
    c->f = qrl_format(type);
    c->k = qrk_info(type);
    c->custom = 0;
    if (type == QR_QR4_KO) {
        c->legacy = 0; c->custom = 1; c->block = QK_K; c->nsub = 8; c->has_dmin = 1; c->has_mn = 1;
        return QR_OK;
    }
    if (c->f.type >= 0) {
        c->legacy = 1; c->block = QRL_QB; c->nsub = 0; c->has_dmin = c->f.has_m; c->has_mn = 0;
        return QR_OK;
    }
    if (c->k.type >= 0) {
        c->legacy = 0; c->block = c->k.n; c->nsub = c->k.nsub; c->has_dmin = c->k.mnmax != 0; c->has_mn = c->has_dmin;
        return QR_OK;
    }
    return QR_E_TYPE;
}

int check(int type, int64_t nrows, int64_t ncols, Codec *c) {
    if (find_codec(type, c)) return QR_E_TYPE;
    if (ncols <= 0 || nrows < 0 || ncols % c->block) return QR_E_NCOLS;
    return QR_OK;
}

int check_params(const Codec *c, const void *q, const void *d, const void *dmin, const void *sc, const void *mn) {
    if (!q || !d) return QR_E_ARG;
    if (c->has_dmin && !dmin) return QR_E_ARG;
    if (c->nsub && !sc) return QR_E_ARG;
    if (c->has_mn && !mn) return QR_E_ARG;
    return QR_OK;
}

/* Makes the pointer's device current for this call (restored by the destructor), so the kernels run
 * where the data is even when the caller's current device differs. */
struct DeviceGuard {
    int prev = -1, rc = QR_OK;
    explicit DeviceGuard(const void *p) {
        cudaPointerAttributes a;
        cudaError_t e = cudaPointerGetAttributes(&a, p);
        if (e != cudaSuccess) { rc = cuda_fail(e, "cudaPointerGetAttributes"); return; }
        if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged) {
            snprintf(last_error, sizeof last_error, "not a CUDA device pointer (memory type %d)", (int)a.type);
            rc = QR_E_CUDA;
            return;
        }
        if ((e = cudaGetDevice(&prev)) != cudaSuccess) { rc = cuda_fail(e, "cudaGetDevice"); prev = -1; return; }
        if (prev != a.device && (e = cudaSetDevice(a.device)) != cudaSuccess) { rc = cuda_fail(e, "cudaSetDevice"); prev = -1; }
        else if (prev == a.device) prev = -1;
    }
    ~DeviceGuard() { if (prev >= 0) cudaSetDevice(prev); }
};

unsigned grid(int64_t n, int threads) { return (unsigned)((n + threads - 1) / threads); }

int launched(const char *what) {
    cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? QR_OK : cuda_fail(e, what);
}

/* pack: the range check's flag comes back to the host (the one synchronous call) */
int pack_impl(const Codec &c, const uint8_t *q, const uint16_t *d, const uint16_t *dmin, const uint8_t *sc,
              const uint8_t *mn, uint8_t *dst, int64_t nblocks, cudaStream_t s) {
    int *err = nullptr, herr = 0;
    cudaError_t e = cudaMallocAsync((void **)&err, sizeof(int), s);
    if (e != cudaSuccess) return cuda_fail(e, "cudaMallocAsync");
    int rc = QR_OK;
    if ((e = cudaMemsetAsync(err, 0, sizeof(int), s)) != cudaSuccess) rc = cuda_fail(e, "cudaMemsetAsync");
    if (rc == QR_OK) {
        if (c.legacy) pack_legacy<<<grid(nblocks, THREADS_LEGACY), THREADS_LEGACY, 0, s>>>(c.f, q, d, dmin, dst, nblocks, err);
        else pack_k<<<grid(nblocks, THREADS_K), THREADS_K, 0, s>>>(c.k, q, d, dmin, sc, mn, dst, nblocks, err);
        rc = launched("pack kernel");
    }
    if (rc == QR_OK && (e = cudaMemcpyAsync(&herr, err, sizeof(int), cudaMemcpyDeviceToHost, s)) != cudaSuccess)
        rc = cuda_fail(e, "cudaMemcpyAsync");
    cudaFreeAsync(err, s);
    if (rc == QR_OK && (e = cudaStreamSynchronize(s)) != cudaSuccess) rc = cuda_fail(e, "cudaStreamSynchronize");
    return rc != QR_OK ? rc : herr ? QR_E_ARG : QR_OK;
}

}  // namespace

extern "C" {

int qr_cuda_available(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) { cuda_fail(e, "cudaGetDeviceCount"); cudaGetLastError(); return 0; }
    return n > 0;
}

const char *qr_cuda_last_error(void) { return last_error; }

int qr_cuda_quantize(int type, const float *src, void *dst, int64_t nrows, int64_t ncols, const float *imatrix,
                     void *stream) {
    Codec c;
    int rc = check(type, nrows, ncols, &c);
    if (rc) return rc;
    if (!src || !dst) return QR_E_ARG;
    if (nrows == 0) return QR_OK;
    DeviceGuard guard(src);
    if (guard.rc) return guard.rc;
    cudaStream_t s = (cudaStream_t)stream;
    uint8_t *y = (uint8_t *)dst;
    const int64_t nb = ncols / c.block, nblocks = nrows * nb;
    if (c.legacy) {
        const int weighted = imatrix && type != QR_Q8_0 && type != QR_IQ4_NL;
        if (weighted) {
            if (nrows > 0x7fffffff) return QR_E_ARG;
            quant_legacy_weighted<<<(unsigned)nrows, THREADS_LEGACY, 0, s>>>(c.f, src, y, ncols, imatrix);
        } else {
            quant_legacy<<<grid(nblocks, THREADS_LEGACY), THREADS_LEGACY, 0, s>>>(c.f, src, y, nblocks, nb, imatrix);
        }
    } else if (c.custom) {
        quant_qr4ko<<<grid(nblocks, THREADS_K), THREADS_K, 0, s>>>(src, y, nblocks, nb, imatrix);
    } else {
        quant_k<<<grid(nblocks, THREADS_K), THREADS_K, 0, s>>>(c.k, src, y, nblocks, nb, imatrix);
    }
    return launched("quantize kernel");
}

int qr_cuda_dequantize(int type, const void *src, float *dst, int64_t nrows, int64_t ncols, void *stream) {
    Codec c;
    int rc = check(type, nrows, ncols, &c);
    if (rc) return rc;
    if (!src || !dst) return QR_E_ARG;
    if (nrows == 0) return QR_OK;
    DeviceGuard guard(src);
    if (guard.rc) return guard.rc;
    cudaStream_t s = (cudaStream_t)stream;
    const int64_t nblocks = nrows * (ncols / c.block);
    if (c.legacy) dequant_legacy<<<grid(nblocks, THREADS_LEGACY), THREADS_LEGACY, 0, s>>>(c.f, (const uint8_t *)src, dst, nblocks);
    else if (c.custom) dequant_qr4ko<<<grid(nblocks, THREADS_K), THREADS_K, 0, s>>>((const uint8_t *)src, dst, nblocks);
    else dequant_k<<<grid(nblocks, THREADS_K), THREADS_K, 0, s>>>(c.k, (const uint8_t *)src, dst, nblocks);
    return launched("dequantize kernel");
}

int qr_cuda_pack(int type, const uint8_t *q, const uint16_t *d, const uint16_t *dmin, const uint8_t *sc,
                 const uint8_t *mn, void *dst, int64_t nrows, int64_t ncols, void *stream) {
    Codec c;
    int rc = check(type, nrows, ncols, &c);
    if (rc) return rc;
    if (c.custom) return QR_E_TYPE;
    if ((rc = check_params(&c, q, d, dmin, sc, mn)) || !dst) return rc ? rc : QR_E_ARG;
    if (nrows == 0) return QR_OK;
    DeviceGuard guard(q);
    if (guard.rc) return guard.rc;
    return pack_impl(c, q, d, dmin, sc, mn, (uint8_t *)dst, nrows * (ncols / c.block), (cudaStream_t)stream);
}

int qr_cuda_unpack(int type, const void *src, uint8_t *q, uint16_t *d, uint16_t *dmin, uint8_t *sc, uint8_t *mn,
                   int64_t nrows, int64_t ncols, void *stream) {
    Codec c;
    int rc = check(type, nrows, ncols, &c);
    if (rc) return rc;
    if (c.custom) return QR_E_TYPE;
    if ((rc = check_params(&c, q, d, dmin, sc, mn)) || !src) return rc ? rc : QR_E_ARG;
    if (nrows == 0) return QR_OK;
    DeviceGuard guard(src);
    if (guard.rc) return guard.rc;
    cudaStream_t s = (cudaStream_t)stream;
    const int64_t nblocks = nrows * (ncols / c.block);
    if (c.legacy)
        unpack_legacy<<<grid(nblocks, THREADS_LEGACY), THREADS_LEGACY, 0, s>>>(c.f, (const uint8_t *)src, q, d, dmin, nblocks);
    else
        unpack_k<<<grid(nblocks, THREADS_K), THREADS_K, 0, s>>>(c.k, (const uint8_t *)src, q, d, dmin, sc, mn, nblocks);
    return launched("unpack kernel");
}

}  // extern "C"
