"""Re-create the checked-in goldens and their baseline (run from the repository root):

    python scripts/make_goldens.py

goldens/tiny.h5                    the embedded tiny model, fp32, eager: cases case0..case2 (one prompt
                                   each) and `batch` (two prompts right-padded into one case)
goldens/tiny.numpy.baseline.json   the NumPy backend's per-stage errors on it, for the CI gate
"""

from __future__ import annotations

from pathlib import Path

from tracer.compare.run import CompareRequest, run_compare
from tracer.models import load_model
from tracer.record import build_cases, record_golden

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "goldens" / "tiny.h5"
BASELINE = ROOT / "goldens" / "tiny.numpy.baseline.json"
PROMPTS = ["Hello, world", "The engineer printed every tensor by hand.", "attention is all"]
BATCH_PROMPTS = ["Hi!", "A padded batch: the shorter prompt gets right padding."]


def make_golden(out: Path) -> None:
    loaded = load_model("tiny")
    cases = build_cases(loaded, PROMPTS, [], batch=False) + build_cases(loaded, BATCH_PROMPTS, [], batch=True)
    record_golden(loaded, cases, str(out), dtype="fp32", attn="eager", force=True)


def main() -> None:
    make_golden(GOLDEN)
    run_compare(CompareRequest(GOLDEN, backend="numpy", baseline=BASELINE, update_baseline=True, quiet=True))
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size / 1e6:.2f} MB) and {BASELINE}")


if __name__ == "__main__":
    main()
