//! A GPT-2 forward pass in Rust (std only), instrumented for gpt2-tracer: the example port.
//!
//!   tracer export goldens/tiny.h5 --format llmc -o port_inputs
//!   cargo build --release --manifest-path examples/rust/Cargo.toml
//!   examples/rust/target/release/gpt2 port_inputs case0 port_dump > port.log   # --bug: causal mask off by one
//!   tracer compare goldens/tiny.h5 port_dump --case case0
//!
//! Weights come in llm.c's checkpoint format (matrices [out, in]: y = x W^T + b), the ids in llm.c's
//! token-file format; one sequence (B = 1) of T tokens. The glue for the tool is one `dump.stage`
//! call per stage (through `Port::dump`) and one `log_first8` per printed line.

#[path = "../../../tracer/data/include/tracer_dump.rs"]
mod tracer_dump;

use std::{env, fs, process};
use tracer_dump::{log_first8, Dump};

struct Gpt2 {
    max_t: usize, v: usize, l: usize, nh: usize, c: usize,
    params: Vec<Vec<f32>>, // llm.c order: wte wpe ln1w ln1b qkvw qkvb attprojw attprojb ln2w ln2b fcw fcb fcprojw fcprojb lnfw lnfb
}

fn ints(bytes: &[u8], n: usize) -> Vec<i32> {
    bytes[..4 * n].chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn read(path: &str, magic: i32) -> (Vec<i32>, Vec<u8>) {
    let bytes = fs::read(path).unwrap_or_else(|e| fail(&format!("cannot read {path}: {e}")));
    if bytes.len() < 1024 || ints(&bytes, 1)[0] != magic {
        fail(&format!("bad header in {path}"));
    }
    (ints(&bytes, 256), bytes[1024..].to_vec())
}

fn fail(msg: &str) -> ! {
    eprintln!("gpt2: {msg}");
    process::exit(1)
}

impl Gpt2 {
    fn load(path: &str) -> Gpt2 {
        let (h, body) = read(path, 20240326);
        if h[1] != 3 {
            fail("not a float32 (version 3) checkpoint");
        }
        let [max_t, v, l, nh, c, vp] = [h[2], h[3], h[4], h[5], h[6], h[7]].map(|x| x as usize);
        let sizes = [vp * c, max_t * c, l * c, l * c, l * 3 * c * c, l * 3 * c, l * c * c, l * c, l * c, l * c,
                     l * 4 * c * c, l * 4 * c, l * c * 4 * c, l * c, c, c];
        let floats: Vec<f32> = body.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let mut params = Vec::new();
        let mut at = 0;
        for n in sizes {
            if at + n > floats.len() {
                fail("truncated checkpoint");
            }
            params.push(floats[at..at + n].to_vec());
            at += n;
        }
        Gpt2 { max_t, v, l, nh, c, params }
    }

    /// Block `l`'s slice of the stacked parameter `k` (each block holds `n` values).
    fn p(&self, k: usize, l: usize, n: usize) -> &[f32] {
        &self.params[k][l * n..(l + 1) * n]
    }
}

fn layernorm(x: &[f32], w: &[f32], b: &[f32], c: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks(c).zip(out.chunks_mut(c)) {
        let mean = row.iter().sum::<f32>() / c as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
        let rstd = 1.0 / (var + 1e-5).sqrt();
        for i in 0..c {
            o[i] = (row[i] - mean) * rstd * w[i] + b[i];
        }
    }
    out
}

fn matmul(x: &[f32], w: &[f32], b: Option<&[f32]>, c: usize, oc: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() / c * oc);
    for row in x.chunks(c) {
        for o in 0..oc {
            let wo = &w[o * c..(o + 1) * c];
            out.push(b.map_or(0.0, |b| b[o]) + row.iter().zip(wo).map(|(a, w)| a * w).sum::<f32>());
        }
    }
    out
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

struct Port {
    dump: Dump,
    t: usize,
}

impl Port {
    /// One tracer_dump call per stage: `blocks.{l}.{stage}` (or `stage` outside the blocks), batch of 1.
    fn dump(&self, stage: &str, layer: Option<usize>, x: &[f32], dims: &[usize]) {
        let name = layer.map_or(stage.to_string(), |l| format!("blocks.{l}.{stage}"));
        let shape: Vec<usize> = [1].iter().chain(dims).copied().collect();
        self.dump.stage(&name, x, &shape).unwrap_or_else(|e| fail(&e.to_string()));
    }

    /// Debug prints of the first 8 values at the first and last token (`row`: stride between tokens).
    fn log(&self, tag: &str, layer: Option<usize>, x: &[f32], row: usize) {
        log_first8(tag, layer, 0, x);
        log_first8(tag, layer, self.t - 1, &x[(self.t - 1) * row..]);
    }
}

fn main() {
    let args: Vec<String> = env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: gpt2 EXPORT_DIR CASE DUMP_DIR [--bug]");
        process::exit(2);
    }
    let bug = args.get(4).is_some_and(|a| a == "--bug");
    let m = Gpt2::load(&format!("{}/model.bin", args[1]));
    let (h, body) = read(&format!("{}/inputs/{}.tokens.bin", args[1], args[2]), 20240520);
    let ids: Vec<usize> = body.chunks_exact(2).take(h[2] as usize).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize).collect();
    let (t, c, nh, v) = (ids.len(), m.c, m.nh, m.v);
    let hs = c / nh;
    if t > m.max_t {
        fail("sequence longer than the context");
    }
    let port = Port { dump: Dump::new(&args[3]).unwrap_or_else(|e| fail(&e.to_string())), t };

    let tok: Vec<f32> = ids.iter().flat_map(|&i| m.params[0][i * c..(i + 1) * c].to_vec()).collect();
    let pos = m.params[1][..t * c].to_vec();
    let mut x = add(&tok, &pos);
    port.dump("embed.tok", None, &tok, &[t, c]);
    port.dump("embed.pos", None, &pos, &[t, c]);
    port.dump("embed.sum", None, &x, &[t, c]);
    port.log("AFTER_EMBED", None, &x, c);

    for l in 0..m.l {
        let ln1 = layernorm(&x, m.p(2, l, c), m.p(3, l, c), c);
        port.dump("ln1", Some(l), &ln1, &[t, c]);
        port.log("AFTER_LN1", Some(l), &ln1, c);
        let qkv = matmul(&ln1, m.p(4, l, 3 * c * c), Some(m.p(5, l, 3 * c)), c, 3 * c);
        port.dump("attn.qkv", Some(l), &qkv, &[t, 3 * c]);
        // [T, 3C] -> q, k, v as [NH, T, hs]
        let split = |part: usize| -> Vec<f32> {
            (0..nh * t * hs).map(|i| {
                let (h, tt, d) = (i / (t * hs), i / hs % t, i % hs);
                qkv[tt * 3 * c + part * c + h * hs + d]
            }).collect()
        };
        let (q, k, vv) = (split(0), split(1), split(2));
        port.dump("attn.q", Some(l), &q, &[nh, t, hs]);
        port.dump("attn.k", Some(l), &k, &[nh, t, hs]);
        port.dump("attn.v", Some(l), &vv, &[nh, t, hs]);
        let mut scores = vec![f32::NEG_INFINITY; nh * t * t];
        let mut probs = vec![0.0f32; nh * t * t];
        for h in 0..nh {
            for i in 0..t {
                let visible = if bug { i + 1 } else { i }; // the bug: the mask lets query i see key i+1
                for j in 0..=visible.min(t - 1) {
                    let dot: f32 = (0..hs).map(|d| q[(h * t + i) * hs + d] * k[(h * t + j) * hs + d]).sum();
                    scores[(h * t + i) * t + j] = dot / (hs as f32).sqrt();
                }
                let row = &scores[(h * t + i) * t..(h * t + i + 1) * t];
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = row.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for j in 0..t {
                    probs[(h * t + i) * t + j] = e[j] / sum;
                }
            }
        }
        port.dump("attn.scores", Some(l), &scores, &[nh, t, t]);
        port.dump("attn.probs", Some(l), &probs, &[nh, t, t]);
        port.log("AFTER_ATTN", Some(l), &probs, t);
        let mut ctx = vec![0.0f32; t * c];
        for i in 0..t {
            for h in 0..nh {
                for d in 0..hs {
                    ctx[i * c + h * hs + d] = (0..t).map(|j| probs[(h * t + i) * t + j] * vv[(h * t + j) * hs + d]).sum();
                }
            }
        }
        port.dump("attn.ctx", Some(l), &ctx, &[t, c]);
        let attn = matmul(&ctx, m.p(6, l, c * c), Some(m.p(7, l, c)), c, c);
        port.dump("attn.out", Some(l), &attn, &[t, c]);
        let mid = add(&x, &attn);
        port.dump("resid_mid", Some(l), &mid, &[t, c]);
        port.log("AFTER_RESIDUAL1", Some(l), &mid, c);
        let ln2 = layernorm(&mid, m.p(8, l, c), m.p(9, l, c), c);
        port.dump("ln2", Some(l), &ln2, &[t, c]);
        let fc = matmul(&ln2, m.p(10, l, 4 * c * c), Some(m.p(11, l, 4 * c)), c, 4 * c);
        port.dump("mlp.fc", Some(l), &fc, &[t, 4 * c]);
        let act: Vec<f32> = fc.iter().map(|&u| 0.5 * u * (1.0 + (0.7978845608 * (u + 0.044715 * u * u * u)).tanh())).collect();
        port.dump("mlp.act", Some(l), &act, &[t, 4 * c]);
        let mlp = matmul(&act, m.p(12, l, 4 * c * c), Some(m.p(13, l, c)), 4 * c, c);
        port.dump("mlp.out", Some(l), &mlp, &[t, c]);
        x = add(&mid, &mlp);
        port.dump("resid_post", Some(l), &x, &[t, c]);
        port.log("AFTER_RESIDUAL2", Some(l), &x, c);
    }
    let lnf = layernorm(&x, &m.params[14], &m.params[15], c);
    port.dump("final.ln", None, &lnf, &[t, c]);
    let logits = matmul(&lnf, &m.params[0][..v * c], None, c, v); // tied lm_head: the V real rows of wte
    port.dump("logits", None, &logits, &[t, v]);
    port.log("LOGITS", None, &logits, v);
    eprintln!("gpt2: {t} tokens, {} layers -> {}", m.l, args[3]);
}
