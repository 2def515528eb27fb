"""Generate the README's tables of bugs: for each, the stage and diagnosis the tool reports.

    python scripts/bug_table.py                 # print the Markdown tables
    python scripts/bug_table.py --update-readme # rewrite them between the README's markers

Two catalogs. `--inject` bugs: replayed by the NumPy backend on the tiny golden (teacher-forced +
chained) and on a random gpt2-shape model (chained only). The independent ports' bugs
(tests/ports/catalog.py): the C port's incomplete dump (no q/k/v, no embed.pos, masked scores never
written) and the NumPy-style port's complete dump under its own names, on the same two goldens.
All compared with default tolerances.
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
PORT_BEGIN, PORT_END = "<!-- port-bug-table:begin -->", "<!-- port-bug-table:end -->"
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


def goldens(layers: int, work: Path) -> dict[str, Path]:
    out = {}
    for name, loaded, ids in (("tiny", load_model("tiny"), None), ("gpt2", gpt2_shape(layers), list(range(300, 332)))):
        out[name] = work / f"{name}.h5"
        cases = build_cases(loaded, ["The engineer printed every tensor"] if ids is None else [], [ids] if ids else [],
                            batch=False)
        record_golden(loaded, cases, str(out[name]), dtype="fp32", attn="eager")
    return out


def table(layers: int, golden: dict[str, Path], work: Path) -> str:
    rows = ["| bug (`--inject`) | lives in | tiny, both modes: origin | diagnosis | "
            f"gpt2 shape ({layers} layers), chained only: origin | diagnosis |", "|---|---|---|---|---|---|"]
    for bug, spec in CATALOG.items():
        tiny_origin, tiny_diag, _ = outcome(golden["tiny"], bug, "both", work)
        gpt_origin, gpt_diag, _ = outcome(golden["gpt2"], bug, "chained", work)
        rows.append(f"| `{bug}` | `{spec.origin}` | `{tiny_origin}` | {tiny_diag} | `{gpt_origin}` | {gpt_diag} |")
    return "\n".join(rows)


def port_outcome(golden: Path, bug: str, port: str, work: Path) -> tuple[str, str]:
    from tests.ports.real_ports import run_c_port, run_numpy_style_port
    from tracer.compare.run import CompareRequest, run_compare

    out = Path(tempfile.mkdtemp(dir=work)) / "dump"
    dump, name_map = (run_c_port(golden, out, bug=bug), None) if port == "c" else \
        run_numpy_style_port(golden, out, bug=bug)
    result = run_compare(CompareRequest(golden, dump, name_map=name_map, quiet=True))
    case = result.cases[0]
    if result.passed or not case.origin:
        return "passes (not found)", ""
    diag = case.stage(case.origin).diagnoses
    return case.origin + ("°" if case.stage(case.origin).derived else ""), \
        f"{diag[0].verdict}: {diag[0].bug}" if diag else "—"


def port_table(layers: int, golden: dict[str, Path], work: Path) -> str:
    from tests.ports.catalog import CATALOG as PORT_CATALOG
    from tests.ports.real_ports import build_c_port

    if build_c_port(work) is None:
        raise SystemExit("the port table needs a C compiler (cc)")
    rows = ["| bug (independent ports) | cause | C port, tiny: origin | diagnosis | NumPy-style port, tiny: origin "
            f"| C port, gpt2 shape ({layers} layers): origin | diagnosis |", "|---|---|---|---|---|---|---|"]
    for bug in PORT_CATALOG:
        c_origin, c_diag = port_outcome(golden["tiny"], bug.name, "c", work)
        np_origin, _ = port_outcome(golden["tiny"], bug.name, "numpy", work)
        g_origin, g_diag = port_outcome(golden["gpt2"], bug.name, "c", work)
        rows.append(f"| `{bug.name}`: {bug.description} | {bug.cause} | `{c_origin}` | {c_diag} | `{np_origin}` | "
                    f"`{g_origin}` | {g_diag} |")
    return "\n".join(rows)


def _replace(readme: str, begin: str, end: str, text: str) -> str:
    return re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{text}\n{end}", readme, flags=re.S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--layers", type=int, default=4, help="layers of the gpt2-shape model")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bug-table-"))
    golden = goldens(args.layers, work)
    text, ports = table(args.layers, golden, work), port_table(args.layers, golden, work)
    if args.update_readme:
        readme = README.read_text(encoding="utf-8")
        readme = _replace(_replace(readme, BEGIN, END, text), PORT_BEGIN, PORT_END, ports)
        README.write_text(readme, encoding="utf-8")
    print(text, ports, sep="\n\n")


if __name__ == "__main__":
    main()
