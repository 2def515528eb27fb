"""The golden's parameters, one at a time: names, shapes and ties without reading values.

`StageFile.weights()` reads every weight at once, which for gpt2-xl is 6 GB; the audit reads
one parameter, checks it, and lets it go. Tied parameters (lm_head = wte) are one HDF5 object
under two names, which is how the audit knows a port may serve both from one tensor.
"""

from __future__ import annotations

import re

import h5py
import numpy as np

from tracer.errors import TracerError
from tracer.store import StageFile, content_hash

BLOCK_PARAM = re.compile(r"transformer\.h\.(\d+)\.(.+)")
BLOCK_ORDER = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
               "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias")
TOP_ORDER = ("transformer.wte.weight", "transformer.wpe.weight")
FINAL_ORDER = ("transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight")
# Conv1D weights: HF stores them [in, out] and computes x @ W; nn.Linear ports store [out, in].
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def forward_key(name: str) -> tuple:
    """Sort key: embeddings, then each block in forward order, then the rest (ln_f, lm_head)."""
    if name in TOP_ORDER:
        return (0, TOP_ORDER.index(name), 0, name)
    m = BLOCK_PARAM.fullmatch(name)
    if m:
        local = m.group(2)
        return (1, int(m.group(1)), BLOCK_ORDER.index(local) if local in BLOCK_ORDER else len(BLOCK_ORDER), name)
    return (2, FINAL_ORDER.index(name) if name in FINAL_ORDER else len(FINAL_ORDER), 0, name)


def layer_of(name: str) -> int | None:
    m = BLOCK_PARAM.fullmatch(name)
    return int(m.group(1)) if m else None


def layer_template(text: str, layer: int) -> str | None:
    """`text` with its number equal to `layer` replaced by {i} (`h.1.ln_1` -> `h.{i}.ln_1`: of several,
    the one between separators); None when there is none or no single one."""
    hits = [m for m in re.finditer(r"\d+", text) if m.group() == str(layer)]
    for before in ("./-:[", "./-:[_"):
        if len(hits) > 1:
            narrowed = [m for m in hits if (m.start() == 0 or text[m.start() - 1] in before)
                        and (m.end() == len(text) or text[m.end()] in "./-:]")]
            hits = narrowed if narrowed else hits
    if len(hits) != 1:
        return None
    return text[:hits[0].start()] + "{i}" + text[hits[0].end():]


def is_conv1d(name: str) -> bool:
    return name.endswith(CONV1D_SUFFIXES)


class GoldenWeights:
    """Read access to `/weights` of an open golden, one verified parameter at a time."""

    def __init__(self, golden: StageFile):
        if not golden.has_weights:
            raise TracerError(f"{golden.path} has no weights (recorded with --no-weights): nothing to audit against")
        self.path = golden.path
        self.config = golden.model_config
        self._group = golden.h5["weights"]
        self.names = sorted(self._group.keys(), key=forward_key)
        self.shapes = {n: tuple(int(d) for d in self._group[n].shape) for n in self.names}
        self.dtypes = {n: str(self._group[n].dtype) for n in self.names}
        addr = {n: h5py.h5o.get_info(self._group[n].id).addr for n in self.names}
        first: dict[int, str] = {}
        self.tied_to: dict[str, str] = {}  # later name -> the first name of the same HDF5 object
        for n in self.names:
            if addr[n] in first:
                self.tied_to[n] = first[addr[n]]
            else:
                first[addr[n]] = n

    @property
    def n_layer(self) -> int:
        return int(self.config.get("n_layer", 0))

    def read(self, name: str) -> np.ndarray:
        """The parameter, checksum verified: memory-mapped when stored contiguous and unfiltered
        (as the recorder writes weights), so gpt2-xl's 6 GB are not copied through HDF5."""
        ds = self._group[name]
        offset = ds.id.get_offset() if ds.chunks is None and ds.dtype.isnative else None
        if offset is not None and ds.size:
            data = np.memmap(self.path, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape)
        else:
            data = ds[()]
        if content_hash(data) != ds.attrs.get("xxh3"):
            raise TracerError(f"{self.path}: checksum mismatch in weight {name!r}: the file is corrupt")
        return data

    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * np.dtype(self.dtypes[n]).itemsize for n, s in self.shapes.items()
                   if n not in self.tied_to)
