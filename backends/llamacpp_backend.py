"""llama.cpp backend: llama.cpp's own GPT-2 graph on the golden's weights, every named tensor a stage.

Why: a port to llama.cpp is judged best against llama.cpp itself. The golden's weights are
written as a GGUF file (tracer.export_gguf: float32, or f16 / q8_0 matrices with --precision), loaded
with llama-cpp-python, and each case row is decoded in a fresh context with ggml's eval
callback (`cb_eval`) asking for the tensors llama.cpp names while building its graph
(`attn_norm-0`, `Qcur-0`, `kq_soft_max-0`, `l_out-0`, `result_output`, ...). Each is copied the
moment it is computed and rearranged from ggml's layout (ne[0] is the fastest axis, so the
NumPy shape is ne reversed) into the canonical one of SPEC §3.

What llama.cpp computes differently from the stage definitions, and how it is mapped:
- `kq-i` is q·kᵀ before scaling (ggml_soft_max_ext applies 1/√D inside the softmax): the stage
  attn.scores is kq times llama.cpp's own float32 scale, the very values its softmax reads; key
  positions the causal mask hides hold the raw products (the comparator ignores them).
- `kq-i` and `kq_soft_max-i` span the KV cache (padded to 256 cells); the first T key cells are
  the row's tokens (a fresh context per row), the rest is cut off.
- attn.out (`wo·ctx + b`) has no name in llama.cpp's graph; it is found as the node adding the
  bias to the product of `kqv_out-i`.
The K/V cache is float32 and flash attention is off, so nothing is rounded on the way unless
llama.cpp itself rounds (its CPU GELU goes through a float16 lookup table: see the README).

Isolated mode is refused: llama.cpp runs its whole graph and cannot be fed golden values.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from backends.protocol import Backend, Tap
from tracer.errors import TracerError
from tracer.stages import canonical_stages

WEIGHT_TYPE = {"fp32": "f32", "fp16": "f16", "q8_0": "q8_0"}
EXTRA_HINT = "pip install 'gpt2-tracer[llamacpp]'"
MIN_VERSION = (0, 3, 36)

# llama.cpp's tensor name (block ones carry a "-{i}" suffix) -> canonical stage
GLOBAL_NAMES = {"embd": "embed.tok", "pos_embd": "embed.pos", "inpL": "embed.sum",
                "result_norm": "final.ln", "result_output": "logits"}
BLOCK_NAMES = {"attn_norm": "ln1", "wqkv_b": "attn.qkv", "Qcur": "attn.q", "Kcur": "attn.k", "Vcur": "attn.v",
               "kq": "attn.scores", "kq_soft_max": "attn.probs", "kqv_out": "attn.ctx", "ffn_inp": "resid_mid",
               "ffn_norm": "ln2", "ffn_up_b": "mlp.fc", "ffn_gelu": "mlp.act", "ffn_out": "mlp.out",
               "l_out": "resid_post"}
# Names llama.cpp gives to intermediates that are no stage (before a bias or a LayerNorm's affine,
# the attention product before merging heads, inputs): known, deliberately not mapped.
INTERMEDIATE_NAMES = frozenset({"norm", "norm_w", "wqkv", "ffn_up", "ffn_down", "kqv", "inp_embd", "inp_tokens",
                                "inp_pos", "out_ids"})
BLOCK_NAME = re.compile(r"(?P<base>.+)-(?P<i>\d+)$")
UNNAMED = re.compile(r"(node_\d+)?$")  # ggml names a node nobody named "node_<index>"
GGML_F32, GGML_F16 = 0, 1
GGML_MAX_DIMS, GGML_MAX_SRC = 4, 10
GGML_LOG_LEVEL_ERROR = 4


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` of ggml.h (the version vendored by llama-cpp-python 0.3.x)."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS), ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC), ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8),
]


class LlamaCppWarning(UserWarning):
    """llama.cpp emitted tensors this backend does not map, or did not emit stages it maps."""


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise TracerError(f"the llamacpp backend needs llama-cpp-python: {EXTRA_HINT}") from None
    return llama_cpp


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _name(t: GgmlTensor) -> str:
    return t.name.decode("utf-8", errors="replace")


def stage_of(name: str) -> str | None:
    """The canonical stage a llama.cpp tensor name holds (None: not a stage)."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    m = BLOCK_NAME.fullmatch(name)
    if m and m["base"] in BLOCK_NAMES:
        return f"blocks.{m['i']}.{BLOCK_NAMES[m['base']]}"
    return None


def _attn_out_stage(t: GgmlTensor) -> str | None:
    """attn.out of block i: the unnamed node adding the bias to the product with `kqv_out-i`."""
    if not UNNAMED.fullmatch(_name(t)) or not t.src[0]:
        return None
    product = t.src[0].contents
    if not product.src[1]:
        return None
    m = BLOCK_NAME.fullmatch(_name(product.src[1].contents))
    return f"blocks.{m['i']}.attn.out" if m and m["base"] == "kqv_out" else None


