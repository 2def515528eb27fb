"""Backend registry: turn `--backend SPEC` into a backend instance (SPEC §5).

SPEC is a built-in name (`numpy`, `cupy`, `triton`, `llamacpp`, `max`), a name registered by another package
under the entry-point group `tracer.backends`, a `package.module:Class` path,
`max:package.module:Class` (a Modular MAX module run by the `max` backend), or
`exec:CMD` (an external program that writes the whole trace). Built-ins are registered by
dotted path and imported only when used, so a machine without cupy or triton still lists
and runs the others, and says why those cannot run.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from backends.exec_backend import EXEC_PREFIX, ExecBackend
from backends.inject import validate_injection
from backends.protocol import Backend
from tracer.errors import TracerError

BUILTINS = {
    "numpy": "backends.numpy_backend:NumpyBackend",
    "cupy": "backends.cupy_backend:CupyBackend",
    "triton": "backends.triton_backend:TritonBackend",
    "llamacpp": "backends.llamacpp_backend:LlamaCppBackend",
    "max": "backends.max_backend:MaxBackend",
}
# Built-ins whose engine comes with an optional extra (pip install 'gpt2-tracer[EXTRA]').
EXTRAS = {"llamacpp": "llamacpp", "max": "max"}
MAX_PREFIX = "max:"  # max:package.module:Class, a MAX module for the max backend
ENTRY_POINT_GROUP = "tracer.backends"


@dataclass(frozen=True)
class BackendInfo:
    name: str
    origin: str
    available: bool
    why: str


def _entry_points() -> dict[str, md.EntryPoint]:
    return {ep.name: ep for ep in md.entry_points(group=ENTRY_POINT_GROUP)}


def _checked(obj: object, what: str) -> type[Backend]:
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise TracerError(f"{what} is not a backend: expected a subclass of backends.protocol.Backend")
    return obj


def load_class(path: str) -> type[Backend]:
    """Import `package.module:Class` and check that it is a Backend."""
    return _checked(import_attr(path), path)


def import_attr(path: str) -> object:
    """Import `package.module:Name` (installed, or a package under the current directory)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise TracerError(f"path {path!r} must look like package.module:Class")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # a package in the current directory, as `python -m` finds it (installed ones win)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = f" (neither installed nor under the current directory {os.getcwd()})" \
            if isinstance(exc, ModuleNotFoundError) and exc.name == module_name.split(".")[0] else ""
        raise TracerError(f"cannot import {module_name}: {exc}{where}") from None
    except Exception as exc:  # a plugin failing to import is the user's input, not our bug
        raise TracerError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        raise TracerError(f"module {module_name} has no {attr!r}")
    return getattr(module, attr)


def _load_entry_point(ep: md.EntryPoint) -> type[Backend]:
    try:
        obj = ep.load()
    except Exception as exc:
        raise TracerError(f"cannot load entry point {ep.name} ({ep.value}): {type(exc).__name__}: {exc}") from None
    return _checked(obj, f"entry point {ep.name} ({ep.value})")


def known_names() -> list[str]:
    return list(BUILTINS) + [n for n in _entry_points() if n not in BUILTINS]


def backend_class(spec: str) -> type[Backend] | type[ExecBackend]:
    """The class a spec names (without instantiating it)."""
    if spec.startswith(EXEC_PREFIX):
        return ExecBackend
    if spec in BUILTINS:
        return load_class(BUILTINS[spec])
    if spec.startswith(MAX_PREFIX):
        return load_class(BUILTINS["max"]).for_module(spec[len(MAX_PREFIX):])  # type: ignore[attr-defined]
    entry_points = _entry_points()
    if spec in entry_points:
        return _load_entry_point(entry_points[spec])
    if ":" in spec:
        return load_class(spec)
    raise TracerError(f"unknown backend {spec!r} (known: {', '.join(known_names())}; "
                      "or package.module:Class, or exec:\"CMD {golden} {out}\")")


def resolve_backend(spec: str, precision: str = "fp32", inject: str | None = None,
                    timeout: float | None = None) -> Backend | ExecBackend:
    """A ready-to-prepare backend instance for `spec`, or TracerError saying why not. `timeout`
    bounds an exec: program (None: its generous default)."""
    spec = spec.strip()
    if spec.startswith(EXEC_PREFIX):
        if inject or precision != "fp32":
            raise TracerError("--inject and --precision do not apply to exec: backends (the program decides)")
        return ExecBackend(spec[len(EXEC_PREFIX):], timeout)
    cls = backend_class(spec)
    available, why = _availability(cls)
    if not available:
        raise TracerError(f"backend {spec} is not available here: {why}")
    validate_injection(inject, cls)
    try:
        return cls(precision=precision, inject=inject)
    except TracerError:
        raise
    except Exception as exc:
        raise TracerError(f"backend {spec} could not be created: {type(exc).__name__}: {exc}") from None


def _availability(cls: type[Backend]) -> tuple[bool, str]:
    try:
        return cls.availability()
    except Exception as exc:
        return False, f"availability check failed: {type(exc).__name__}: {exc}"


def _info(name: str, origin: str, load: Callable[[], type[Backend]]) -> BackendInfo:
    try:
        cls = load()
    except TracerError as exc:
        return BackendInfo(name, origin, False, str(exc))
    available, why = _availability(cls)
    return BackendInfo(name, origin, available, why)


def list_backends() -> list[BackendInfo]:
    """Every built-in and installed backend, and whether it can run on this machine."""
    infos = [_info(name, f"built-in, extra [{EXTRAS[name]}]" if name in EXTRAS else "built-in",
                   lambda path=path: load_class(path)) for name, path in BUILTINS.items()]
    for name, ep in _entry_points().items():
        if name not in BUILTINS:
            dist = getattr(ep, "dist", None)
            origin = f"entry point ({dist.name})" if dist is not None else "entry point"
            infos.append(_info(name, origin, lambda ep=ep: _load_entry_point(ep)))
    return infos


def backends_command(console: Console) -> None:
    """`tracer backends`: a table of backends and whether each can run here."""
    table = Table(title="backends (--backend NAME, or package.module:Class, or exec:\"CMD {golden} {out}\")")
    table.add_column("name", style="bold")
    table.add_column("origin")
    table.add_column("available here")
    for info in list_backends():
        table.add_row(escape(info.name), escape(info.origin), "yes" if info.available else escape(f"no ({info.why})"))
    console.print(table)
