/* Byte layouts of the K-quant super-blocks (Q2_K..Q6_K, 256 weights; ggml-common.h of the pinned llama.cpp,
 * and qrealign's QR5_K128, 128 weights, native/qr_custom.h): the decoded `kblock` every K codec works on, the
 * bit-field packers, and one writer/reader per type.
 * Split from blocks_k.h (the scale searches and quantizers), which includes it; the same C11 / CUDA C++
 * rules apply (no function pointers, no file-scope tables, explicit casts).
 */
#ifndef QR_BLOCKS_K_LAYOUT_H
#define QR_BLOCKS_K_LAYOUT_H
#include "qr_hd.h"
#include "qr_types.h"

#define NSUB_MAX 16

/* one super-block, decoded: q[i] is weight i's code, sc/mn per sub-block (see qrealign.h); a 128-weight
 * type uses the first half */
typedef struct {
    uint8_t q[QK_K];
    uint16_t d, dmin;  /* fp16 bit patterns */
    uint8_t sc[NSUB_MAX], mn[NSUB_MAX];
} kblock;

/* ---- bit packing shared by the layouts -------------------------------------------------------- */

QR_HD void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
QR_HD uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* 2-bit fields (Q2_K/Q3_K qs, Q6_K qh): byte 32h+l holds bits `shift`.. of value 128h+32k+l
 * in its bits 2k..2k+1, k = 0..3, h = 0..1. */
QR_HD void put_crumbs(uint8_t *dst, const uint8_t *q, int shift) {
    for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l) {
            unsigned v = 0;
            for (int k = 0; k < 4; ++k) v |= (unsigned)((q[128 * h + 32 * k + l] >> shift) & 3) << (2 * k);
            dst[32 * h + l] = (uint8_t)v;
        }
}
QR_HD void get_crumbs(const uint8_t *src, uint8_t *q, int shift) {
    for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l)
            for (int k = 0; k < 4; ++k)
                q[128 * h + 32 * k + l] |= (uint8_t)(((src[32 * h + l] >> (2 * k)) & 3) << shift);
}

/* 4-bit fields of n values: byte g*half+l holds the low nibbles of value 2g*half+l (low) and 2g*half+half+l
 * (high). half = 32 for Q4_K/Q5_K/QR5_K128 qs, 64 for Q6_K ql. */
QR_HD void put_nibbles(uint8_t *dst, const uint8_t *q, int half, int n) {
    for (int g = 0; g < n / (2 * half); ++g)
        for (int l = 0; l < half; ++l)
            dst[g * half + l] = (uint8_t)((q[2 * g * half + l] & 0xF) | (q[2 * g * half + half + l] & 0xF) << 4);
}
QR_HD void get_nibbles(const uint8_t *src, uint8_t *q, int half, int n) {
    for (int g = 0; g < n / (2 * half); ++g)
        for (int l = 0; l < half; ++l) {
            q[2 * g * half + l] |= src[g * half + l] & 0xF;
            q[2 * g * half + half + l] |= src[g * half + l] >> 4;
        }
}

/* 1-bit fields of n values in n/8 bytes (Q3_K hmask, Q5_K qh: 32 bytes; QR5_K128 qh: 16): bit i/(n/8) of
 * byte i%(n/8) holds bit `bit` of value i. */
QR_HD void put_bits(uint8_t *dst, const uint8_t *q, int bit, int n) {
    const int nb = n / 8;
    memset(dst, 0, (size_t)nb);
    for (int i = 0; i < n; ++i) dst[i % nb] |= (uint8_t)(((q[i] >> bit) & 1) << (i / nb));
}
QR_HD void get_bits(const uint8_t *src, uint8_t *q, int bit, int n) {
    const int nb = n / 8;
    for (int i = 0; i < n; ++i) q[i] |= (uint8_t)(((src[i % nb] >> (i / nb)) & 1) << bit);
}

/* Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins in 12 bytes (all 96 bits used). Sub-blocks 0-3 sit
 * whole in bytes 0-3 (scale) / 4-7 (min); 4-7 keep their low nibbles in bytes 8-11 and their top two
 * bits in the spare top bits of bytes 0-3 / 4-7. No masking here, as in ggml: an out-of-range code
 * from a degenerate search spills into neighbouring bits identically. */
QR_HD void put_scales_k4(uint8_t *s, const uint8_t *ls, const uint8_t *lm) {
    for (int j = 0; j < 4; ++j) { s[j] = ls[j]; s[j + 4] = lm[j]; }
    for (int j = 4; j < 8; ++j) {
        s[j + 4] = (uint8_t)((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
        s[j - 4] |= (uint8_t)((ls[j] >> 4) << 6);
        s[j] |= (uint8_t)((lm[j] >> 4) << 6);
    }
}
QR_HD void get_scales_k4(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; ++j) { sc[j] = s[j] & 63; mn[j] = s[j + 4] & 63; }
    for (int j = 4; j < 8; ++j) {
        sc[j] = (uint8_t)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        mn[j] = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* Q3_K: 16 six-bit scale codes in 12 bytes: low nibbles of codes 0-7 / 8-15 in the low / high
 * halves of bytes 0-7, top two bits of code j at bit 2*(j/4) of byte 8 + j%4. */
QR_HD void put_scales_q3(uint8_t *s, const uint8_t *c) {
    memset(s, 0, 12);
    for (int j = 0; j < 16; ++j) {
        s[j % 8] |= (uint8_t)((c[j] & 0xF) << (4 * (j / 8)));
        s[8 + j % 4] |= (uint8_t)((c[j] >> 4) << (2 * (j / 4)));
    }
}
QR_HD void get_scales_q3(const uint8_t *s, uint8_t *c) {
    for (int j = 0; j < 16; ++j)
        c[j] = (uint8_t)(((s[j % 8] >> (4 * (j / 8))) & 0xF) | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4));
}

/* ---- block layouts (ggml-common.h) ------------------------------------------------------------ */
/* write_*: kblock -> bytes (codes must be in range); read_*: bytes -> kblock, OR-ing code bits into a
 * zeroed kblock. */

/* Q2_K, 84 bytes: scales[16] (scale | min << 4), qs[64], d, dmin */
QR_HD void write_q2k(const kblock *b, uint8_t *y) {
    for (int j = 0; j < 16; ++j) y[j] = (uint8_t)(b->sc[j] | b->mn[j] << 4);
    put_crumbs(y + 16, b->q, 0);
    put16(y + 80, b->d); put16(y + 82, b->dmin);
}
QR_HD void read_q2k(const uint8_t *y, kblock *b) {
    for (int j = 0; j < 16; ++j) { b->sc[j] = y[j] & 0xF; b->mn[j] = y[j] >> 4; }
    get_crumbs(y + 16, b->q, 0);
    b->d = get16(y + 80); b->dmin = get16(y + 82);
}

/* Q3_K, 110 bytes: hmask[32] (bit 2 of the code), qs[64] (bits 0-1), scales[12], d */
QR_HD void write_q3k(const kblock *b, uint8_t *y) {
    put_bits(y, b->q, 2, QK_K);
    put_crumbs(y + 32, b->q, 0);
    put_scales_q3(y + 96, b->sc);
    put16(y + 108, b->d);
}
QR_HD void read_q3k(const uint8_t *y, kblock *b) {
    get_bits(y, b->q, 2, QK_K);
    get_crumbs(y + 32, b->q, 0);
    get_scales_q3(y + 96, b->sc);
    b->d = get16(y + 108);
}

/* Q4_K, 144 bytes: d, dmin, scales[12], qs[128] */
QR_HD void write_q4k(const kblock *b, uint8_t *y) {
    put16(y, b->d); put16(y + 2, b->dmin);
    put_scales_k4(y + 4, b->sc, b->mn);
    put_nibbles(y + 16, b->q, 32, QK_K);
}
QR_HD void read_q4k(const uint8_t *y, kblock *b) {
    b->d = get16(y); b->dmin = get16(y + 2);
    get_scales_k4(y + 4, b->sc, b->mn);
    get_nibbles(y + 16, b->q, 32, QK_K);
}

/* Q5_K, 176 bytes: d, dmin, scales[12], qh[32] (bit 4 of the code), qs[128] (bits 0-3) */
QR_HD void write_q5k(const kblock *b, uint8_t *y) {
    put16(y, b->d); put16(y + 2, b->dmin);
    put_scales_k4(y + 4, b->sc, b->mn);
    put_bits(y + 16, b->q, 4, QK_K);
    put_nibbles(y + 48, b->q, 32, QK_K);
}
QR_HD void read_q5k(const uint8_t *y, kblock *b) {
    b->d = get16(y); b->dmin = get16(y + 2);
    get_scales_k4(y + 4, b->sc, b->mn);
    get_bits(y + 16, b->q, 4, QK_K);
    get_nibbles(y + 48, b->q, 32, QK_K);
}

/* Q6_K, 210 bytes: ql[128] (bits 0-3), qh[64] (bits 4-5), int8 scales[16], d */
QR_HD void write_q6k(const kblock *b, uint8_t *y) {
    put_nibbles(y, b->q, 64, QK_K);
    put_crumbs(y + 128, b->q, 4);
    memcpy(y + 192, b->sc, 16);
    put16(y + 208, b->d);
}
QR_HD void read_q6k(const uint8_t *y, kblock *b) {
    get_nibbles(y, b->q, 64, QK_K);
    get_crumbs(y + 128, b->q, 4);
    memcpy(b->sc, y + 192, 16);
    b->d = get16(y + 208);
}

/* QR5_K128 (qrealign, native/qr_custom.h), 90 bytes: d, dmin, scales[6], qh[16] (bit 4 of the code of weight
 * i at bit i/16 of byte i%16), qs[64] (bits 0-3 as Q5_K's first 128 weights: byte 32g+l holds weights 64g+l
 * (low nibble) and 64g+32+l (high)). The 4 six-bit scales sit in the low bits of bytes 0-3; each min keeps
 * its low nibble in byte 4 + j/2 (j even: low half) and its top two bits in the spare top of byte j. */
QR_HD void put_scales_k128(uint8_t *s, const uint8_t *ls, const uint8_t *lm) {
    for (int j = 0; j < 4; ++j) s[j] = (uint8_t)((ls[j] & 63) | ((lm[j] >> 4) << 6));
    s[4] = (uint8_t)((lm[0] & 0xF) | (lm[1] & 0xF) << 4);
    s[5] = (uint8_t)((lm[2] & 0xF) | (lm[3] & 0xF) << 4);
}
QR_HD void get_scales_k128(const uint8_t *s, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = s[j] & 63;
        mn[j] = (uint8_t)(((s[4 + j / 2] >> (4 * (j % 2))) & 0xF) | ((s[j] >> 6) << 4));
    }
}
QR_HD void write_qr5k128(const kblock *b, uint8_t *y) {
    put16(y, b->d); put16(y + 2, b->dmin);
    put_scales_k128(y + 4, b->sc, b->mn);
    put_bits(y + 10, b->q, 4, 128);
    put_nibbles(y + 26, b->q, 32, 128);
}
QR_HD void read_qr5k128(const uint8_t *y, kblock *b) {
    b->d = get16(y); b->dmin = get16(y + 2);
    get_scales_k128(y + 4, b->sc, b->mn);
    get_bits(y + 10, b->q, 4, 128);
    get_nibbles(y + 26, b->q, 32, 128);
}

#endif /* QR_BLOCKS_K_LAYOUT_H */