def is_known_name(name: str) -> bool:
    """Mapped, a known intermediate, unnamed ("node_28": attn.out, or the last block's row selection
    of all rows), or a name ggml derives for views and copies ("x (view)", "cache_k_l0 (view)")."""
    m = BLOCK_NAME.fullmatch(name)
    base = m["base"] if m else name
    return stage_of(name) is not None or base in INTERMEDIATE_NAMES or "(" in name or bool(UNNAMED.fullmatch(name))


def read_tensor(t: GgmlTensor) -> np.ndarray:
    """A copy of a computed host tensor, shape ne reversed (ggml's ne[0] is the fastest axis)."""
    dtype = {GGML_F32: np.float32, GGML_F16: np.float16}.get(t.type)
    if dtype is None:
        raise TracerError(f"llama.cpp tensor {_name(t)} has ggml type {t.type}, not f32/f16")
    shape = tuple(int(n) for n in reversed(t.ne))
    strides = tuple(int(s) for s in reversed(t.nb))
    extent = sum((n - 1) * s for n, s in zip(shape, strides)) + np.dtype(dtype).itemsize
    buffer = (ctypes.c_char * extent).from_address(t.data)
    return np.ndarray(shape, dtype=dtype, buffer=buffer, strides=strides).astype(np.float32)


class Capture:
    """The eval callback of one decode: asks for the mapped tensors, copies each once computed."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.names: list[str] = []
        self.error: BaseException | None = None
        self._stage: dict[int, str] = {}
        self.callback = _llama_cpp().ggml_backend_sched_eval_callback(self._eval)

    def _eval(self, pointer: int, ask: bool, _user_data: int) -> bool:
        try:
            t = ctypes.cast(pointer, ctypes.POINTER(GgmlTensor)).contents
            if ask:
                name = _name(t)
                if name:
                    self.names.append(name)
                stage = stage_of(name) or _attn_out_stage(t)
                if stage is not None:
                    self._stage[pointer] = stage
                return stage is not None
            stage = self._stage.get(pointer)
            if stage is not None and stage not in self.arrays:
                self.arrays[stage] = read_tensor(t)
        except BaseException as exc:  # an exception must not cross into C; raised after the decode
            self.error = self.error or exc
        return True


def canonical(stage: str, a: np.ndarray, T: int, n_head: int, scale: np.float32) -> np.ndarray:
    """One row's stage in its canonical layout without the batch axis."""
    local = stage.split(".", 2)[-1] if stage.startswith("blocks.") else stage
    if local in ("attn.q", "attn.k", "attn.v"):  # ne [D, H, T] -> [H, T, D]
        return a.reshape(T, n_head, -1).transpose(1, 0, 2)
    if local in ("attn.scores", "attn.probs"):  # ne [n_kv, T, H] -> [H, T, S], first T key cells
        a = a.reshape(n_head, T, -1)[..., :T]
        return a * scale if local == "attn.scores" else a
    return a.reshape(T, -1)  # ne [C, T] -> [T, C]


LOG_ERRORS: list[str] = []  # llama.cpp's last error lines, for the one-line message of a failure
_LOG_CALLBACK: list[Any] = []  # the installed C callback, alive as long as the process (llama.cpp keeps it)


def _on_log(level: int, text: bytes, _user_data: int) -> None:
    line = text.decode("utf-8", errors="replace").strip()
    if level == GGML_LOG_LEVEL_ERROR and line:
        LOG_ERRORS[:] = (LOG_ERRORS + [line])[-5:]


def _quiet_log(lib: Any) -> None:
    """Route llama.cpp's log (pages of loading chatter on stderr) into LOG_ERRORS, once per process."""
    if not _LOG_CALLBACK:
        _LOG_CALLBACK.append(lib.llama_log_callback(_on_log))
        lib.llama_log_set(_LOG_CALLBACK[0], None)


