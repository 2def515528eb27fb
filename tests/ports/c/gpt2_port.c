/*
 * gpt2_port.c - GPT-2 forward pass in plain C99, one sequence (B = 1), fp32.
 *
 * Written the way a hand port is: nested loops, sequential float accumulation, two-pass
 * LayerNorm, tanh GELU, causal softmax with the row max subtracted. Weights are raw float32
 * little-endian files named by their Hugging Face names (<dir>/<name>.bin, Conv1D layout
 * [in,out]) plus <dir>/config.txt ("key value" lines); the loader transposes every Conv1D
 * weight to [out][in] so each output is one row-by-row dot product.
 *
 *   gpt2_port WEIGHTS_DIR IDS_FILE OUT_DIR [options]
 *
 * Every activation the port keeps in a buffer is saved as OUT_DIR/<stage>.npy (v1.0 header
 * written by hand): embed.tok, embed.sum, blocks.{i}.{ln1, attn.qkv, attn.scores, attn.probs,
 * attn.ctx, attn.out, resid_mid, ln2, mlp.fc, mlp.act, mlp.out, resid_post}, final.ln, logits.
 * The score buffer comes from calloc and only the causal entries are written, so masked
 * entries stay 0.
 *
 * Options:
 *   --with-qkv        also save attn.q / attn.k / attn.v as [B,H,T,D]
 *   --with-pos        also save embed.pos
 *   --f64             save every array as float64 (the values stay the fp32 results)
 *   --pad-vocab N     logits padded with zeros to N columns (vocab rounded up, e.g. 50304)
 *   --scores-tth      save scores and probs as [B,T,T,H] (query, key, head)
 *   --no-batch        leave the leading batch axis out of every array
 *   --bug NAME        apply one bug of tests/ports/catalog.py
 *   --bug-layer L     the block the bug applies to (-1: every block)
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PI_F 3.14159265358979323846f
#define MAX_DIMS 5

typedef struct {
    int n_layer, n_head, n_embd, vocab, n_ctx;
    float eps;
} Config;

typedef struct {
    float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *proj_w, *proj_b;
    float *ln2_w, *ln2_b, *fc_w, *fc_b, *fcproj_w, *fcproj_b;
} Block;

typedef struct {
    int with_qkv, with_pos, f64, pad_vocab, scores_tth, no_batch;
    const char *bug;
    int bug_layer;
    const char *out_dir;
} Options;

static Options opt;

static const char *const known_bugs[] = {
    "gelu-coef", "wpe-offset", "ctx-head-major", "kv-swap", "v-from-k", "head-split-strided",
    "attn-scale-d", "mask-off-by-one", "fp16-scores", "qkv-bias-missing", "bias-twice",
    "cproj-transposed", "ln-eps-1e-3", "ln1-prev-layer-weights", "ln2-ln1-weights",
    "ln2-block-input", "fp16-fc-out", "lnf-no-beta", "logits-from-resid",
};

static void die(const char *what, const char *detail) {
    fprintf(stderr, "gpt2_port: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(2);
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n, size);
    if (!p) die("out of memory", NULL);
    return p;
}

/* Is bug NAME active in block `layer` (-1 for code outside the blocks)? */
static int bug_on(const char *name, int layer) {
    if (!opt.bug || strcmp(opt.bug, name) != 0) return 0;
    return opt.bug_layer < 0 || layer < 0 || layer == opt.bug_layer;
}

/* ---------------------------------------------------------------- loading */

static float *load_tensor(const char *dir, const char *name, size_t count) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.bin", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open weight file", path);
    float *data = xcalloc(count, sizeof(float));
    if (fread(data, sizeof(float), count, f) != count) die("weight file too short", path);
    if (fgetc(f) != EOF) die("weight file too long", path);
    fclose(f);
    return data;
}

/* [in][out] -> [out][in] */
static float *transposed(const float *w, int in, int out) {
    float *t = xcalloc((size_t)in * out, sizeof(float));
    for (int i = 0; i < in; i++)
        for (int o = 0; o < out; o++) t[(size_t)o * in + i] = w[(size_t)i * out + o];
    return t;
}

