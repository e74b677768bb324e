/* Public API of the native codec: type lookup, fp16/bf16 casts and the row-parallel driver. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
#include "internal.h"

static const qr_codec *find_codec(int type) {
    const qr_codec *c = qr_codec_legacy(type);
    if (!c) c = qr_codec_k(type);
    return c ? c : qr_codec_custom(type);
}

int64_t qr_block_size(int type) { const qr_codec *c = find_codec(type); return c ? c->block : 0; }
size_t qr_type_size(int type) { const qr_codec *c = find_codec(type); return c ? c->size : 0; }
int qr_type_outliers(int type) { const qr_codec *c = find_codec(type); return c ? c->nout : 0; }
size_t qr_row_size(int type, int64_t ncols) {
    const qr_codec *c = find_codec(type);
    return c ? (size_t)(ncols / c->block) * c->size : 0;
}

/* ---- fp16 / bf16 ---------------------------------------------------------------------------- */

/* the scalar conversions live in qr_hd.h (shared with the CUDA kernels) */
void qr_fp32_to_fp16(const float *src, uint16_t *dst, int64_t n) { for (int64_t i = 0; i < n; ++i) dst[i] = qr_f32_to_f16(src[i]); }
void qr_fp16_to_fp32(const uint16_t *src, float *dst, int64_t n) { for (int64_t i = 0; i < n; ++i) dst[i] = qr_f16_to_f32(src[i]); }

void qr_fp32_to_bf16(const float *src, uint16_t *dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        uint32_t u = qr_f2u(src[i]);
        if ((u & 0x7fffffffu) > 0x7f800000u) dst[i] = (uint16_t)((u >> 16) | 64);   /* quiet NaN */
        else dst[i] = (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
    }
}

/* ---- row-parallel driver -------------------------------------------------------------------- */

typedef enum { OP_QUANT, OP_DEQUANT, OP_PACK, OP_UNPACK } op_kind;

typedef struct {
    op_kind op;
    const qr_codec *c;
    int64_t row0, row1, ncols;
    const float *fsrc; float *fdst;            /* float side */
    const uint8_t *bsrc; uint8_t *bdst;        /* block side */
    const float *imatrix;
    uint8_t *q; uint16_t *d, *dmin; uint8_t *sc, *mn;  /* pack/unpack parameter arrays */
    uint8_t *oidx; uint16_t *oval;                     /* outliers (types with nout > 0) */
    int rc;
} job;

static void *run_job(void *arg) {
    job *j = (job *)arg;
    const qr_codec *c = j->c;
    const int64_t n = j->ncols, nb = n / c->block, rb = (int64_t)(nb * c->size), ns = nb * c->nsub, no = nb * c->nout;
    for (int64_t r = j->row0; r < j->row1 && j->rc == QR_OK; ++r) {
        switch (j->op) {
        case OP_QUANT: c->quantize(j->fsrc + r * n, j->bdst + r * rb, n, j->imatrix); break;
        case OP_DEQUANT: c->dequantize(j->bsrc + r * rb, j->fdst + r * n, n); break;
        case OP_PACK:
            if (c->nout) {
                j->rc = c->pack_out(j->q + r * n, j->d + r * nb, j->dmin + r * nb, j->sc + r * ns, j->mn + r * ns,
                                    j->oidx + r * no, j->oval + r * no, j->bdst + r * rb, n);
                break;
            }
            j->rc = c->pack(j->q + r * n, j->d + r * nb, j->dmin ? j->dmin + r * nb : NULL,
                            j->sc ? j->sc + r * ns : NULL, j->mn ? j->mn + r * ns : NULL, j->bdst + r * rb, n);
            break;
        case OP_UNPACK:
            if (c->nout) {
                c->unpack_out(j->bsrc + r * rb, j->q + r * n, j->d + r * nb, j->dmin + r * nb, j->sc + r * ns,
                              j->mn + r * ns, j->oidx + r * no, j->oval + r * no, n);
                break;
            }
            c->unpack(j->bsrc + r * rb, j->q + r * n, j->d + r * nb, j->dmin ? j->dmin + r * nb : NULL,
                      j->sc ? j->sc + r * ns : NULL, j->mn ? j->mn + r * ns : NULL, n);
            break;
        }
    }
    return NULL;
}

