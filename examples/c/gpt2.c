/*
 * A GPT-2 forward pass in plain C99, instrumented for gpt2-tracer: the example port.
 *
 *   tracer export goldens/tiny.h5 --format llmc -o port_inputs
 *   cc -std=c99 -O2 -I "$(tracer include-dir)" examples/c/gpt2.c -lm -o gpt2
 *   ./gpt2 port_inputs case0 port_dump > port.log        # --bug: a one-line porting bug (erf GELU)
 *   tracer compare goldens/tiny.h5 port_dump --case case0
 *   tracer import-log port.log --golden goldens/tiny.h5 --case case0 -o port_log.h5
 *
 * Weights come in llm.c's checkpoint format (matrices [out, in], so y = x W^T + b), the ids in llm.c's
 * token-file format; one sequence (B = 1) of T tokens. The glue for the tool is the two helpers below:
 * `dump` (one tracer_dump call per stage) and `log8` (one debug-print line per stage and token).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tracer_dump.h"

typedef struct {
    int maxT, V, L, NH, C, Vp;
    float *wte, *wpe, *ln1w, *ln1b, *qkvw, *qkvb, *attprojw, *attprojb;
    float *ln2w, *ln2b, *fcw, *fcb, *fcprojw, *fcprojb, *lnfw, *lnfb;
} GPT2;

static const char *dump_dir;
static int T_len;

static void fail(const char *what, const char *path) { fprintf(stderr, "gpt2: %s %s\n", what, path); exit(1); }

static FILE *open_with_header(const char *path, int magic, int *header) {
    FILE *f = fopen(path, "rb");
    if (!f) fail("cannot open", path);
    if (fread(header, sizeof(int), 256, f) != 256 || header[0] != magic) fail("bad header in", path);
    return f;
}

static void load_model(GPT2 *m, const char *path) {
    int h[256];
    FILE *f = open_with_header(path, 20240326, h);
    if (h[1] != 3) fail("not a float32 (version 3) checkpoint:", path);
    m->maxT = h[2]; m->V = h[3]; m->L = h[4]; m->NH = h[5]; m->C = h[6]; m->Vp = h[7];
    size_t C = m->C, L = m->L, sizes[16] = {m->Vp * C, m->maxT * C, L * C, L * C, L * 3 * C * C, L * 3 * C,
        L * C * C, L * C, L * C, L * C, L * 4 * C * C, L * 4 * C, L * C * 4 * C, L * C, C, C};
    float **slots[16] = {&m->wte, &m->wpe, &m->ln1w, &m->ln1b, &m->qkvw, &m->qkvb, &m->attprojw, &m->attprojb,
        &m->ln2w, &m->ln2b, &m->fcw, &m->fcb, &m->fcprojw, &m->fcprojb, &m->lnfw, &m->lnfb};
    for (int i = 0; i < 16; i++) {
        *slots[i] = malloc(sizes[i] * sizeof(float));
        if (fread(*slots[i], sizeof(float), sizes[i], f) != sizes[i]) fail("truncated checkpoint", path);
    }
    fclose(f);
}

static int *load_tokens(const char *path, int *n) {
    int h[256];
    FILE *f = open_with_header(path, 20240520, h);
    if (h[1] != 1) fail("expected uint16 tokens (version 1) in", path);
    unsigned short *raw = malloc(h[2] * sizeof *raw);
    int *ids = malloc(h[2] * sizeof *ids);
    if (fread(raw, sizeof *raw, h[2], f) != (size_t)h[2]) fail("truncated token file", path);
    for (int i = 0; i < h[2]; i++) ids[i] = raw[i];
    fclose(f);
    free(raw);
    *n = h[2];
    return ids;
}

/* One tracer_dump call per stage: blocks.{layer}.{stage} (layer < 0: the stage name as given), shape [1, d...]. */
static void dump(const char *stage, int layer, const float *x, long long d1, long long d2, long long d3) {
    char name[64];
    long long shape[4] = {1, d1, d2, d3};
    if (layer >= 0) snprintf(name, sizeof name, "blocks.%d.%s", layer, stage);
    else snprintf(name, sizeof name, "%s", stage);
    if (tracer_dump(dump_dir, name, x, "f32", d3 ? 4 : 3, shape) != 0) exit(1);
}

