// QR5_K128 on a device architecture (tests/test_edge.py): cross-compiled against the static ggml of
// tools/build/build_llama_static.sh together with our C codec (native/*.c), run under qemu. It writes what the
// device computes; the test compares that with our codec on the build machine and with the exact dot product.
//
//   edge_qr5k128_check NROWS NCOLS < x.f32[NROWS*NCOLS] imatrix.f32[NCOLS] act.f32[NROWS*NCOLS]  > out
//
// out, back to back (R = NROWS * row bytes):
//   ggml_quantize_chunk(QR5_K128, x, no imatrix) [R], the same with the imatrix [R],
//   our codec qr_quantize, no imatrix [R], with the imatrix [R],
//   ggml's to_float of the first [NROWS*NCOLS f32], our qr_dequantize of it [NROWS*NCOLS f32],
//   quantize_row_q8_1 of each act row [NROWS * NCOLS/32 * 36],
//   per row r: ggml_vec_dot_qr5_k128_q8_1(row r of the first, Q8_1 of act row r) [NROWS f32]
//              and ggml_vec_dot_qr5_k128_q8_1_generic of the same [NROWS f32]
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "ggml.h"
#include "ggml-cpu.h"
#include "qrealign.h"

#define QR5_K128 241
#define Q8_1_BYTES 36  // block_q8_1: fp16 d, fp16 s = d * sum(q), int8 q[32]

// ggml-cpu internals (ggml-cpu/quants.h, not installed): the kernel under test, its generic twin, and the
// activation quantizer llama.cpp uses in front of it
void ggml_vec_dot_qr5_k128_q8_1(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void ggml_vec_dot_qr5_k128_q8_1_generic(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
void quantize_row_q8_1(const float * x, void * y, int64_t k);

#include "edge_io.h"

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s NROWS NCOLS < x imatrix act > out\n", argv[0]); return 2; }
    const int64_t nrows = atoll(argv[1]), ncols = atoll(argv[2]);
    if (nrows <= 0 || ncols <= 0 || ncols % 128) { fprintf(stderr, "NCOLS must be a multiple of 128\n"); return 2; }
    const size_t n = (size_t)(nrows * ncols), rb = ggml_row_size(QR5_K128, ncols), R = (size_t)nrows * rb;
    if (rb != qr_row_size(QR5_K128, ncols)) { fprintf(stderr, "row size: ggml %zu, codec %zu\n", rb, qr_row_size(QR5_K128, ncols)); return 5; }
    float *x = get(4 * n), *im = get(4 * (size_t)ncols), *act = get(4 * n);
    if (fread(x, 4, n, stdin) != n || fread(im, 4, ncols, stdin) != (size_t)ncols || fread(act, 4, n, stdin) != n) {
        fprintf(stderr, "short input\n");
        return 2;
    }
    ggml_cpu_init();  // fp16 tables, CPU feature detection: what llama.cpp does before its first graph

    uint8_t *q = get(R), *qi = get(R), *cq = get(R), *cqi = get(R);
    if (ggml_quantize_chunk(QR5_K128, x, q, 0, nrows, ncols, NULL) != R) return 6;
    if (ggml_quantize_chunk(QR5_K128, x, qi, 0, nrows, ncols, im) != R) return 6;
    if (qr_quantize(QR5_K128, x, cq, nrows, ncols, NULL, 1) != QR_OK) return 7;
    if (qr_quantize(QR5_K128, x, cqi, nrows, ncols, im, 1) != QR_OK) return 7;
    put(q, R); put(qi, R); put(cq, R); put(cqi, R);

    float *y = get(4 * n);
    ggml_get_type_traits(QR5_K128)->to_float(q, y, (int64_t)n);
    put(y, 4 * n);
    if (qr_dequantize(QR5_K128, q, y, nrows, ncols, 1) != QR_OK) return 7;
    put(y, 4 * n);

    const size_t yb = (size_t)ncols / 32 * Q8_1_BYTES;
    uint8_t *yq = get(yb * (size_t)nrows);
    float *dot = get(4 * (size_t)nrows), *dotg = get(4 * (size_t)nrows);
    for (int64_t r = 0; r < nrows; ++r) {
        quantize_row_q8_1(act + r * ncols, yq + r * yb, ncols);
        ggml_vec_dot_qr5_k128_q8_1((int)ncols, &dot[r], 0, q + r * rb, 0, yq + r * yb, 0, 1);
        ggml_vec_dot_qr5_k128_q8_1_generic((int)ncols, &dotg[r], 0, q + r * rb, 0, yq + r * yb, 0, 1);
    }
    put(yq, yb * (size_t)nrows); put(dot, 4 * (size_t)nrows); put(dotg, 4 * (size_t)nrows);
    return 0;
}
