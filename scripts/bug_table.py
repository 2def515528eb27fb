"""Generate the README's table of catalog bugs: for each, the stage and diagnosis the tool reports.

    python scripts/bug_table.py                 # print the Markdown table
    python scripts/bug_table.py --update-readme # rewrite it between the README's markers

Each bug is replayed by the NumPy backend on the tiny golden (teacher-forced + chained) and on a
random gpt2-shape model (chained only), and compared with default tolerances.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from backends.inject import CATALOG
from backends.numpy_backend import NumpyBackend
from tracer.compare.comparator import CompareOptions, compare
from tracer.compare.tolerance import Tolerances
from tracer.models import LoadedModel, byte_decode, byte_encode, load_model
from tracer.record import build_cases, record_golden
from tracer.replay import replay
from tracer.store import StageFile

BEGIN, END = "<!-- bug-table:begin -->", "<!-- bug-table:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def gpt2_shape(layers: int) -> LoadedModel:
    from transformers import GPT2LMHeadModel

    from tracer.synth import random_config, realistic_init_

    model = GPT2LMHeadModel(random_config("gpt2", n_layer=layers))
    realistic_init_(model, 0)
    return LoadedModel(model.eval(), f"random:gpt2 (n_layer={layers})", "bytes", byte_encode, byte_decode)


def outcome(golden: Path, bug: str, mode: str, work: Path) -> tuple[str, str, str]:
    trace = work / f"{bug}-{mode}.h5"
    replay(golden, NumpyBackend("fp32", inject=bug), trace, mode=mode, force=True)
    with StageFile.open(golden) as g, StageFile.open(trace) as t:
        result = compare(g, t, CompareOptions(Tolerances()))
    if result.passed:
        return "passes (not found)", "", ""
    case = next(c for c in result.cases if c.origin)
    stage = case.stage(case.origin)
    diag = stage.diagnoses[0] if stage.diagnoses else None
    text = f"{diag.verdict}: {diag.bug}" if diag else "—"
    return case.origin, text, f"exit {result.exit_code}"


def table(layers: int) -> str:
    work = Path(tempfile.mkdtemp(prefix="bug-table-"))
    goldens = {}
    for name, loaded, ids in (("tiny", load_model("tiny"), None), ("gpt2", gpt2_shape(layers), list(range(300, 332)))):
        goldens[name] = work / f"{name}.h5"
        cases = build_cases(loaded, ["The engineer printed every tensor"] if ids is None else [], [ids] if ids else [],
                            batch=False)
        record_golden(loaded, cases, str(goldens[name]), dtype="fp32", attn="eager")
    rows = ["| bug (`--inject`) | lives in | tiny, both modes: origin | diagnosis | "
            f"gpt2 shape ({layers} layers), chained only: origin | diagnosis |", "|---|---|---|---|---|---|"]
    for bug, spec in CATALOG.items():
        tiny_origin, tiny_diag, _ = outcome(goldens["tiny"], bug, "both", work)
        gpt_origin, gpt_diag, _ = outcome(goldens["gpt2"], bug, "chained", work)
        rows.append(f"| `{bug}` | `{spec.origin}` | `{tiny_origin}` | {tiny_diag} | `{gpt_origin}` | {gpt_diag} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--layers", type=int, default=4, help="layers of the gpt2-shape model")
    args = parser.parse_args()
    text = table(args.layers)
    if args.update_readme:
        readme = README.read_text(encoding="utf-8")
        block = f"{BEGIN}\n{text}\n{END}"
        README.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S),
                          encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
