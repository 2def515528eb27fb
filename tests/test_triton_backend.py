"""The Triton backend's kernels agree with NumPy, its replay passes the comparator, and each injected
bug is localized to the stage it lives in.

Without CUDA the kernels run on CPU tensors under Triton's interpreter, which only works in a
process whose environment had TRITON_INTERPRET=1 before `triton.language` was first imported
(Triton decorates its own library then; transformers imports it early). So on CPU, unless this
process already runs under the interpreter, every test here is skipped and
`test_cpu_run_under_the_interpreter` runs this file in a child pytest with TRITON_INTERPRET=1
(its quick and slow halves separately, under the same -m selection): the rest of the suite keeps
its environment. To select single tests on CPU: `TRITON_INTERPRET=1 pytest tests/test_triton_backend.py -k ...`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).parent / "plugins"))

from goldens import record  # noqa: E402

from backends.inject import CATALOG  # noqa: E402
from backends.registry import resolve_backend  # noqa: E402
from backends.triton_backend import VARIANTS, TritonBackend, interpreter_loaded  # noqa: E402
from tracer.compare.comparator import CompareOptions, compare  # noqa: E402
from tracer.compare.result import CompareResult  # noqa: E402
from tracer.compare.tolerance import Tolerances  # noqa: E402
from tracer.errors import TracerError  # noqa: E402
from tracer.replay import replay  # noqa: E402
from tracer.store import Golden, StageFile  # noqa: E402

CUDA = torch.cuda.is_available()
KERNELS_RUN_HERE = CUDA or interpreter_loaded()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def skip_unless_kernels_run_here() -> None:
    if not KERNELS_RUN_HERE:
        pytest.skip("no CUDA and triton was imported without TRITON_INTERPRET=1: run by "
                    "test_cpu_run_under_the_interpreter in a child process")


@pytest.fixture(autouse=True)
def kernels_run_here(request):
    if request.function is not test_cpu_run_under_the_interpreter:
        skip_unless_kernels_run_here()


@pytest.fixture(scope="module")
def K():
    """The kernels module (compiled on a GPU, interpreted on CPU tensors otherwise)."""
    import backends.triton_kernels as kernels

    return kernels


@pytest.fixture(scope="module")
def device() -> str:
    return "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def realistic_golden(tmp_path_factory) -> Path:
    """Right-padded batch of two prompts (33 and 3 tokens), trained-like statistics, non-zero biases."""
    skip_unless_kernels_run_here()  # module-scoped: set up before the autouse check runs
    return record(tmp_path_factory.mktemp("triton_realistic") / "golden.h5")


def compared(golden: Path, trace: Path) -> CompareResult:
    with StageFile.open(golden) as g, StageFile.open(trace) as t:
        return compare(g, t, CompareOptions(Tolerances()))


def failures(result: CompareResult) -> list[str]:
    return [f"{c.case}/{s.stage}: error {s.error:.2e} > {s.tolerance:.2e}, introduced {s.local_error} > "
            f"{s.local_tolerance}" for c in result.cases for s in c.stages if s.failed]


def rng_tensor(shape: tuple[int, ...], device: str, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.standard_normal(shape).astype(np.float32)).to(device)


# -- CPU: the whole file again, in a process that starts under the interpreter --------------
@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernels run in this process")
@pytest.mark.parametrize("half", ["not slow", pytest.param("slow", marks=pytest.mark.slow)])
def test_cpu_run_under_the_interpreter(half, request):
    selection = f"({half})"
    if request.config.getoption("markexpr"):
        selection += f" and ({request.config.getoption('markexpr')})"
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", selection],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary


# -- single kernels against NumPy (float64) -------------------------------------------------
@pytest.mark.parametrize("M,N,K_", [(1, 1, 1), (5, 7, 3), (33, 65, 31), (17, 130, 70)])
def test_linear_odd_shapes_and_strided_weight(K, device, M, N, K_):
    x, w, b = rng_tensor((M, K_), device, 1), rng_tensor((K_, N), device, 2), rng_tensor((N,), device, 3)
    ref = x.double().cpu().numpy() @ w.double().cpu().numpy()
    got = K.linear(x, w, b).cpu().numpy()
    np.testing.assert_allclose(got, ref + b.cpu().numpy(), rtol=1e-5, atol=1e-5 * math.sqrt(K_))
    w_view = w.T.contiguous().T  # same values, column-major strides, as the tied lm_head view
    np.testing.assert_allclose(K.linear(x, w_view, None).cpu().numpy(), ref, rtol=1e-5, atol=1e-5 * math.sqrt(K_))


def numpy_layernorm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float, ddof: int = 0) -> np.ndarray:
    xc = x - x.mean(-1, keepdims=True)
    return xc / np.sqrt((xc * xc).sum(-1, keepdims=True) / (x.shape[-1] - ddof) + eps) * g + b


@pytest.mark.parametrize("C", [64, 100])
def test_layernorm_rows(K, device, C):
    x = rng_tensor((3, 5, C), device, 4) * 3 + 1
    g, b = rng_tensor((C,), device, 5), rng_tensor((C,), device, 6)
    args = [t.double().cpu().numpy() for t in (x, g, b)]
    np.testing.assert_allclose(K.layernorm(x, g, b, 1e-5).cpu().numpy(), numpy_layernorm(*args, 1e-5),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(K.layernorm(x, g, b, 1e-5, "unbiased").cpu().numpy(),
                               numpy_layernorm(*args, 1e-5, ddof=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(K.layernorm(x, g, b, 1e-5, "skip").cpu().numpy(), x.cpu().numpy())


def test_gelu_tanh_and_erf(K, device):
    x = rng_tensor((3001,), device, 7) * 4
    xd = x.double().cpu().numpy()
    tanh_ref = 0.5 * xd * (1 + np.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))
    erf_ref = 0.5 * xd * (1 + np.vectorize(math.erf)(xd / math.sqrt(2)))
    np.testing.assert_allclose(K.gelu(x).cpu().numpy(), tanh_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(K.gelu(x, "erf").cpu().numpy(), erf_ref, rtol=1e-5, atol=1e-6)
    assert np.abs(tanh_ref - erf_ref).max() > 1e-4  # the two variants are distinguishable


def test_embedding_positions_and_broadcast_add(K, device):
    table = rng_tensor((50, 24), device, 8)
    ids = torch.tensor([[3, 49, 0], [7, 7, 1]], device=device)
    tok = K.embedding(table, ids)
    np.testing.assert_array_equal(tok.cpu().numpy(), table.cpu().numpy()[ids.cpu().numpy()])
    pos = K.positions(table, 3, offset=48)  # wraps at n_positions: rows 48, 49, 0
    np.testing.assert_array_equal(pos.cpu().numpy()[0], table.cpu().numpy()[[48, 49, 0]])
    np.testing.assert_allclose(K.add(tok, pos).cpu().numpy(), tok.cpu().numpy() + pos.cpu().numpy(), rtol=1e-7)
    np.testing.assert_array_equal(K.add(tok, pos, use_y=False).cpu().numpy(), tok.cpu().numpy())
    with pytest.raises(ValueError, match="broadcast"):
        K.add(tok, pos[:, :2].contiguous())


def numpy_attention(q, k, v, keep, shift=0):
    """scores (-inf where masked), probs and merged ctx in float64."""
    T, D = q.shape[-2:]
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(D)
    allowed = np.tri(T, k=shift, dtype=bool)[None, None] & keep.astype(bool)[:, None, None, :]
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ctx = p @ v
    B, H = q.shape[:2]
    return s, p, ctx.transpose(0, 2, 1, 3).reshape(B, T, H * D)


@pytest.mark.parametrize("T", [5, 19, 70])  # one key tile, a partial tile, several tiles
def test_attention_causal_with_padding(K, device, T):
    B, H, D = 2, 3, 24  # D not a power of two: the head dim is masked
    qkv = rng_tensor((B, T, 3 * H * D), device, 9)
    keep = torch.ones((B, T), dtype=torch.int8, device=device)
    keep[1, T // 2 + 1:] = 0  # right padding in the second row
    q, k, v = K.split_heads(qkv, H)
    assert not q.is_contiguous()  # heads are read through strides
    s, p, ctx = numpy_attention(*(t.double().cpu().numpy() for t in (q, k, v)), keep.cpu().numpy())
    att = K.attention(q, k, v, keep)
    got_s = att.scores.cpu().numpy()
    assert np.array_equal(np.isneginf(got_s), np.isneginf(s))
    np.testing.assert_allclose(got_s[np.isfinite(s)], s[np.isfinite(s)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(att.probs.cpu().numpy(), p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att.ctx.cpu().numpy(), ctx, rtol=1e-5, atol=1e-5)
    # ctx alone (nothing written), and relaunched from handed-back scores / probs
    np.testing.assert_allclose(K.attention(q, k, v, keep, write=False).ctx.cpu().numpy(), ctx, rtol=1e-5, atol=1e-5)
    assert att.given_scores(att.scores) is att
    from_scores = att.given_scores(att.scores.clone())
    np.testing.assert_allclose(from_scores.probs.cpu().numpy(), p, rtol=1e-5, atol=1e-6)
    doubled = att.given_probs(att.probs * 2)
    np.testing.assert_allclose(doubled.ctx.cpu().numpy(), 2 * ctx, rtol=1e-5, atol=1e-5)


def test_attention_mask_variants(K, device):
    B, H, T, D = 1, 2, 20, 16
    qkv = rng_tensor((B, T, 3 * H * D), device, 10)
    keep = torch.ones((B, T), dtype=torch.int8, device=device)
    q, k, v = K.split_heads(qkv, H)
    shifted = K.attention(q, k, v, keep, K.AttentionOptions(causal_shift=1))
    s, p, ctx = numpy_attention(*(t.double().cpu().numpy() for t in (q, k, v)), keep.cpu().numpy(), shift=1)
    assert np.array_equal(np.isneginf(shifted.scores.cpu().numpy()), np.isneginf(s))
    np.testing.assert_allclose(shifted.ctx.cpu().numpy(), ctx, rtol=1e-5, atol=1e-5)
    full = K.attention(q, k, v, keep, K.AttentionOptions(causal=False))
    assert not np.isneginf(full.scores.cpu().numpy()).any()


# -- whole replays through the comparator ---------------------------------------------------
@pytest.mark.slow
def test_replay_both_modes_passes_compare(tiny_golden, tmp_path):
    out = tmp_path / "trace.h5"
    replay(tiny_golden, TritonBackend(), out, mode="both")
    result = compared(tiny_golden, out)
    assert result.passed, failures(result)
    with StageFile.open(out) as t:
        case = t.case(t.case_names()[0])
        assert case.stages("stages") and case.stages("isolated") == case.stages("stages")
        scores = case.read("blocks.0.attn.scores", "isolated")
        assert scores.dtype == np.float32 and np.isneginf(scores).any()


@pytest.mark.parametrize("precision", ["fp32", pytest.param("fp16", marks=pytest.mark.slow)])  # fp16 runs interpreted too
def test_chained_replay_of_padded_batch_passes_compare(realistic_golden, tmp_path, precision):
    out = tmp_path / "trace.h5"
    replay(realistic_golden, TritonBackend(precision), out, mode="chained")
    result = compared(realistic_golden, out)
    assert result.passed, failures(result)
    with StageFile.open(out) as t:
        probs = t.case("batch").read("blocks.0.attn.probs")
    assert probs.dtype == (np.float16 if precision == "fp16" else np.float32)
    assert np.all(probs[1, :, :, 3:] == 0)  # the 3-token prompt never attends its padding


@pytest.mark.slow
@pytest.mark.parametrize("bug", sorted(VARIANTS))
def test_injected_bug_is_localized_to_its_stage(bug, realistic_golden, tmp_path):
    out = tmp_path / "trace.h5"
    replay(realistic_golden, TritonBackend(inject=bug), out, mode="chained")
    result = compared(realistic_golden, out)
    assert not result.passed
    assert result.cases[0].origin == CATALOG[bug].origin


@pytest.mark.slow
def test_teacher_forcing_confines_an_attention_bug_to_its_stage(realistic_golden, tmp_path):
    """Isolated mode: probs are recomputed from the golden scores the tap returns, so a wrong mask
    fails attn.scores alone and the probs that follow introduce no error of their own."""
    out = tmp_path / "trace.h5"
    replay(realistic_golden, TritonBackend(inject="mask-off-by-one"), out, mode="isolated")
    case = compared(realistic_golden, out).cases[0]
    assert case.origin == "blocks.0.attn.scores"
    assert case.stage("blocks.0.attn.scores").fails_local
    assert not case.stage("blocks.0.attn.probs").fails_local
    assert not case.stage("blocks.0.attn.ctx").fails_local


# -- GPU only -------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16"])
def test_cuda_replay_passes_compare(realistic_golden, tmp_path, precision):
    backend = TritonBackend(precision)
    assert backend.device == "cuda"
    out = tmp_path / "trace.h5"
    replay(realistic_golden, backend, out, mode="both")
    result = compared(realistic_golden, out)
    assert result.passed, failures(result)


# -- inputs and errors ----------------------------------------------------------------------
def test_whole_catalog_and_unsupported_input_errors():
    assert set(VARIANTS) == set(CATALOG) == TritonBackend.supported_injections
    with pytest.raises(TracerError, match="unknown bug 'no-such-bug'"):
        TritonBackend(inject="no-such-bug")
    with pytest.raises(TracerError, match="unknown precision 'bf16'"):
        TritonBackend("bf16")
    backend = resolve_backend("triton", "tf32", "gelu-erf")
    assert isinstance(backend, TritonBackend) and (backend.precision, backend.inject) == ("tf32", "gelu-erf")
    with pytest.raises(TracerError, match="relu"):
        TritonBackend().prepare({}, {"activation_function": "relu", "n_layer": 1, "n_head": 1})
    with pytest.raises(TracerError, match="no 'transformer.wte.weight'"):
        TritonBackend().prepare({}, {"n_layer": 1, "n_head": 1})


def test_out_of_vocabulary_ids_are_refused_before_any_kernel(tiny_golden):
    backend = TritonBackend()
    with Golden.open(tiny_golden) as g:
        backend.prepare(g.weights(), g.model_config)
        vocab = int(g.model_config["vocab_size"])
    with pytest.raises(TracerError, match="outside the vocabulary"):
        backend.forward(np.array([[1, vocab]]), lambda stage, value: value)


def test_unavailable_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    available, why = TritonBackend.availability()
    assert not available and "TRITON_INTERPRET=1" in why
    with pytest.raises(TracerError, match="not available here"):
        resolve_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("backends.triton_backend.interpreter_loaded", lambda: False)
    available, why = TritonBackend.availability()
    assert not available and "set after triton was imported" in why