static float *load_linear(const char *dir, const char *name, int in, int out, int transpose) {
    float *w = load_tensor(dir, name, (size_t)in * out);
    if (!transpose) return w;
    float *t = transposed(w, in, out);
    free(w);
    return t;
}

static void read_config(const char *dir, Config *cfg) {
    char path[4096], key[64];
    double value;
    snprintf(path, sizeof path, "%s/config.txt", dir);
    FILE *f = fopen(path, "r");
    if (!f) die("cannot open", path);
    memset(cfg, 0, sizeof *cfg);
    while (fscanf(f, "%63s %lf", key, &value) == 2) {
        if (!strcmp(key, "n_layer")) cfg->n_layer = (int)value;
        else if (!strcmp(key, "n_head")) cfg->n_head = (int)value;
        else if (!strcmp(key, "n_embd")) cfg->n_embd = (int)value;
        else if (!strcmp(key, "vocab_size")) cfg->vocab = (int)value;
        else if (!strcmp(key, "n_positions")) cfg->n_ctx = (int)value;
        else if (!strcmp(key, "layer_norm_epsilon")) cfg->eps = (float)value;
    }
    fclose(f);
    if (cfg->n_layer <= 0 || cfg->n_head <= 0 || cfg->n_embd <= 0 || cfg->vocab <= 0 || cfg->n_ctx <= 0)
        die("incomplete config", path);
}

static Block *load_blocks(const char *dir, const Config *cfg) {
    int C = cfg->n_embd;
    Block *blocks = xcalloc((size_t)cfg->n_layer, sizeof(Block));
    char name[256];
#define LOAD(field, suffix, count) \
    (snprintf(name, sizeof name, "transformer.h.%d.%s", l, suffix), blocks[l].field = load_tensor(dir, name, count))
#define LOAD_LINEAR(field, suffix, in, out, tr) \
    (snprintf(name, sizeof name, "transformer.h.%d.%s", l, suffix), blocks[l].field = load_linear(dir, name, in, out, tr))
    for (int l = 0; l < cfg->n_layer; l++) {
        LOAD(ln1_w, "ln_1.weight", C);
        LOAD(ln1_b, "ln_1.bias", C);
        LOAD_LINEAR(qkv_w, "attn.c_attn.weight", C, 3 * C, 1);
        LOAD(qkv_b, "attn.c_attn.bias", 3 * C);
        LOAD_LINEAR(proj_w, "attn.c_proj.weight", C, C, !bug_on("cproj-transposed", l));
        LOAD(proj_b, "attn.c_proj.bias", C);
        LOAD(ln2_w, "ln_2.weight", C);
        LOAD(ln2_b, "ln_2.bias", C);
        LOAD_LINEAR(fc_w, "mlp.c_fc.weight", C, 4 * C, 1);
        LOAD(fc_b, "mlp.c_fc.bias", 4 * C);
        LOAD_LINEAR(fcproj_w, "mlp.c_proj.weight", 4 * C, C, 1);
        LOAD(fcproj_b, "mlp.c_proj.bias", C);
    }
#undef LOAD
#undef LOAD_LINEAR
    return blocks;
}

static int *read_ids(const char *path, int *T) {
    FILE *f = fopen(path, "r");
    if (!f) die("cannot open ids file", path);
    int cap = 64, n = 0, id;
    int *ids = xcalloc((size_t)cap, sizeof(int));
    while (fscanf(f, "%d", &id) == 1) {
        if (n == cap) {
            cap *= 2;
            ids = realloc(ids, (size_t)cap * sizeof(int));
            if (!ids) die("out of memory", NULL);
        }
        ids[n++] = id;
    }
    fclose(f);
    if (n == 0) die("no token ids in", path);
    *T = n;
    return ids;
}

/* ---------------------------------------------------------------- saving */

/* Save `data` (row-major, `ndim` axes) as OUT_DIR/<name>.npy, with the batch axis in front
 * unless --no-batch. */
