"""Hub ids without a network: fail in a second or two with one line, never after a minute of retries.

Kept free of torch and transformers so the CLI can check a `--model` hub id before the
seconds-long imports of a model load.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from tracer.errors import TracerError

HUB_PROBE_TIMEOUT_S = 2.0
LOCAL_DIR_HINT = ("where there is network, save it with save_pretrained(DIR) (model and tokenizer) and pass "
                  "--model DIR")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE) asks for no network at all."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def hub_cached(repo_id: str) -> bool:
    """Config and weights of `repo_id` are in the local Hugging Face cache (no network needed)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo_id, filename), str)
        except Exception:  # an id the hub would reject is simply not cached
            return False

    return cached("config.json") and (cached("model.safetensors") or cached("pytorch_model.bin"))


def check_hub_reachable(source: str) -> None:
    """Fail in about HUB_PROBE_TIMEOUT_S with one line when the hub (or the proxy to it) cannot be
    reached, instead of a minute of retries: a TCP connect in a thread, so a hanging DNS lookup
    is bounded too."""
    import threading
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if hub_offline():
        raise TracerError(f"cannot load model {source!r}: it is not a local directory nor in the Hugging Face "
                          f"cache, and HF_HUB_OFFLINE is set; {LOCAL_DIR_HINT}")
    url = urlparse(constants.ENDPOINT)
    proxy = None if urllib.request.proxy_bypass(url.hostname or "") else urllib.request.getproxies().get(url.scheme)
    target = urlparse(proxy) if proxy else url
    address = (target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    failure: list[str] = ["no answer within %g s" % HUB_PROBE_TIMEOUT_S]

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=HUB_PROBE_TIMEOUT_S).close()
            failure.clear()
        except OSError as exc:
            failure[0] = exc.strerror or str(exc) or type(exc).__name__

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    if failure:
        via = f" through proxy {proxy}" if proxy else ""
        raise TracerError(f"cannot load model {source!r}: the hub {constants.ENDPOINT}{via} is unreachable "
                          f"({failure[0].lower()}); {LOCAL_DIR_HINT}")


def preflight(source: str) -> None:
    """For a hub id that is not cached: fail now if the hub cannot be reached (tiny, random: and
    directories pass; the model loader checks them itself)."""
    if source == "tiny" or source.startswith("random:") or source.startswith((".", "/", "~")) \
            or Path(source).expanduser().exists():
        return
    if not hub_cached(source):
        check_hub_reachable(source)