class LlamaCppBackend(Backend):
    name = "llamacpp"
    precisions = ("fp32", "fp16", "q8_0")  # the GGUF's weight type (f32, f16, q8_0); activations stay f32
    # ggml's CPU GELU reads a float16 table (GGML_GELU_FP16 in ggml-cpu/vec.h): fp16 in, fp16 out.
    stage_precisions = {"blocks.*.mlp.act": "fp16"}
    # A q8_0 weight's matmul quantizes its activations to q8_0 too (the type's vec_dot_type).
    QUANTIZED_PRODUCTS = ("blocks.*.attn.qkv", "blocks.*.attn.out", "blocks.*.mlp.fc", "blocks.*.mlp.out", "logits")

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import llama_cpp
        except ImportError:
            return False, EXTRA_HINT
        try:
            import gguf  # noqa: F401  (writes the golden's weights for llama.cpp)
        except ImportError:
            return False, f"the gguf package is missing: {EXTRA_HINT}"
        version = getattr(llama_cpp, "__version__", "0")
        if _version(version) < MIN_VERSION:
            return False, f"llama-cpp-python {version} is older than 0.3.36: {EXTRA_HINT}"
        return True, ""

    def __init__(self, precision: str = "fp32", inject: str | None = None):
        super().__init__(precision, inject)
        if precision == "q8_0":
            self.stage_precisions = {**type(self).stage_precisions, **dict.fromkeys(self.QUANTIZED_PRODUCTS, "q8_0")}
        self._lib = _llama_cpp()
        _quiet_log(self._lib)
        self._lib.llama_backend_init()
        self._model: Any = None
        self.emitted: set[str] = set()

    @staticmethod
    def _last_error() -> str:
        return f": {LOG_ERRORS[-1]}" if LOG_ERRORS else ""

    def prepare(self, weights: dict[str, np.ndarray], config: dict) -> None:
        from tracer.export_gguf import write_gguf

        self.check_gpt2_config(config)
        self.n_head = int(config["n_head"])
        head_dim = int(config["n_embd"]) // self.n_head
        self.scale = np.float32(1.0) / np.sqrt(np.float32(head_dim))  # 1.0f/sqrtf(float(n_embd_head)) in C
        self.n_layer = int(config["n_layer"])
        tmp = Path(tempfile.mkdtemp(prefix="tracer-llamacpp-"))
        try:
            path = tmp / "model.gguf"
            write_gguf(path, weights, config, "", "", WEIGHT_TYPE[self.precision])
            params = self._lib.llama_model_default_params()
            params.n_gpu_layers = 0
            params.use_mmap = False  # read whole: the temporary file can go at once
            self._free_model()
            self._model = self._lib.llama_model_load_from_file(str(path).encode(), params)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not self._model:
            raise TracerError(f"llama.cpp could not load the golden's weights as GGUF{self._last_error()}")

    def _free_model(self) -> None:
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self._free_model()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    def _decode_row(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """All captured stages of one sequence, decoded alone in a fresh context (KV cells 0..T-1)."""
        lib, T = self._lib, len(ids)
        capture = Capture()
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = T  # one ubatch: every tensor holds every token
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = max(1, min(4, os.cpu_count() or 1))
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # kq / kq_soft_max exist only without it
        params.type_k = params.type_v = lib.GGML_TYPE_F32  # the default f16 cache would round K and V
        params.no_perf = True
        params.cb_eval = capture.callback
        params.cb_eval_user_data = None
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            raise TracerError(f"llama.cpp could not create a context for {T} tokens{self._last_error()}")
        batch = lib.llama_batch_init(T, 0, 1)
        try:
            for k, token in enumerate(ids):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = int(token), k, 1
                batch.seq_id[k][0], batch.logits[k] = 0, True
            batch.n_tokens = T
            status = lib.llama_decode(ctx, batch)
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)
        if capture.error is not None:
            raise TracerError(f"reading llama.cpp's tensors failed: {capture.error}")
        if status != 0:
            raise TracerError(f"llama_decode failed with status {status}{self._last_error()}")
        self.emitted.update(capture.names)
        return {stage: canonical(stage, a, T, self.n_head, self.scale) for stage, a in capture.arrays.items()}

    def forward(self, input_ids: np.ndarray, tap: Tap, attention_mask: np.ndarray | None = None) -> np.ndarray:
        if getattr(tap, "teacher_forced", False):
            raise TracerError("llamacpp runs llama.cpp's whole graph, which cannot be fed golden values: "
                              "use --mode chained")
        rows = [self._decode_row(np.asarray(ids)) for ids in np.asarray(input_ids)]
        self.warn_unmapped(set(rows[0]))
        for stage in canonical_stages(self.n_layer):
            if stage in rows[0]:
                value = rows[0][stage][None] if stage == "embed.pos" else np.stack([r[stage] for r in rows])
                tap(stage, value)  # chained only: llama.cpp goes on with its own numbers whatever tap returns
        return np.stack([r["logits"] for r in rows])

    def warn_unmapped(self, provided: set[str], warn: Callable[[str], None] | None = None) -> None:
        """Say which canonical stages llama.cpp did not provide and which of its tensors map to none."""
        warn = warn or (lambda msg: warnings.warn(msg, LlamaCppWarning, stacklevel=3))
        missing = [s for s in canonical_stages(self.n_layer) if s not in provided]
        unknown = sorted(n for n in self.emitted if not is_known_name(n))
        if missing:
            warn(f"llama.cpp's graph provided no tensor for {len(missing)} stage(s): {', '.join(missing)}")
        if unknown:
            warn(f"llama.cpp tensors mapped to no stage: {', '.join(unknown)}")