/* Debug prints of the first 8 values at the first and last token; `row` is the stride between tokens. */
static void log8(const char *tag, int layer, const float *x, int row) {
    tracer_log_first8(stdout, tag, layer, 0, x);
    tracer_log_first8(stdout, tag, layer, T_len - 1, x + (size_t)(T_len - 1) * row);
}

static void layernorm(float *out, const float *x, const float *w, const float *b, int T, int C) {
    for (int t = 0; t < T; t++) {
        const float *xt = x + t * C;
        float mean = 0, var = 0;
        for (int i = 0; i < C; i++) mean += xt[i];
        mean /= C;
        for (int i = 0; i < C; i++) var += (xt[i] - mean) * (xt[i] - mean);
        float rstd = 1.0f / sqrtf(var / C + 1e-5f);
        for (int i = 0; i < C; i++) out[t * C + i] = (xt[i] - mean) * rstd * w[i] + b[i];
    }
}

static void matmul(float *out, const float *x, const float *w, const float *b, int T, int C, int OC) {
    for (int t = 0; t < T; t++)
        for (int o = 0; o < OC; o++) {
            float acc = b ? b[o] : 0.0f;
            for (int i = 0; i < C; i++) acc += x[t * C + i] * w[o * C + i];
            out[t * OC + o] = acc;
        }
}

static void attention(float *q, float *k, float *v, float *scores, float *probs, float *ctx, const float *qkv,
                      int T, int C, int NH) {
    int hs = C / NH;
    for (int h = 0; h < NH; h++)               /* [T, 3C] -> q, k, v as [NH, T, hs] */
        for (int t = 0; t < T; t++)
            for (int d = 0; d < hs; d++) {
                size_t at = ((size_t)h * T + t) * hs + d;
                q[at] = qkv[t * 3 * C + h * hs + d];
                k[at] = qkv[t * 3 * C + C + h * hs + d];
                v[at] = qkv[t * 3 * C + 2 * C + h * hs + d];
            }
    for (int h = 0; h < NH; h++)
        for (int t = 0; t < T; t++) {
            float *s = scores + ((size_t)h * T + t) * T, *p = probs + ((size_t)h * T + t) * T, max = -INFINITY, sum = 0;
            for (int u = 0; u < T; u++) {
                float dot = 0;
                for (int d = 0; d < hs; d++) dot += q[(h * T + t) * hs + d] * k[(h * T + u) * hs + d];
                s[u] = u <= t ? dot / sqrtf((float)hs) : -INFINITY;   /* causal mask */
                if (s[u] > max) max = s[u];
            }
            for (int u = 0; u < T; u++) { p[u] = u <= t ? expf(s[u] - max) : 0.0f; sum += p[u]; }
            for (int u = 0; u < T; u++) p[u] /= sum;
        }
    for (int t = 0; t < T; t++)                /* ctx[t, h*hs + d] = sum_u probs[h,t,u] v[h,u,d] */
        for (int h = 0; h < NH; h++)
            for (int d = 0; d < hs; d++) {
                float acc = 0;
                for (int u = 0; u <= t; u++) acc += probs[((size_t)h * T + t) * T + u] * v[(h * T + u) * hs + d];
                ctx[t * C + h * hs + d] = acc;
            }
}

static void gelu(float *out, const float *x, int n, int bug) {
    for (int i = 0; i < n; i++) {
        float u = x[i];
        out[i] = bug ? 0.5f * u * (1.0f + erff(u / sqrtf(2.0f)))   /* the bug: exact erf GELU, GPT-2 uses tanh */
                     : 0.5f * u * (1.0f + tanhf(0.7978845608f * (u + 0.044715f * u * u * u)));
    }
}