static int run_parallel(job proto, int64_t nrows, int nthreads) {
    if (nthreads <= 0) nthreads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (nthreads > 64) nthreads = 64;
    if ((int64_t)nthreads > nrows) nthreads = nrows > 0 ? (int)nrows : 1;
    job jobs[64];
    pthread_t th[64];
    const int64_t per = (nrows + nthreads - 1) / nthreads;
    int started = 0;
    for (int t = 0; t < nthreads; ++t) {
        jobs[t] = proto;
        jobs[t].row0 = t * per;
        jobs[t].row1 = (t + 1) * per < nrows ? (t + 1) * per : nrows;
        jobs[t].rc = QR_OK;
    }
    for (int t = 1; t < nthreads; ++t)   /* thread 0 is the caller */
        if (pthread_create(&th[t], NULL, run_job, &jobs[t]) == 0) started = t; else { run_job(&jobs[t]); }
    run_job(&jobs[0]);
    for (int t = 1; t <= started; ++t) pthread_join(th[t], NULL);
    for (int t = 0; t < nthreads; ++t) if (jobs[t].rc != QR_OK) return jobs[t].rc;
    return QR_OK;
}

static int check(const qr_codec *c, int64_t nrows, int64_t ncols) {
    if (!c) return QR_E_TYPE;
    if (ncols <= 0 || nrows < 0 || ncols % c->block) return QR_E_NCOLS;
    return QR_OK;
}

int qr_quantize(int type, const float *src, void *dst, int64_t nrows, int64_t ncols, const float *imatrix, int nthreads) {
    const qr_codec *c = find_codec(type);
    int rc = check(c, nrows, ncols);
    if (rc) return rc;
    if (!src || !dst) return QR_E_ARG;
    job j = {.op = OP_QUANT, .c = c, .ncols = ncols, .fsrc = src, .bdst = dst, .imatrix = imatrix};
    return run_parallel(j, nrows, nthreads);
}

int qr_dequantize(int type, const void *src, float *dst, int64_t nrows, int64_t ncols, int nthreads) {
    const qr_codec *c = find_codec(type);
    int rc = check(c, nrows, ncols);
    if (rc) return rc;
    if (!src || !dst) return QR_E_ARG;
    job j = {.op = OP_DEQUANT, .c = c, .ncols = ncols, .bsrc = src, .fdst = dst};
    return run_parallel(j, nrows, nthreads);
}

static int check_params(const qr_codec *c, const void *q, const void *d, const void *dmin, const void *sc, const void *mn) {
    if (!q || !d) return QR_E_ARG;
    if (c->has_dmin && !dmin) return QR_E_ARG;
    if (c->nsub && !sc) return QR_E_ARG;
    if (c->has_mn && !mn) return QR_E_ARG;
    return QR_OK;
}

int qr_pack_outliers(int type, const uint8_t *q, const uint16_t *d, const uint16_t *dmin, const uint8_t *sc,
                     const uint8_t *mn, const uint8_t *oidx, const uint16_t *oval, void *dst, int64_t nrows,
                     int64_t ncols) {
    const qr_codec *c = find_codec(type);
    int rc = check(c, nrows, ncols);
    if (rc) return rc;
    if ((rc = check_params(c, q, d, dmin, sc, mn)) || !dst) return rc ? rc : QR_E_ARG;
    if (c->nout && (!oidx || !oval)) return QR_E_ARG;
    job j = {.op = OP_PACK, .c = c, .ncols = ncols, .bdst = dst, .q = (uint8_t *)q, .d = (uint16_t *)d,
             .dmin = (uint16_t *)dmin, .sc = (uint8_t *)sc, .mn = (uint8_t *)mn, .oidx = (uint8_t *)oidx,
             .oval = (uint16_t *)oval};
    return run_parallel(j, nrows, 0);
}

int qr_unpack_outliers(int type, const void *src, uint8_t *q, uint16_t *d, uint16_t *dmin, uint8_t *sc,
                       uint8_t *mn, uint8_t *oidx, uint16_t *oval, int64_t nrows, int64_t ncols) {
    const qr_codec *c = find_codec(type);
    int rc = check(c, nrows, ncols);
    if (rc) return rc;
    if ((rc = check_params(c, q, d, dmin, sc, mn)) || !src) return rc ? rc : QR_E_ARG;
    if (c->nout && (!oidx || !oval)) return QR_E_ARG;
    job j = {.op = OP_UNPACK, .c = c, .ncols = ncols, .bsrc = src, .q = q, .d = d, .dmin = dmin, .sc = sc, .mn = mn,
             .oidx = oidx, .oval = oval};
    return run_parallel(j, nrows, 0);
}

int qr_pack(int type, const uint8_t *q, const uint16_t *d, const uint16_t *dmin, const uint8_t *sc,
            const uint8_t *mn, void *dst, int64_t nrows, int64_t ncols) {
    return qr_pack_outliers(type, q, d, dmin, sc, mn, NULL, NULL, dst, nrows, ncols);
}

int qr_unpack(int type, const void *src, uint8_t *q, uint16_t *d, uint16_t *dmin, uint8_t *sc, uint8_t *mn,
              int64_t nrows, int64_t ncols) {
    return qr_unpack_outliers(type, src, q, d, dmin, sc, mn, NULL, NULL, nrows, ncols);
}
