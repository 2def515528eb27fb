/*
 * tracer_dump.h - dump a port's activations for gpt2-tracer. Single header, C99, no dependencies;
 * compiles as C++ and in CUDA host code (pass host pointers: copy device buffers back first).
 *
 *     #include "tracer_dump.h"
 *     long long shape[3] = {1, T, C};
 *     tracer_dump("dump", "blocks.0.ln1", ln1, "f32", 3, shape);   // -> dump/blocks.0.ln1.npy
 *     tracer_log_first8(stdout, "AFTER_LN1", 0, 0, ln1);           // [AFTER_LN1] Layer 0, Token 0: [...]
 *
 * then `tracer compare GOLDEN.h5 dump/ --case case0` (or `tracer import-log` on the printed lines).
 * `tracer include-dir` prints the directory holding this file.
 *
 * tracer_dump writes <dir>/<stage>.npy (NumPy format 1.0, little-endian, C order) and appends one
 * line to <dir>/tracer_manifest.jsonl: {"stage", "file", "dtype", "shape"[, "layout"]}. It creates
 * <dir> when missing (not its parents) and replaces the .npy atomically (temporary name, rename).
 *   dtype "f32": float             -> '<f4'
 *         "f64": double            -> '<f8'
 *         "f16": IEEE half bits (uint16_t, __half)          -> '<f2'
 *         "bf16": bfloat16 bits (uint16_t, __nv_bfloat16)   -> '<f4', widened exactly (NumPy has no
 *                 bfloat16); the manifest keeps "dtype": "bf16" so the comparator uses bf16 tolerances.
 * Stage names are the canonical ones (embed.sum, blocks.{i}.attn.q, logits, ...): see `tracer inspect`.
 * Shapes are the canonical ones too ([1,T,C], [1,H,T,D], [1,H,T,T], ...); a leading batch of 1 may be
 * left out. An array in another axis order can say so with tracer_dump_layout(..., "BTHD") (letters
 * B batch, T token, S key position, H head, D head dim, C width = H*D); the importer rearranges it.
 *
 * Every function returns 0 on success and nonzero on failure, after one line on stderr.
 */
#ifndef TRACER_DUMP_H
#define TRACER_DUMP_H

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#if defined(_WIN32)
#include <direct.h>
#define TRACER__MKDIR(d) _mkdir(d)
#else
#include <sys/stat.h>
#define TRACER__MKDIR(d) mkdir((d), 0777)
#endif

#define TRACER_MAX_NDIM 8
#define TRACER_MAX_PATH 4096

static inline int tracer__fail(const char *what, const char *name, const char *why)
{
    fprintf(stderr, "tracer_dump: %s %s: %s\n", what, name, why);
    return 1;
}

/* dtype name -> element size in the caller's buffer, and the .npy descr written. 0 = unknown. */
static inline int tracer__dtype(const char *dtype, const char **descr)
{
    if (!dtype) return 0;
    if (strcmp(dtype, "f32") == 0) { *descr = "<f4"; return 4; }
    if (strcmp(dtype, "f64") == 0) { *descr = "<f8"; return 8; }
    if (strcmp(dtype, "f16") == 0) { *descr = "<f2"; return 2; }
    if (strcmp(dtype, "bf16") == 0) { *descr = "<f4"; return 2; }
    return 0;
}

/* Element i of `data` as little-endian bytes in `out`; returns how many bytes it wrote. */
static inline int tracer__element(const unsigned char *data, long long i, int size, int bf16, unsigned char *out)
{
    uint64_t bits = 0;
    int k, n = bf16 ? 4 : size;
    if (size == 8) { uint64_t v; memcpy(&v, data + 8 * i, 8); bits = v; }
    else if (size == 4) { uint32_t v; memcpy(&v, data + 4 * i, 4); bits = v; }
    else { uint16_t v; memcpy(&v, data + 2 * i, 2); bits = bf16 ? (uint64_t)v << 16 : v; }
    for (k = 0; k < n; k++) out[k] = (unsigned char)(bits >> (8 * k));
    return n;
}

static inline int tracer__write_npy(const char *path, const void *data, int size, int bf16, const char *descr,
                                    int ndim, const long long *shape, long long count)
{
    char header[512], dims[TRACER_MAX_NDIM * 24 + 8], tmp[TRACER_MAX_PATH + 8];
    unsigned char buf[1 << 14];
    size_t len = 0, used = 0;
    long long i;
    int d, ok;
    FILE *f;
    dims[0] = '\0';
    for (d = 0; d < ndim; d++)
        len += (size_t)sprintf(dims + len, "%lld%s", shape[d], ndim == 1 ? "," : d + 1 < ndim ? ", " : "");
    len = (size_t)sprintf(header, "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }", descr, dims);
    while ((10 + len + 1) % 64) header[len++] = ' ';    /* pad so the data starts 64-byte aligned */
    header[len++] = '\n';
    sprintf(tmp, "%s.tmp", path);
    f = fopen(tmp, "wb");
    if (!f) return tracer__fail("cannot write", tmp, strerror(errno));
    fwrite("\x93NUMPY\x01\x00", 1, 8, f);
    fputc((int)(len & 0xff), f);
    fputc((int)(len >> 8), f);
    fwrite(header, 1, len, f);
    for (i = 0; i < count; i++) {
        used += (size_t)tracer__element((const unsigned char *)data, i, size, bf16, buf + used);
        if (used + 8 > sizeof buf || i + 1 == count) { fwrite(buf, 1, used, f); used = 0; }
    }
    ok = !ferror(f);
    if (fclose(f) != 0) ok = 0;
    if (!ok) { remove(tmp); return tracer__fail("cannot write", path, strerror(errno)); }
#if defined(_WIN32)
    remove(path);
#endif
    if (rename(tmp, path) != 0) { remove(tmp); return tracer__fail("cannot write", path, strerror(errno)); }
    return 0;
}