static void save(const char *name, const float *data, const int *shape, int ndim) {
    int dims[MAX_DIMS], nd = 0;
    size_t count = 1;
    if (!opt.no_batch) dims[nd++] = 1;
    for (int i = 0; i < ndim; i++) {
        dims[nd++] = shape[i];
        count *= (size_t)shape[i];
    }
    char shape_text[128] = "", item[32];
    for (int i = 0; i < nd; i++) {
        snprintf(item, sizeof item, "%s%d", i ? ", " : "", dims[i]);
        strcat(shape_text, item);
    }
    if (nd == 1) strcat(shape_text, ",");
    char header[256];
    int len = snprintf(header, sizeof header, "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }",
                       opt.f64 ? "<f8" : "<f4", shape_text);
    int total = 10 + len + 1; /* magic(6) + version(2) + length(2) + dict + '\n' */
    int pad = (64 - total % 64) % 64;
    for (int i = 0; i < pad; i++) header[len++] = ' ';
    header[len++] = '\n';

    char path[4096];
    snprintf(path, sizeof path, "%s/%s.npy", opt.out_dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) die("cannot write", path);
    unsigned char preamble[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0,
                                  (unsigned char)(len & 0xff), (unsigned char)(len >> 8)};
    fwrite(preamble, 1, sizeof preamble, f);
    fwrite(header, 1, (size_t)len, f);
    if (opt.f64) {
        for (size_t i = 0; i < count; i++) {
            double d = data[i];
            fwrite(&d, sizeof d, 1, f);
        }
    } else {
        fwrite(data, sizeof(float), count, f);
    }
    if (fclose(f) != 0) die("cannot write", path);
}

static void save2(const char *name, const float *data, int a, int b) {
    int shape[2] = {a, b};
    save(name, data, shape, 2);
}

static void save_block(int l, const char *stage, const float *data, int a, int b) {
    char name[128];
    snprintf(name, sizeof name, "blocks.%d.%s", l, stage);
    save2(name, data, a, b);
}

/* [H][T][T] score buffer, saved as [H,T,T] or (--scores-tth) [T,T,H] */
static void save_scores(int l, const char *stage, const float *att, int H, int T) {
    char name[128];
    snprintf(name, sizeof name, "blocks.%d.%s", l, stage);
    if (!opt.scores_tth) {
        int shape[3] = {H, T, T};
        save(name, att, shape, 3);
        return;
    }
    float *tth = xcalloc((size_t)H * T * T, sizeof(float));
    for (int h = 0; h < H; h++)
        for (int t = 0; t < T; t++)
            for (int s = 0; s < T; s++) tth[((size_t)t * T + s) * H + h] = att[((size_t)h * T + t) * T + s];
    int shape[3] = {T, T, H};
    save(name, tth, shape, 3);
    free(tth);
}

/* ---------------------------------------------------------------- kernels */

/* round to the nearest IEEE half value (ties to even), back in a float */
static float round_half(float x) {
    if (x == 0.0f || !isfinite(x)) return x;
    int e;
    frexpf(x, &e); /* |x| in [2^(e-1), 2^e) */
    int ulp_exp = e - 1 < -14 ? -24 : e - 11;
    float r = ldexpf(rintf(ldexpf(x, -ulp_exp)), ulp_exp);
    if (fabsf(r) > 65504.0f) r = copysignf(INFINITY, x);
    return r;
}

static void layernorm(float *out, const float *x, const float *w, const float *b, int T, int C, float eps) {
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * C;
        float mean = 0.0f;
        for (int i = 0; i < C; i++) mean += xt[i];
        mean /= C;
        float var = 0.0f;
        for (int i = 0; i < C; i++) {
            float d = xt[i] - mean;
            var += d * d;
        }
        var /= C;
        float rstd = 1.0f / sqrtf(var + eps);
        for (int i = 0; i < C; i++) {
            float n = (xt[i] - mean) * rstd;
            out[(size_t)t * C + i] = b ? n * w[i] + b[i] : n * w[i];
        }
    }
}

