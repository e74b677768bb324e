/* ggml type ids and shared constants, for the C codec and the CUDA kernels alike. */
#ifndef QR_TYPES_H
#define QR_TYPES_H
#include "qrealign.h"   /* QR_OK / QR_E_* */

/* ggml type ids we handle */
enum { QR_F32 = 0, QR_F16 = 1, QR_Q4_0 = 2, QR_Q4_1 = 3, QR_Q5_0 = 6, QR_Q5_1 = 7, QR_Q8_0 = 8,
       QR_Q2_K = 10, QR_Q3_K = 11, QR_Q4_K = 12, QR_Q5_K = 13, QR_Q6_K = 14, QR_IQ4_NL = 20, QR_BF16 = 30 };
#define QK_K 256

#endif