/* tracer_dump with a layout note: the axis letters of `data` when they are not the canonical ones. */
static inline int tracer_dump_layout(const char *dir, const char *stage, const void *data, const char *dtype,
                                     int ndim, const long long *shape, const char *layout)
{
    char path[TRACER_MAX_PATH];
    const char *descr = "";
    int d, size = tracer__dtype(dtype, &descr);
    long long count = 1;
    FILE *m;
    if (!dir || !stage || !*stage || strchr(stage, '/') || strchr(stage, '\\') || strchr(stage, '"'))
        return tracer__fail("bad stage name", stage ? stage : "(null)", "expected e.g. blocks.0.ln1");
    if (!size) return tracer__fail("unknown dtype for", stage, "use \"f32\", \"f16\", \"bf16\" or \"f64\"");
    if (ndim < 0 || ndim > TRACER_MAX_NDIM || (ndim > 0 && !shape))
        return tracer__fail("bad shape for", stage, "ndim must be 0..8 with a shape array");
    for (d = 0; d < ndim; d++) {
        if (shape[d] < 0) return tracer__fail("bad shape for", stage, "negative dimension");
        count *= shape[d];
    }
    if (count > 0 && !data) return tracer__fail("no data for", stage, "data is NULL");
    if (strlen(dir) + strlen(stage) + 32 > TRACER_MAX_PATH) return tracer__fail("path too long for", stage, dir);
    if (TRACER__MKDIR(dir) != 0 && errno != EEXIST) return tracer__fail("cannot create", dir, strerror(errno));
    sprintf(path, "%s/%s.npy", dir, stage);
    if (tracer__write_npy(path, data, size, strcmp(dtype, "bf16") == 0, descr, ndim, shape, count) != 0) return 1;
    sprintf(path, "%s/tracer_manifest.jsonl", dir);
    m = fopen(path, "a");
    if (!m) return tracer__fail("cannot append to", path, strerror(errno));
    fprintf(m, "{\"stage\": \"%s\", \"file\": \"%s.npy\", \"dtype\": \"%s\", \"shape\": [", stage, stage, dtype);
    for (d = 0; d < ndim; d++) fprintf(m, "%s%lld", d ? ", " : "", shape[d]);
    fprintf(m, "]");
    if (layout && *layout && !strchr(layout, '"')) fprintf(m, ", \"layout\": \"%s\"", layout);
    fprintf(m, "}\n");
    return fclose(m) != 0 ? tracer__fail("cannot append to", path, strerror(errno)) : 0;
}

/* Write <dir>/<stage>.npy from `data` (dtype "f32", "f16", "bf16" or "f64", C order, shape[ndim]). */
static inline int tracer_dump(const char *dir, const char *stage, const void *data, const char *dtype, int ndim,
                              const long long *shape)
{
    return tracer_dump_layout(dir, stage, data, dtype, ndim, shape, NULL);
}

/* One debug-print line: [TAG] Layer L, Token T: [v0, ..., v(n-1)] (layer < 0: no "Layer" field), values
 * as %.7g, the format `tracer import-log` reads and `tracer compare --log-format` prints. */
static inline int tracer_log_values(FILE *out, const char *tag, int layer, int token, const float *row, int n)
{
    int k;
    if (!out || !tag || !row || n < 1) return tracer__fail("bad arguments to", "tracer_log_values", tag ? tag : "");
    fprintf(out, "[%s] ", tag);
    if (layer >= 0) fprintf(out, "Layer %d, ", layer);
    fprintf(out, "Token %d: [", token);
    for (k = 0; k < n; k++) {
        double v = row[k];
        const char *sep = k ? ", " : "";
        if (isnan(v)) fprintf(out, "%snan", sep);
        else if (isinf(v)) fprintf(out, "%s%s", sep, v > 0 ? "inf" : "-inf");
        else fprintf(out, "%s%.7g", sep, v);
    }
    fprintf(out, "]\n");
    return ferror(out) ? 1 : 0;
}

/* The first 8 values of a token's row (row must hold at least 8 floats). */
static inline int tracer_log_first8(FILE *out, const char *tag, int layer, int token, const float *row)
{
    return tracer_log_values(out, tag, layer, token, row, 8);
}

#endif /* TRACER_DUMP_H */
