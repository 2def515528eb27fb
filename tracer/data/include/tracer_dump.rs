//! tracer_dump.rs - dump a port's activations for gpt2-tracer. One file, std only.
//!
//! Copy it into your crate (`tracer include-dir` prints where it is) or include it in place:
//!
//! ```ignore
//! #[path = "/path/from/tracer/include-dir/tracer_dump.rs"]
//! mod tracer_dump;
//! use tracer_dump::Dump;
//!
//! let dump = Dump::new("port_dump")?;
//! dump.stage("blocks.0.ln1", &ln1, &[1, t, c])?;          // -> port_dump/blocks.0.ln1.npy
//! tracer_dump::log_first8("AFTER_LN1", Some(0), 0, &ln1); // [AFTER_LN1] Layer 0, Token 0: [...]
//! ```
//!
//! then `tracer compare GOLDEN.h5 port_dump --case case0`. The files are exactly what tracer_dump.h
//! writes: `<dir>/<stage>.npy` (NumPy format 1.0, little-endian, C order) plus one line per stage in
//! `<dir>/tracer_manifest.jsonl` ({"stage", "file", "dtype", "shape"[, "layout"]}). Element types:
//! `f32` ('<f4'), `f64` ('<f8'), `F16` (IEEE half bits, '<f2') and `Bf16` (bfloat16 bits, widened
//! exactly to '<f4' because NumPy has no bfloat16; the manifest keeps "bf16" so the comparator uses
//! bf16 tolerances).
//!
//! Candle: with a cargo feature `candle` that enables `candle-core` in your crate,
//!
//! ```toml
//! [dependencies]
//! candle-core = { version = "0.9", optional = true }
//! [features]
//! candle = ["dep:candle-core"]
//! ```
//!
//! `dump.tensor("blocks.0.ln1", &xs)?` dumps a `candle_core::Tensor` of any float dtype (f16/bf16 are
//! widened exactly to f32 and recorded as such in the manifest).

#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A stored element type: its name in the manifest, its .npy descr and its little-endian bytes.
pub trait Element: Copy {
    const DTYPE: &'static str;
    const DESCR: &'static str;
    fn put(self, out: &mut Vec<u8>);
}

/// IEEE 754 half precision, as raw bits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct F16(pub u16);

/// bfloat16, as raw bits (the upper half of an f32).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bf16(pub u16);

impl Element for f32 {
    const DTYPE: &'static str = "f32";
    const DESCR: &'static str = "<f4";
    fn put(self, out: &mut Vec<u8>) { out.extend_from_slice(&self.to_le_bytes()); }
}

impl Element for f64 {
    const DTYPE: &'static str = "f64";
    const DESCR: &'static str = "<f8";
    fn put(self, out: &mut Vec<u8>) { out.extend_from_slice(&self.to_le_bytes()); }
}

impl Element for F16 {
    const DTYPE: &'static str = "f16";
    const DESCR: &'static str = "<f2";
    fn put(self, out: &mut Vec<u8>) { out.extend_from_slice(&self.0.to_le_bytes()); }
}

impl Element for Bf16 {
    const DTYPE: &'static str = "bf16";
    const DESCR: &'static str = "<f4";
    fn put(self, out: &mut Vec<u8>) { out.extend_from_slice(&((self.0 as u32) << 16).to_le_bytes()); }
}

/// A dump directory: one `.npy` per stage, plus the manifest.
pub struct Dump {
    dir: PathBuf,
}

