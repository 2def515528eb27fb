"""Run the independent ports of this directory on a golden's weights and ids, as their authors would.

    build_c_port(tmpdir) -> Path | None
        Compile c/gpt2_port.c with the system C compiler (`$CC`, else `cc`:
        `cc -O2 -std=c99 gpt2_port.c -lm`) into `tmpdir`; None when there is no compiler. A
        compile error raises. The binary becomes the default one of `run_c_port`.

    run_c_port(golden_path, out_dir, *, bug=None, with_qkv=False, with_pos=False, f64=False,
               pad_vocab=None, scores_tth=False, no_batch=False, case=None,
               bug_layer=None, binary=None) -> Path
        Export the golden's weights (raw float32 files) and the case's ids once per golden into a
        per-process cache, run the C port, return `out_dir`: a directory of `<stage>.npy`.
        Default dump: embed.tok, embed.sum, blocks.{i}.{ln1, attn.qkv, attn.scores, attn.probs,
        attn.ctx, attn.out, resid_mid, ln2, mlp.fc, mlp.act, mlp.out, resid_post}, final.ln,
        logits, all [1,...] fp32; scores/probs [1,H,T,T] with masked entries 0. Options: q/k/v
        as [1,H,T,D]; embed.pos [1,T,C]; float64 files of the fp32 values; logits padded with
        zeros to `pad_vocab` columns; scores/probs as [1,T,T,H]; no leading batch axis.

    run_numpy_style_port(golden_path, out_dir, *, bug=None, f64=False, case=None,
                         bug_layer=None) -> tuple[Path, Path]
        Run numpy_style_port.py (fp32, or float64 with `f64`) and return the `.npz` it wrote in
        `out_dir` and the name map `numpy_style.toml` (its names are not canonical).

`bug` is a name of `catalog.CATALOG` (or an entry); the bug goes to the block the entry says
(`bug_layer` overrides it: a block index, or -1 for every block), so
`entry.introduced_at(n_layer, dumped)` names the first stage its dump shows it at. `case=None`
takes the golden's only case; the ports run one sequence (B = 1).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from tests.ports import numpy_style_port
from tests.ports.catalog import PortBug, get
from tracer.store import Golden

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "c" / "gpt2_port.c"
NAME_MAP = HERE / "numpy_style.toml"
CONFIG_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "layer_norm_epsilon")

_binary: Path | None = None
_cache: Path | None = None


def build_c_port(tmpdir: str | os.PathLike) -> Path | None:
    """Compile the C port into `tmpdir` (None without a C compiler) and make it the default binary."""
    global _binary
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    binary = Path(tmpdir) / "gpt2_port"
    proc = subprocess.run([cc, "-O2", "-std=c99", "-o", str(binary), str(C_SOURCE), "-lm"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {C_SOURCE.name} failed:\n{proc.stderr}")
    _binary = binary
    return binary


def _cache_dir() -> Path:
    """A per-process directory for exported weights, removed at exit."""
    global _cache
    if _cache is None:
        _cache = Path(tempfile.mkdtemp(prefix="gpt2-ports-"))
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    return _cache


def _case_name(golden: Golden, case: str | None) -> str:
    names = golden.case_names()
    if case is None:
        if len(names) != 1:
            raise ValueError(f"{golden.path} has cases {names}: name one with case=")
        return names[0]
    if case not in names:
        raise ValueError(f"{golden.path} has no case {case!r} (cases: {names})")
    return case


def _single_sequence(golden: Golden, case: str) -> np.ndarray:
    ids = golden.case(case).input_ids
    if ids.shape[0] != 1:
        raise ValueError(f"case {case!r} has batch {ids.shape[0]}: the ports run one sequence")
    return ids[0]


def _bug_args(bug: str | PortBug | None, bug_layer: int | None, n_layer: int) -> tuple[str | None, int]:
    if bug is None:
        return None, -1
    entry = bug if isinstance(bug, PortBug) else get(bug)
    return entry.name, entry.layer_index(n_layer) if bug_layer is None else bug_layer


def _prepare_out(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    return out


def export_for_c(golden: Golden) -> Path:
    """config.txt + one raw little-endian float32 `<hf name>.bin` per weight, once per golden."""
    target = _cache_dir() / f"weights-{golden.attrs.get('weights_sha256') or golden.golden_id}"
    if target.is_dir():
        return target
    partial = Path(tempfile.mkdtemp(dir=_cache_dir()))
    cfg = golden.model_config
    (partial / "config.txt").write_text("".join(f"{key} {cfg[key]}\n" for key in CONFIG_KEYS))
    for name, value in golden.weights().items():
        np.ascontiguousarray(value, dtype="<f4").tofile(partial / f"{name}.bin")
    try:
        partial.rename(target)
    except OSError:  # exported concurrently by another caller
        shutil.rmtree(partial, ignore_errors=True)
    return target


def run_c_port(golden_path: str | os.PathLike, out_dir: str | os.PathLike, *,
               bug: str | PortBug | None = None, with_qkv: bool = False, with_pos: bool = False,
               f64: bool = False, pad_vocab: int | None = None, scores_tth: bool = False,
               no_batch: bool = False, case: str | None = None, bug_layer: int | None = None,
               binary: str | os.PathLike | None = None) -> Path:
    """Run the C port on one case of the golden; returns `out_dir`, a directory of `<stage>.npy`."""
    exe = Path(binary) if binary is not None else _binary
    if exe is None:
        exe = build_c_port(_cache_dir())
        if exe is None:
            raise RuntimeError("no C compiler: call build_c_port first and skip when it returns None")
    with Golden.open(golden_path) as golden:
        name = _case_name(golden, case)
        ids = _single_sequence(golden, name)
        weights = export_for_c(golden)
        bug_name, layer = _bug_args(bug, bug_layer, golden.n_layer)
    out = _prepare_out(out_dir)
    ids_file = Path(tempfile.mkstemp(suffix=".ids.txt", dir=_cache_dir())[1])
    ids_file.write_text(" ".join(str(int(i)) for i in ids) + "\n")
    flags = [flag for flag, on in (("--with-qkv", with_qkv), ("--with-pos", with_pos), ("--f64", f64),
                                   ("--scores-tth", scores_tth), ("--no-batch", no_batch)) if on]
    if pad_vocab is not None:
        flags += ["--pad-vocab", str(pad_vocab)]
    if bug_name is not None:
        flags += ["--bug", bug_name, "--bug-layer", str(layer)]
    try:
        proc = subprocess.run([str(exe), str(weights), str(ids_file), str(out), *flags], capture_output=True, text=True)
    finally:
        ids_file.unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"C port failed ({proc.returncode}): {proc.stderr.strip()}")
    return out


def run_numpy_style_port(golden_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                         bug: str | PortBug | None = None, f64: bool = False, case: str | None = None,
                         bug_layer: int | None = None) -> tuple[Path, Path]:
    """Run the NumPy-style port on one case of the golden; returns (the `.npz` dump, its name map)."""
    with Golden.open(golden_path) as golden:
        name = _case_name(golden, case)
        ids = _single_sequence(golden, name)
        weights, config = golden.weights(), golden.model_config
        bug_name, layer = _bug_args(bug, bug_layer, golden.n_layer)
    out = _prepare_out(out_dir) / "numpy_style_dump.npz"
    numpy_style_port.run(weights, config, ids, out, dtype=np.float64 if f64 else np.float32,
                         bug=bug_name, bug_layer=layer)
    return out, NAME_MAP
