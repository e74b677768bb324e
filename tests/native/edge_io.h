// The edge checks' (edge_codec_check.c, edge_qr5k128_check.c) memory and output helpers: they run under
// qemu-aarch64 and report through exit codes, so a failed allocation or write ends the process with its own code.
#pragma once
#include <stdio.h>
#include <stdlib.h>

static void *get(size_t n) {
    void *p = calloc(n ? n : 1, 1);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(3); }
    return p;
}

static void put(const void *p, size_t n) {
    if (fwrite(p, 1, n, stdout) != n) { perror("write"); exit(4); }
}