static void add(float *out, const float *a, const float *b, int n) { for (int i = 0; i < n; i++) out[i] = a[i] + b[i]; }

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: gpt2 EXPORT_DIR CASE DUMP_DIR [--bug]\n"); return 2; }
    int bug = argc > 4 && strcmp(argv[4], "--bug") == 0;
    char path[4096];
    GPT2 m;
    snprintf(path, sizeof path, "%s/model.bin", argv[1]);
    load_model(&m, path);
    snprintf(path, sizeof path, "%s/inputs/%s.tokens.bin", argv[1], argv[2]);
    int T, *ids = load_tokens(path, &T);
    int C = m.C, NH = m.NH, V = m.V, hs = C / NH;
    dump_dir = argv[3];
    T_len = T;

    size_t TC = (size_t)T * C;
    float *tok = malloc(TC * 4), *pos = malloc(TC * 4), *x = malloc(TC * 4), *ln = malloc(TC * 4);
    float *qkv = malloc(3 * TC * 4), *q = malloc(TC * 4), *k = malloc(TC * 4), *v = malloc(TC * 4);
    float *scores = malloc((size_t)NH * T * T * 4), *probs = malloc((size_t)NH * T * T * 4), *ctx = malloc(TC * 4);
    float *attn = malloc(TC * 4), *mid = malloc(TC * 4), *fc = malloc(4 * TC * 4), *act = malloc(4 * TC * 4);
    float *mlp = malloc(TC * 4), *logits = malloc((size_t)T * V * 4);

    for (int t = 0; t < T; t++)
        for (int i = 0; i < C; i++) {
            tok[t * C + i] = m.wte[(size_t)ids[t] * C + i];
            pos[t * C + i] = m.wpe[(size_t)t * C + i];
        }
    add(x, tok, pos, T * C);
    dump("embed.tok", -1, tok, T, C, 0);
    dump("embed.pos", -1, pos, T, C, 0);
    dump("embed.sum", -1, x, T, C, 0);
    log8("AFTER_EMBED", -1, x, C);

    for (int l = 0; l < m.L; l++) {
        size_t c = (size_t)l * C;
        layernorm(ln, x, m.ln1w + c, m.ln1b + c, T, C);
        dump("ln1", l, ln, T, C, 0);                     log8("AFTER_LN1", l, ln, C);
        matmul(qkv, ln, m.qkvw + 3 * c * C, m.qkvb + 3 * c, T, C, 3 * C);
        dump("attn.qkv", l, qkv, T, 3 * C, 0);
        attention(q, k, v, scores, probs, ctx, qkv, T, C, NH);
        dump("attn.q", l, q, NH, T, hs);                 log8("AFTER_Q", l, q, hs);
        dump("attn.k", l, k, NH, T, hs);
        dump("attn.v", l, v, NH, T, hs);
        dump("attn.scores", l, scores, NH, T, T);
        dump("attn.probs", l, probs, NH, T, T);          log8("AFTER_ATTN", l, probs, T);
        dump("attn.ctx", l, ctx, T, C, 0);               log8("AFTER_CONCAT", l, ctx, C);
        matmul(attn, ctx, m.attprojw + c * C, m.attprojb + c, T, C, C);
        dump("attn.out", l, attn, T, C, 0);              log8("AFTER_O_PROJ", l, attn, C);
        add(mid, x, attn, T * C);
        dump("resid_mid", l, mid, T, C, 0);              log8("AFTER_RESIDUAL1", l, mid, C);
        layernorm(ln, mid, m.ln2w + c, m.ln2b + c, T, C);
        dump("ln2", l, ln, T, C, 0);                     log8("AFTER_LN2", l, ln, C);
        matmul(fc, ln, m.fcw + 4 * c * C, m.fcb + 4 * c, T, C, 4 * C);
        dump("mlp.fc", l, fc, T, 4 * C, 0);              log8("AFTER_FFN1", l, fc, 4 * C);
        gelu(act, fc, T * 4 * C, bug);
        dump("mlp.act", l, act, T, 4 * C, 0);            log8("AFTER_GELU", l, act, 4 * C);
        matmul(mlp, act, m.fcprojw + 4 * c * C, m.fcprojb + c, T, 4 * C, C);
        dump("mlp.out", l, mlp, T, C, 0);                log8("AFTER_FFN2", l, mlp, C);
        add(x, mid, mlp, T * C);
        dump("resid_post", l, x, T, C, 0);               log8("AFTER_RESIDUAL2", l, x, C);
    }
    layernorm(ln, x, m.lnfw, m.lnfb, T, C);
    dump("final.ln", -1, ln, T, C, 0);                   log8("FINAL_LN", -1, ln, C);
    matmul(logits, ln, m.wte, NULL, T, C, V);            /* tied lm_head: only the V real rows of wte */
    dump("logits", -1, logits, T, V, 0);                 log8("LOGITS", -1, logits, V);
    fprintf(stderr, "gpt2: %d tokens, %d layers -> %s\n", T, m.L, dump_dir);
    return 0;
}
