"""`tracer export`: every format holds exactly the golden's weights and ids, in its documented layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tracer.store import Golden

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "goldens" / "tiny.h5"
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@pytest.fixture(scope="module")
def golden():
    with Golden.open(GOLDEN) as g:
        yield {"weights": g.weights(), "ids": {c: g.case(c).input_ids for c in g.case_names()},
               "config": g.model_config, "golden_id": g.golden_id}


def export(run_cli, out: Path, fmt: str, *extra: str) -> dict:
    code, _, err = run_cli("export", GOLDEN, "--format", fmt, "-o", out, "-q", *extra)
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


def test_npy_dir_holds_weights_and_ids(run_cli, golden, tmp_path):
    manifest = export(run_cli, tmp_path / "e", "npy-dir")
    assert manifest["golden_id"] == golden["golden_id"] and manifest["config"]["n_head"] == 4
    for name, array in golden["weights"].items():
        loaded = np.load(tmp_path / "e" / "weights" / f"{name}.npy", allow_pickle=False)
        assert loaded.dtype == array.dtype and np.array_equal(loaded, array), name
    assert set(manifest["cases"]) == {"case0", "case1", "case2", "batch"}
    for case, ids in golden["ids"].items():
        assert np.array_equal(np.load(tmp_path / "e" / manifest["cases"][case]["input_ids"]), ids)
    assert manifest["cases"]["case0"]["prompts"] == ["Hello, world"]
    assert "[in, out]" in (tmp_path / "e" / "README.txt").read_text()


def test_nanogpt_map_transposes_conv1d_weights(run_cli, golden, tmp_path):
    manifest = export(run_cli, tmp_path / "e", "npy-dir", "--weight-map", "nanogpt", "--case", "case0")
    w = golden["weights"]
    for i in range(2):
        for m in CONV1D:
            name = f"transformer.h.{i}.{m}.weight"
            assert np.array_equal(np.load(tmp_path / "e" / "weights" / f"{name}.npy"), w[name].T)
    entry = next(t for t in manifest["tensors"] if t["name"] == "transformer.h.0.attn.c_attn.weight")
    assert entry["transposed"] is True and entry["shape"] == [192, 64]
    assert np.array_equal(np.load(tmp_path / "e" / "weights" / "transformer.wte.weight.npy"), w["transformer.wte.weight"])
    assert list(manifest["cases"]) == ["case0"]


def test_safetensors_with_hub_names(run_cli, golden, tmp_path):
    from safetensors.numpy import load_file

    export(run_cli, tmp_path / "hf", "safetensors")
    assert set(load_file(str(tmp_path / "hf" / "model.safetensors"))) == set(golden["weights"])
    export(run_cli, tmp_path / "hub", "safetensors", "--weight-map", "hub")
    hub = load_file(str(tmp_path / "hub" / "model.safetensors"))
    assert "lm_head.weight" not in hub and "transformer.wte.weight" not in hub
    assert np.array_equal(hub["h.1.mlp.c_fc.weight"], golden["weights"]["transformer.h.1.mlp.c_fc.weight"])
    assert len(hub) == len(golden["weights"]) - 1


def test_weight_map_file_errors_are_one_line(run_cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[weights]\n"transformer.h.{i}.ln_1.weight" = "same"\n')
    code, _, err = run_cli("export", GOLDEN, "--format", "npy-dir", "-o", tmp_path / "e", "--weight-map", bad)
    assert code == 2 and "both become 'same'" in err and not (tmp_path / "e").exists()
    code, _, err = run_cli("export", GOLDEN, "--format", "llmc", "-o", tmp_path / "e", "--weight-map", "hub")
    assert code == 2 and "fixes its own names" in err and len(err.strip().splitlines()) == 1


def test_llmc_checkpoint_layout(run_cli, golden, tmp_path):
    manifest = export(run_cli, tmp_path / "e", "llmc")
    raw = (tmp_path / "e" / "model.bin").read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:8].tolist() == [20240326, 3, 128, 256, 2, 4, 64, 256]
    body = np.frombuffer(raw[1024:], dtype="<f4")
    tensors = {t["name"]: body[(t["offset"] - 1024) // 4:][: int(np.prod(t["shape"]))].reshape(t["shape"])
               for t in manifest["tensors"]}
    assert sum(t.size for t in tensors.values()) == body.size  # back to back, nothing else
    w = golden["weights"]
    assert np.array_equal(tensors["wte"], w["transformer.wte.weight"])
    assert np.array_equal(tensors["qkvw"][1], w["transformer.h.1.attn.c_attn.weight"].T)  # [out, in]
    assert np.array_equal(tensors["fcprojw"][0], w["transformer.h.0.mlp.c_proj.weight"].T)
    assert np.array_equal(tensors["ln2b"][1], w["transformer.h.1.ln_2.bias"])
    assert np.array_equal(tensors["lnfw"], w["transformer.ln_f.weight"])
    tok = (tmp_path / "e" / manifest["cases"]["case1"]["tokens"]).read_bytes()
    assert np.frombuffer(tok[:12], dtype="<i4").tolist() == [20240520, 1, golden["ids"]["case1"].size]
    assert np.frombuffer(tok[1024:], dtype="<u2").tolist() == golden["ids"]["case1"].reshape(-1).tolist()


def test_llmc_pads_the_vocabulary():
    from tracer.export_llmc import llmc_tensors, padded_vocab

    assert padded_vocab(50257) == 50304 and padded_vocab(256) == 256
    C, V = 4, 130
    w = {f"transformer.h.0.{m}.{p}": np.ones((C, C) if p == "weight" and m not in ("ln_1", "ln_2") else (C,))
         for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj") for p in ("weight", "bias")}
    w.update({"transformer.wte.weight": np.full((V, C), 2.0), "transformer.wpe.weight": np.zeros((8, C)),
              "transformer.ln_f.weight": np.ones(C), "transformer.ln_f.bias": np.zeros(C)})
    wte = dict(llmc_tensors(w, {"n_layer": 1, "vocab_size": V}))["wte"]
    assert wte.shape == (256, C) and np.all(wte[:V] == 2) and np.all(wte[V:] == 0)


def test_gguf_is_llamacpp_gpt2(run_cli, golden, tmp_path):
    gguf = pytest.importorskip("gguf")
    manifest = export(run_cli, tmp_path / "e", "gguf")
    reader = gguf.GGUFReader(str(tmp_path / "e" / "model.gguf"))

    def field(key):
        f = reader.fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()

    assert field("general.architecture") == "gpt2"
    assert field("gpt2.block_count") == 2 and field("gpt2.attention.head_count") == 4
    assert field("gpt2.embedding_length") == 64 and field("gpt2.context_length") == 128
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 256 and tokens[ord("A")] == "A" and tokens[ord(" ")] == "Ġ"  # GPT-2's byte alphabet
    data = {t.name: np.asarray(t.data) for t in reader.tensors}
    w = golden["weights"]
    assert np.array_equal(data["token_embd.weight"], w["transformer.wte.weight"])
    assert np.array_equal(data["output.weight"], w["lm_head.weight"])
    assert np.array_equal(data["blk.1.attn_qkv.weight"], w["transformer.h.1.attn.c_attn.weight"].T)
    assert np.array_equal(data["blk.0.ffn_down.weight"], w["transformer.h.0.mlp.c_proj.weight"].T)
    assert np.array_equal(data["blk.0.attn_norm.bias"], w["transformer.h.0.ln_1.bias"])
    assert np.array_equal(data["output_norm.weight"], w["transformer.ln_f.weight"])
    assert len(data) == len(manifest["tensors"]) == len(w)


def test_existing_output_needs_force(run_cli, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, _, err = run_cli("export", GOLDEN, "--format", "npy-dir", "-o", out)
    assert code == 2 and "--force" in err and (out / "mine.txt").read_text() == "keep"
    code, _, err = run_cli("export", GOLDEN, "--format", "npy-dir", "-o", out, "--force", "-q")
    assert code == 0 and not (out / "mine.txt").exists() and (out / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_bad_inputs_exit_2(run_cli, tmp_path):
    from tracer.record import record_golden, build_cases
    from tracer.models import load_model

    for args, words in (((GOLDEN, "--format", "onnx"), "unknown export format"),
                        ((GOLDEN, "--format", "llmc", "--case", "nope"), "no case 'nope'"),
                        ((tmp_path / "missing.h5", "--format", "llmc"), "no such file")):
        code, _, err = run_cli("export", *args, "-o", tmp_path / "e")
        assert code == 2 and words in err and "Traceback" not in err
        assert not (tmp_path / "e").exists()
    loaded = load_model("tiny")
    record_golden(loaded, build_cases(loaded, ["x"], [], False), str(tmp_path / "nw.h5"), dtype="fp32",
                  attn="eager", with_weights=False)
    code, _, err = run_cli("export", tmp_path / "nw.h5", "--format", "npy-dir", "-o", tmp_path / "e")
    assert code == 2 and "no weights" in err


def test_include_dir_holds_the_helpers(run_cli):
    code, out, _ = run_cli("include-dir")
    where = Path(out.strip())
    assert code == 0 and (where / "tracer_dump.h").is_file() and (where / "tracer_dump.rs").is_file()