/* out[t][o] = sum_i x[t][i] * w[o][i] + bias[o]   (w already [out][in]) */
static void matmul(float *out, const float *x, const float *w, const float *bias, int T, int in, int outc) {
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * in;
        for (int o = 0; o < outc; o++) {
            const float *wo = w + (size_t)o * in;
            float acc = 0.0f;
            for (int i = 0; i < in; i++) acc += xt[i] * wo[i];
            out[(size_t)t * outc + o] = bias ? acc + bias[o] : acc;
        }
    }
}

static void add_bias(float *x, const float *bias, int T, int C) {
    for (int t = 0; t < T; t++)
        for (int i = 0; i < C; i++) x[(size_t)t * C + i] += bias[i];
}

static void gelu(float *out, const float *x, size_t n, float coef) {
    const float s = sqrtf(2.0f / PI_F);
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        out[i] = 0.5f * v * (1.0f + tanhf(s * (v + coef * v * v * v)));
    }
}

static void residual(float *out, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/* Split the fused [T][3C] buffer into per-head [H][T][D] q, k, v. */
static void split_heads(float *q, float *k, float *v, const float *qkv, int T, int C, int H, int l) {
    int D = C / H;
    size_t k_off = C, v_off = 2 * (size_t)C;
    if (bug_on("kv-swap", l)) k_off = 2 * (size_t)C, v_off = C;
    if (bug_on("v-from-k", l)) v_off = C;
    int strided = bug_on("head-split-strided", l);
    for (int h = 0; h < H; h++)
        for (int t = 0; t < T; t++)
            for (int d = 0; d < D; d++) {
                size_t c = strided ? (size_t)d * H + h : (size_t)h * D + d;
                const float *row = qkv + (size_t)t * 3 * C;
                size_t dst = ((size_t)h * T + t) * D + d;
                q[dst] = row[c];
                k[dst] = row[k_off + c];
                v[dst] = row[v_off + c];
            }
}

/* Causal attention: att = scores, then probs in place of a copy; ctx is [T][C]. */
static void attention(float *ctx, float *scores, float *probs, const float *q, const float *k, const float *v,
                      int T, int C, int H, int l) {
    int D = C / H;
    float scale = bug_on("attn-scale-d", l) ? 1.0f / D : 1.0f / sqrtf((float)D);
    int reach = bug_on("mask-off-by-one", l) ? 1 : 0;
    int head_major = bug_on("ctx-head-major", l);
    for (int h = 0; h < H; h++) {
        for (int t = 0; t < T; t++) {
            const float *qt = q + ((size_t)h * T + t) * D;
            float *srow = scores + ((size_t)h * T + t) * T;
            float *prow = probs + ((size_t)h * T + t) * T;
            int last = t + reach < T ? t + reach : T - 1;
            float maxval = -INFINITY;
            for (int s = 0; s <= last; s++) {
                const float *ks = k + ((size_t)h * T + s) * D;
                float acc = 0.0f;
                for (int d = 0; d < D; d++) acc += qt[d] * ks[d];
                acc *= scale;
                if (bug_on("fp16-scores", l)) acc = round_half(acc);
                srow[s] = acc;
                if (acc > maxval) maxval = acc;
            }
            float sum = 0.0f;
            for (int s = 0; s <= last; s++) {
                prow[s] = expf(srow[s] - maxval);
                sum += prow[s];
            }
            for (int s = 0; s <= last; s++) prow[s] /= sum;
            for (int d = 0; d < D; d++) {
                float acc = 0.0f;
                for (int s = 0; s <= last; s++) acc += prow[s] * v[((size_t)h * T + s) * D + d];
                if (head_major) ctx[((size_t)h * T + t) * D + d] = acc;
                else ctx[(size_t)t * C + h * D + d] = acc;
            }
        }
    }
}

/* ---------------------------------------------------------------- forward */

static void forward(const Config *cfg, Block *blocks, const float *wte, const float *wpe, const float *lnf_w,
                    const float *lnf_b, const int *ids, int T) {
    int C = cfg->n_embd, H = cfg->n_head, D = C / H, V = cfg->vocab;
    float eps = bug_on("ln-eps-1e-3", -1) ? 1e-3f : cfg->eps;
    size_t TC = (size_t)T * C;
    float *tok = xcalloc(TC, sizeof(float)), *pos = xcalloc(TC, sizeof(float));
    float *x = xcalloc(TC, sizeof(float)), *ln = xcalloc(TC, sizeof(float));
    float *qkv = xcalloc(3 * TC, sizeof(float));
    float *q = xcalloc(TC, sizeof(float)), *k = xcalloc(TC, sizeof(float)), *v = xcalloc(TC, sizeof(float));
    float *ctx = xcalloc(TC, sizeof(float)), *attn_out = xcalloc(TC, sizeof(float));
    float *mid = xcalloc(TC, sizeof(float)), *fc = xcalloc(4 * TC, sizeof(float));
    float *act = xcalloc(4 * TC, sizeof(float)), *mlp_out = xcalloc(TC, sizeof(float));
    float *post = xcalloc(TC, sizeof(float));

    int pos_offset = bug_on("wpe-offset", -1) ? 1 : 0;
    if (T + pos_offset > cfg->n_ctx) die("sequence longer than n_positions", NULL);
    for (int t = 0; t < T; t++) {
        if (ids[t] < 0 || ids[t] >= V) die("token id out of range", NULL);
        for (int c = 0; c < C; c++) {
            tok[(size_t)t * C + c] = wte[(size_t)ids[t] * C + c];
            pos[(size_t)t * C + c] = wpe[(size_t)(t + pos_offset) * C + c];
        }
    }
    save2("embed.tok", tok, T, C);
    if (opt.with_pos) save2("embed.pos", pos, T, C);
    residual(x, tok, pos, TC);
    save2("embed.sum", x, T, C);

    for (int l = 0; l < cfg->n_layer; l++) {
        Block *b = &blocks[l];
        const Block *ln1 = bug_on("ln1-prev-layer-weights", l) && l > 0 ? &blocks[l - 1] : b;
        layernorm(ln, x, ln1->ln1_w, ln1->ln1_b, T, C, eps);
        save_block(l, "ln1", ln, T, C);

        matmul(qkv, ln, b->qkv_w, bug_on("qkv-bias-missing", l) ? NULL : b->qkv_b, T, C, 3 * C);
        save_block(l, "attn.qkv", qkv, T, 3 * C);

        split_heads(q, k, v, qkv, T, C, H, l);
        if (opt.with_qkv) {
            int shape[3] = {H, T, D};
            const char *parts[3] = {"q", "k", "v"};
            const float *bufs[3] = {q, k, v};
            char name[128];
            for (int j = 0; j < 3; j++) {
                snprintf(name, sizeof name, "blocks.%d.attn.%s", l, parts[j]);
                save(name, bufs[j], shape, 3);
            }
        }
        float *scores = xcalloc((size_t)H * T * T, sizeof(float));
        float *probs = xcalloc((size_t)H * T * T, sizeof(float));
        attention(ctx, scores, probs, q, k, v, T, C, H, l);
        save_scores(l, "attn.scores", scores, H, T);
        save_scores(l, "attn.probs", probs, H, T);
        free(scores);
        free(probs);
        save_block(l, "attn.ctx", ctx, T, C);

        matmul(attn_out, ctx, b->proj_w, b->proj_b, T, C, C);
        if (bug_on("bias-twice", l)) add_bias(attn_out, b->proj_b, T, C);
        save_block(l, "attn.out", attn_out, T, C);
        residual(mid, x, attn_out, TC);
        save_block(l, "resid_mid", mid, T, C);

        if (bug_on("ln2-ln1-weights", l)) layernorm(ln, mid, b->ln1_w, b->ln1_b, T, C, eps);
        else layernorm(ln, bug_on("ln2-block-input", l) ? x : mid, b->ln2_w, b->ln2_b, T, C, eps);
        save_block(l, "ln2", ln, T, C);

        matmul(fc, ln, b->fc_w, b->fc_b, T, C, 4 * C);
        if (bug_on("fp16-fc-out", l))
            for (size_t i = 0; i < 4 * TC; i++) fc[i] = round_half(fc[i]);
        save_block(l, "mlp.fc", fc, T, 4 * C);
        gelu(act, fc, 4 * TC, bug_on("gelu-coef", l) ? 0.04715f : 0.044715f);
        save_block(l, "mlp.act", act, T, 4 * C);
        matmul(mlp_out, act, b->fcproj_w, b->fcproj_b, T, 4 * C, C);
        save_block(l, "mlp.out", mlp_out, T, C);
        residual(post, mid, mlp_out, TC);
        save_block(l, "resid_post", post, T, C);
        memcpy(x, post, TC * sizeof(float));
    }

    layernorm(ln, x, lnf_w, bug_on("lnf-no-beta", -1) ? NULL : lnf_b, T, C, eps);
    save2("final.ln", ln, T, C);

    int Vp = opt.pad_vocab > V ? opt.pad_vocab : V;
    float *logits = xcalloc((size_t)T * Vp, sizeof(float));
    const float *head_in = bug_on("logits-from-resid", -1) ? x : ln;
    for (int t = 0; t < T; t++)
        for (int vv = 0; vv < V; vv++) {
            float acc = 0.0f;
            for (int c = 0; c < C; c++) acc += head_in[(size_t)t * C + c] * wte[(size_t)vv * C + c];
            logits[(size_t)t * Vp + vv] = acc;
        }
    save2("logits", logits, T, Vp);

    float *buffers[] = {tok, pos, x, ln, qkv, q, k, v, ctx, attn_out, mid, fc, act, mlp_out, post, logits};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; i++) free(buffers[i]);
}