impl Dump {
    /// Creates `dir` (and its parents) when missing.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Dump> {
        fs::create_dir_all(dir.as_ref())?;
        Ok(Dump { dir: dir.as_ref().to_path_buf() })
    }

    /// Writes `<dir>/<stage>.npy` from `data` in C order with `shape` (canonical stage names and shapes).
    pub fn stage<T: Element>(&self, stage: &str, data: &[T], shape: &[usize]) -> io::Result<()> {
        self.stage_layout(stage, data, shape, None)
    }

    /// `stage` with a layout note: the axis letters of `data` (B T S H D C) when not the canonical ones.
    pub fn stage_layout<T: Element>(&self, stage: &str, data: &[T], shape: &[usize],
                                    layout: Option<&str>) -> io::Result<()> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, format!("tracer_dump: {stage}: {why}"));
        if stage.is_empty() || stage.contains(['/', '\\', '"']) {
            return Err(bad("not a stage name such as blocks.0.ln1".into()));
        }
        let count: usize = shape.iter().product();
        if count != data.len() {
            return Err(bad(format!("shape {shape:?} holds {count} values, data has {}", data.len())));
        }
        let mut bytes = npy_header(T::DESCR, shape);
        bytes.reserve(count * 8);
        for &x in data {
            x.put(&mut bytes);
        }
        let path = self.dir.join(format!("{stage}.npy"));
        let tmp = self.dir.join(format!("{stage}.npy.tmp"));
        fs::write(&tmp, &bytes)?;
        fs::rename(&tmp, &path)?;
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let mut line = format!("{{\"stage\": \"{stage}\", \"file\": \"{stage}.npy\", \"dtype\": \"{}\", \"shape\": [{}]",
                               T::DTYPE, dims.join(", "));
        if let Some(l) = layout.filter(|l| !l.is_empty() && !l.contains('"')) {
            line.push_str(&format!(", \"layout\": \"{l}\""));
        }
        line.push_str("}\n");
        OpenOptions::new().create(true).append(true).open(self.dir.join("tracer_manifest.jsonl"))?
            .write_all(line.as_bytes())
    }

    /// Dumps a Candle tensor (any float dtype) under `stage`.
    #[cfg(feature = "candle")]
    pub fn tensor(&self, stage: &str, t: &candle_core::Tensor) -> io::Result<()> {
        use candle_core::DType;
        let err = |e: candle_core::Error| io::Error::new(io::ErrorKind::Other, format!("tracer_dump: {stage}: {e}"));
        let shape = t.dims().to_vec();
        if t.dtype() == DType::F64 {
            let v = t.flatten_all().and_then(|x| x.to_vec1::<f64>()).map_err(err)?;
            return self.stage(stage, &v, &shape);
        }
        let v = t.to_dtype(DType::F32).and_then(|x| x.flatten_all()).and_then(|x| x.to_vec1::<f32>()).map_err(err)?;
        self.stage(stage, &v, &shape)
    }
}

/// The .npy 1.0 header for `descr` and `shape`, padded so the data starts 64-byte aligned.
pub fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape.len() {
        1 => format!("{},", shape[0]),
        _ => shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// `x` as C's `%.7g` prints it, so Rust and C ports print the same text for the same float.
pub fn fmt_g7(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0".into() } else { "0".into() };
    }
    let sci = format!("{:.6e}", x); // rounds to 7 significant digits: "-1.234568e-5"
    let (mantissa, exp) = sci.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    let trim = |s: String| if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    if exp < -4 || exp >= 7 {
        format!("{}e{}{:02}", trim(mantissa.to_string()), if exp < 0 { '-' } else { '+' }, exp.abs())
    } else {
        trim(format!("{:.*}", (6 - exp) as usize, x))
    }
}

/// One debug-print line: `[TAG] Layer L, Token T: [v0, ...]` (layer None: no Layer field).
pub fn log_line(tag: &str, layer: Option<usize>, token: usize, values: &[f32]) -> String {
    let layer = layer.map(|l| format!("Layer {l}, ")).unwrap_or_default();
    let vals: Vec<String> = values.iter().map(|&v| fmt_g7(v as f64)).collect();
    format!("[{tag}] {layer}Token {token}: [{}]", vals.join(", "))
}

/// Prints the first 8 values of a token's row to stdout, the line `tracer import-log` reads.
pub fn log_first8(tag: &str, layer: Option<usize>, token: usize, row: &[f32]) {
    println!("{}", log_line(tag, layer, token, &row[..row.len().min(8)]));
}
