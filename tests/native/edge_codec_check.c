// Our C codec alone on a device architecture (tests/test_edge.py, the quick check `make test` runs): compiled with
// the ARM cross compiler from native/*.c only (no llama.cpp), run under qemu-aarch64. It writes what the device
// encodes and decodes; the test compares that with the codec on the build machine byte for byte.
//
//   edge_codec_check TYPE NROWS NCOLS < x.f32[NROWS*NCOLS] imatrix.f32[NCOLS]  > out
//
// out, back to back (R = NROWS * row bytes): qr_quantize without imatrix [R], with it [R],
// qr_dequantize of the first [NROWS*NCOLS f32]
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "qrealign.h"

#include "edge_io.h"

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s TYPE NROWS NCOLS < x imatrix > out\n", argv[0]); return 2; }
    const int type = atoi(argv[1]);
    const int64_t nrows = atoll(argv[2]), ncols = atoll(argv[3]);
    const size_t rb = qr_row_size(type, ncols);
    if (nrows <= 0 || ncols <= 0 || rb == 0) { fprintf(stderr, "bad type or shape\n"); return 2; }
    const size_t n = (size_t)(nrows * ncols), R = (size_t)nrows * rb;
    float *x = get(4 * n), *im = get(4 * (size_t)ncols);
    if (fread(x, 4, n, stdin) != n || fread(im, 4, (size_t)ncols, stdin) != (size_t)ncols) {
        fprintf(stderr, "short input\n");
        return 2;
    }
    uint8_t *q = get(R), *qi = get(R);
    float *y = get(4 * n);
    // one thread: the bytes must not depend on it, and qemu-user runs threads slowly
    int rc = qr_quantize(type, x, q, nrows, ncols, NULL, 1);
    if (rc == QR_OK) rc = qr_quantize(type, x, qi, nrows, ncols, im, 1);
    if (rc == QR_OK) rc = qr_dequantize(type, q, y, nrows, ncols, 1);
    if (rc != QR_OK) { fprintf(stderr, "codec error %d\n", rc); return 5; }
    put(q, R); put(qi, R); put(y, 4 * n);
    return 0;
}
