"""Modular MAX as a candidate backend: `--backend max:pkg.mod:Class` (SPEC §5).

Why: a GPT-2 port written with MAX's `max.experimental.nn` modules is judged by running that very
module on the golden's weights. The class is built from the golden's config (any object with HF's
config attributes: `n_embd`, `n_head`, ...) without running anything, its parameters are filled
from the golden's weights through the `[weights]` table of the shipped `max` map (HF names; Conv1D
weights transposed to MAX `Linear`'s [out, in]), and its `forward` is traced ONCE into a graph with
symbolic batch and sequence dimensions. While tracing, every submodule call is wrapped so its
first input and its output become graph outputs too (named `<module path>.in.0` / `.out.0`), as
are the input and output of the `F.softmax` called inside a submodule (`<path>.softmax.in.0` /
`.out.0`: the masked scores and the probabilities). The `[names]` table of the same map turns those
names into canonical stages: module outputs through the HF module table (`transformer.h.0.ln_1` is
blocks.0.ln1), the stages that are no module's output through inputs (`attn.c_proj.in.0` is
attn.ctx, `ln_2.in.0` resid_mid, `mlp.c_proj.in.0` mlp.act, `h.0.in.0` embed.sum).

Compiling is the slow part (minutes cold on two cores): it happens once per prepare, every case
runs the same compiled graph, and MAX keeps its compiled kernels and graphs under ~/.cache/modular
($XDG_CACHE_HOME/modular), keyed by the graph's content, so the next process (or the next golden of
the same shape) compiles in seconds while a changed module compiles anew. `max.experimental` changes
between releases: this backend is written against MAX 26.7 (the `max` extra pins it) and says so
when another version is installed.

Chained mode only (the graph cannot be fed golden values); right padding only (the module applies
a causal mask, which keeps real tokens from seeing the padding after them, and the comparator
ignores the padded rows; left padding would change what real tokens see).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np

from backends.protocol import Backend, Tap
from tracer.errors import TracerError
from tracer.progress import step
from tracer.stages import canonical_stages

REFERENCE = "backends.max_gpt2:MaxGPT2LMHeadModel"  # the port `--backend max` runs
PINNED = "26.7"
EXTRA_HINT = "needs the max extra: pip install 'gpt2-tracer[max]' (Modular MAX 26.7)"
MAP = "max"  # tracer/data/maps/max.toml: [weights] to load the module, [names] to name its outputs
CONFIG_DEFAULTS = {"n_inner": None, "layer_norm_epsilon": 1e-5}


class MaxWarning(UserWarning):
    """The module produced outputs the name map does not know, or no output for some stages."""


def _installed_version() -> str | None:
    if importlib.util.find_spec("max") is None:
        return None
    try:
        return md.version("max")
    except md.PackageNotFoundError:
        return "unknown"


def module_class(path: str) -> type:
    """Import `pkg.mod:Class` (a MAX `Module` subclass) or say in one line why not."""
    from max.experimental.nn import Module

    from backends.registry import import_attr

    cls = import_attr(path)
    if not (isinstance(cls, type) and issubclass(cls, Module)):
        raise TracerError(f"{path} is not a MAX module: expected a subclass of max.experimental.nn.Module")
    return cls


class Capture:
    """While a graph is traced: the first input and the output of every submodule call, and of
    `F.softmax` called inside a submodule, keyed `<module path>.in.0` / `.out.0`."""

    def __init__(self, paths: dict[int, str]):
        self.paths = paths  # id(module) -> its path in the model
        self.values: dict[str, Any] = {}
        self.stack: list[str] = []

    def keep(self, name: str, value: Any) -> None:
        from max.experimental.tensor import Tensor

        if isinstance(value, Tensor) and name not in self.values:  # a second call of a module keeps the first
            self.values[name] = value

    @contextmanager
    def active(self) -> Iterator[None]:
        from max.experimental import functional as F
        from max.experimental.nn import Module

        module_call, softmax = Module.__call__, F.softmax
        capture = self

        def call(module: Any, *args: Any, **kwargs: Any) -> Any:
            path = capture.paths.get(id(module))
            if path is None:
                return module_call(module, *args, **kwargs)
            capture.stack.append(path)
            try:
                out = module_call(module, *args, **kwargs)
            finally:
                capture.stack.pop()
            if args:
                capture.keep(f"{path}.in.0", args[0])
            capture.keep(f"{path}.out.0", out[0] if isinstance(out, (tuple, list)) and out else out)
            return out

        def traced_softmax(x: Any, *args: Any, **kwargs: Any) -> Any:
            out = softmax(x, *args, **kwargs)
            if capture.stack:
                capture.keep(f"{capture.stack[-1]}.softmax.in.0", x)
                capture.keep(f"{capture.stack[-1]}.softmax.out.0", out)
            return out

        Module.__call__, F.softmax = call, traced_softmax
        try:
            yield
        finally:
            Module.__call__, F.softmax = module_call, softmax


def stage_names(names: list[str], n_layer: int) -> tuple[dict[str, str], list[str]]:
    """Canonical stage -> the captured name holding it (a module's own output before a module
    passing it on, then call order), and the names the map does not know."""
    from tracer.foreign import load_name_map

    nmap = load_name_map(MAP)
    best: dict[str, tuple[int, str]] = {}
    unknown = []
    for name in names:
        resolved = nmap.resolve(name, n_layer)
        if resolved is None:
            unknown.append(name)
        elif resolved.stage and (resolved.stage not in best or resolved.rank < best[resolved.stage][0]):
            best[resolved.stage] = (resolved.rank, name)
    return {stage: name for stage, (_, name) in best.items()}, unknown


def module_weights(params: dict[str, Any], weights: dict[str, np.ndarray], n_layer: int) -> dict[str, np.ndarray]:
    """The golden's weights under the module's parameter names, oriented as MAX holds them."""
    from tracer.weights.names import load_weight_map

    wmap = load_weight_map(MAP)
    out = {}
    for name, param in params.items():
        expects = wmap.resolve(name, n_layer)
        if len(expects) != 1 or expects[0].part is not None or expects[0].param not in weights:
            raise TracerError(f"MAX module parameter {name!r} has no golden weight under the max map's names "
                              f"(expected HF GPT-2 names such as transformer.h.0.attn.c_attn.weight)")
        array = weights[expects[0].param]
        array = array.T if expects[0].transpose else array
        shape = tuple(int(d) for d in param.shape)
        if array.shape != shape:
            raise TracerError(f"MAX module parameter {name!r} has shape {shape}, the golden's "
                              f"{expects[0].param} gives {array.shape}")
        out[name] = np.ascontiguousarray(array, dtype=np.float32)
    return out


def _right_padded(mask: np.ndarray) -> bool:
    m = np.asarray(mask).astype(bool)
    return bool(np.all(m[:, :-1] >= m[:, 1:])) if m.shape[1] > 1 else True


class MaxBackend(Backend):
    name = "max"
    precisions = ("fp32",)
    module_path = REFERENCE  # `max:pkg.mod:Class` binds another (for_module)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        version = _installed_version()
        if version is None:
            return False, EXTRA_HINT
        if not version.startswith(f"{PINNED}."):
            return False, f"Modular MAX {version} is installed; this backend is written against {PINNED} " \
                          f"(max.experimental changes between releases): pip install 'max=={PINNED}.*'"
        return True, ""

    @classmethod
    def for_module(cls, path: str) -> type[MaxBackend]:
        """The backend class running the MAX module `pkg.mod:Class` (from `--backend max:pkg.mod:Class`)."""
        if not path:
            raise TracerError("--backend max: needs a module after the colon, e.g. max:my_pkg.gpt2:MaxGPT2LMHeadModel")
        return type(cls.__name__, (cls,), {"module_path": path})

    def __init__(self, precision: str = "fp32", inject: str | None = None):
        super().__init__(precision, inject)
        self.model_class = module_class(self.module_path)
        self._run: Callable[[np.ndarray], list[np.ndarray]] | None = None

    def prepare(self, weights: dict[str, np.ndarray], config: dict) -> None:
        from max.driver import CPU
        from max.experimental.functional import lazy
        from max.experimental.tensor import Tensor, default_device

        if self.module_path == REFERENCE:
            self.check_gpt2_config(config)
        self.n_layer = int(config["n_layer"])
        with default_device(CPU()), lazy():  # lazy: the module's own initial values are never computed
            try:
                model = self.model_class(SimpleNamespace(**{**CONFIG_DEFAULTS, **config}))
            except Exception as exc:
                raise TracerError(f"{self.module_path}(config) failed: {type(exc).__name__}: {exc}") from None
        params = {name: t for name, t in model.parameters if isinstance(t, Tensor)}
        self._run = self._compile(model, module_weights(params, weights, self.n_layer))

    def _compile(self, model: Any, weights: dict[str, np.ndarray]) -> Callable[[np.ndarray], list[np.ndarray]]:
        """Trace once (symbolic batch and seq) with every captured value a graph output, compile, bind the weights."""
        from max.dtype import DType
        from max.experimental.nn import Module
        from max.graph import DeviceRef, TensorType

        backend = self

        class Traced(Module):
            """The model, returning its logits and then the value of every stage it produces."""

            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.model = inner

            def forward(self, input_ids: Any) -> list[Any]:
                # While tracing, `self` is the copy MAX made with declared weights: its descendants are the
                # modules called.
                capture = Capture({id(m): path for path, m in self.model.descendants})
                with capture.active():
                    logits = self.model(input_ids)
                backend.stages, backend.unknown = stage_names(list(capture.values), backend.n_layer)
                backend.order = [s for s in canonical_stages(backend.n_layer) if s in backend.stages]
                return [logits, *(capture.values[backend.stages[s]] for s in backend.order)]

        ids_type = TensorType(DType.int64, ["batch", "seq"], device=DeviceRef.CPU())
        with step("MAX: tracing and compiling (minutes the first time)", 1) as advance:
            compiled = Traced(model).compile(ids_type, weights={f"model.{k}": v for k, v in weights.items()})
            advance()
        self.warn_unmapped()

        def run(ids: np.ndarray) -> list[np.ndarray]:
            from max.experimental.tensor import Tensor

            return [t.to_numpy() for t in compiled(Tensor.from_dlpack(np.ascontiguousarray(ids, dtype=np.int64)))]

        return run

    def forward(self, input_ids: np.ndarray, tap: Tap, attention_mask: np.ndarray | None = None) -> np.ndarray:
        if getattr(tap, "teacher_forced", False):
            raise TracerError("max runs the compiled MAX graph whole, which cannot be fed golden values: "
                              "use --mode chained")
        if attention_mask is not None and not _right_padded(attention_mask):
            raise TracerError("max: the MAX module applies only a causal mask, so only right-padded batches replay "
                              "(this golden has left padding or holes in its attention_mask)")
        if self._run is None:
            raise TracerError("max backend: prepare() was not called")
        logits, *values = self._run(np.asarray(input_ids))
        for stage, value in zip(self.order, values):
            tap(stage, value[None] if stage == "embed.pos" and value.ndim == 2 else value)  # wpe(positions): [T, C]
        return logits

    def warn_unmapped(self, warn: Callable[[str], None] | None = None) -> None:
        """Say which canonical stages the module did not produce (q, k, v excepted where qkv is there:
        the comparator splits it) and which captured names the map does not know."""
        warn = warn or (lambda msg: warnings.warn(msg, MaxWarning, stacklevel=3))
        derived = {f"{s[: -len('qkv')]}{x}" for s in self.stages if s.endswith(".attn.qkv") for x in "qkv"}
        missing = [s for s in canonical_stages(self.n_layer) if s not in self.stages and s not in derived]
        if missing:
            warn(f"the MAX module produced no output for {len(missing)} stage(s): {', '.join(missing)}")
        if self.unknown:
            warn(f"MAX module outputs mapped to no stage: {', '.join(self.unknown)}")

