// Host-side harness for the CUDA build of the shared block functions: nvcc compiles native/blocks_*.h as
// CUDA C++ (QR_HD = __host__ __device__) with QR_PORTABLE_NUMERICS, so the host runs the same helper
// versions the device runs. tests/test_cuda_codec.py feeds it rows and compares with the C codec.
//
//   cuda_host_harness TYPE NROWS NCOLS HAS_IMATRIX < rows.f32 [imatrix.f32] > quantized bytes + dequantized f32
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "blocks_legacy.h"
#include "blocks_k.h"
#include "blocks_custom.h"

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s TYPE NROWS NCOLS HAS_IMATRIX\n", argv[0]); return 2; }
    const int type = atoi(argv[1]);
    const int64_t nrows = atoll(argv[2]), ncols = atoll(argv[3]);
    const bool has_im = atoi(argv[4]) != 0;
    const qrl_fmt f = qrl_format(type);
    const kinfo k = qrk_info(type);
    const bool ko = type == QR_QR4_KO;
    if (f.type < 0 && k.type < 0 && !ko) return 3;
    const int64_t block = f.type >= 0 ? QRL_QB : ko ? QK_K : k.n, size = f.type >= 0 ? f.size : ko ? QR4_KO_SIZE : k.size;
    if (ncols % block) return 4;
    std::vector<float> x(nrows * ncols), im(has_im ? ncols : 0), y(nrows * ncols);
    std::vector<uint8_t> q(nrows * (ncols / block) * size);
    if (fread(x.data(), 4, x.size(), stdin) != x.size()) return 5;
    if (has_im && fread(im.data(), 4, im.size(), stdin) != im.size()) return 6;
    const float *imp = has_im ? im.data() : nullptr;
    const int64_t nb = ncols / block;
    for (int64_t r = 0; r < nrows; ++r) {
        const float *xr = x.data() + r * ncols;
        uint8_t *qr = q.data() + r * nb * size;
        if (f.type >= 0) {
            const bool weighted = imp && type != QR_Q8_0 && type != QR_IQ4_NL;
            const float sigma2 = weighted ? qrl_row_sigma2(xr, ncols) : 0.0f;
            for (int64_t b = 0; b < nb; ++b)
                qrl_quant_block(&f, xr + b * QRL_QB, imp ? imp + b * QRL_QB : nullptr, sigma2, qr + b * size);
            for (int64_t b = 0; b < nb; ++b) qrl_dequant_block(&f, qr + b * size, y.data() + r * ncols + b * QRL_QB);
        } else if (ko) {
            for (int64_t b = 0; b < nb; ++b) qr4ko_quant_block(xr + b * QK_K, imp ? imp + b * QK_K : nullptr, qr + b * size);
            for (int64_t b = 0; b < nb; ++b) qr4ko_dequant_block(qr + b * size, y.data() + r * ncols + b * QK_K);
        } else {
            for (int64_t b = 0; b < nb; ++b) qrk_quant_block(&k, xr + b * block, imp ? imp + b * block : nullptr, qr + b * size);
            for (int64_t b = 0; b < nb; ++b) qrk_dequant_block(&k, qr + b * size, y.data() + r * ncols + b * block);
        }
    }
    fwrite(q.data(), 1, q.size(), stdout);
    fwrite(y.data(), 4, y.size(), stdout);
    return 0;
}