static int parse_int(const char *text, const char *flag) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || *end || end == text) die("not an integer", flag);
    return (int)value;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: gpt2_port WEIGHTS_DIR IDS_FILE OUT_DIR [--with-qkv] [--with-pos] [--f64] "
                        "[--pad-vocab N] [--scores-tth] [--no-batch] [--bug NAME] [--bug-layer L]\n");
        return 2;
    }
    opt.out_dir = argv[3];
    opt.bug_layer = -1;
    for (int i = 4; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--with-qkv")) opt.with_qkv = 1;
        else if (!strcmp(a, "--with-pos")) opt.with_pos = 1;
        else if (!strcmp(a, "--f64")) opt.f64 = 1;
        else if (!strcmp(a, "--scores-tth")) opt.scores_tth = 1;
        else if (!strcmp(a, "--no-batch")) opt.no_batch = 1;
        else if (!strcmp(a, "--pad-vocab") && i + 1 < argc) opt.pad_vocab = parse_int(argv[++i], a);
        else if (!strcmp(a, "--bug") && i + 1 < argc) opt.bug = argv[++i];
        else if (!strcmp(a, "--bug-layer") && i + 1 < argc) opt.bug_layer = parse_int(argv[++i], a);
        else die("unknown option", a);
    }

    if (opt.bug) {
        size_t i = 0, n = sizeof known_bugs / sizeof known_bugs[0];
        while (i < n && strcmp(known_bugs[i], opt.bug) != 0) i++;
        if (i == n) die("unknown bug", opt.bug);
    }

    Config cfg;
    read_config(argv[1], &cfg);
    if (cfg.n_embd % cfg.n_head) die("n_embd not divisible by n_head", NULL);
    int T;
    int *ids = read_ids(argv[2], &T);
    float *wte = load_tensor(argv[1], "transformer.wte.weight", (size_t)cfg.vocab * cfg.n_embd);
    float *wpe = load_tensor(argv[1], "transformer.wpe.weight", (size_t)cfg.n_ctx * cfg.n_embd);
    float *lnf_w = load_tensor(argv[1], "transformer.ln_f.weight", cfg.n_embd);
    float *lnf_b = load_tensor(argv[1], "transformer.ln_f.bias", cfg.n_embd);
    Block *blocks = load_blocks(argv[1], &cfg);
    forward(&cfg, blocks, wte, wpe, lnf_w, lnf_b, ids, T);
    return 0;
}
