"""The manifest tracer_dump.h / tracer_dump.rs write next to a dump: layouts and source dtypes.

`<dir>/tracer_manifest.jsonl` holds one JSON object per dumped stage ({"stage", "file", "dtype",
"shape"[, "layout"]}; a later line for the same file wins). It is optional: a directory of .npy files
imports without it. When present it says two things the .npy files cannot:
- the axis order of an array dumped in the port's own layout (`layout`, letters B T S H D C), which
  becomes the name-map layout of that file unless the user's map names the file itself;
- `dtype: "bf16"`: NumPy has no bfloat16, so the helpers widen bf16 exactly to float32; the trace
  is then marked bf16 so the comparator models the port's real precision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tracer.errors import TracerError

if TYPE_CHECKING:
    from tracer.foreign import NameMap

MANIFEST = "tracer_manifest.jsonl"


def read_dump_manifest(dump_dir: Path) -> dict[str, dict]:
    """File stem -> its latest manifest entry; {} without a manifest."""
    path = dump_dir / MANIFEST
    if not dump_dir.is_dir() or not path.is_file():
        return {}
    entries: dict[str, dict] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TracerError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise TracerError(f"{path}:{lineno}: expected {{\"stage\": ..., \"file\": ..., \"dtype\": ...}}")
        entries[Path(entry["file"]).stem] = entry
    return entries


def dump_notes(src: Path, nmap: NameMap) -> tuple[NameMap, str | None]:
    """`nmap` with the manifest's layouts added, and "bf16" when any dumped stage was bfloat16."""
    from tracer.foreign import Target

    entries = read_dump_manifest(src)
    for name, entry in entries.items():
        layout = entry.get("layout")
        if isinstance(layout, str) and layout and name not in nmap.exact:
            nmap.exact[name] = Target(str(entry.get("stage") or name), layout.upper())
    return nmap, "bf16" if any(e.get("dtype") == "bf16" for e in entries.values()) else None
