"""The reference MAX port with one porting bug: what `--backend max:tests.ports.max_buggy:LnEpsBug` runs.

The bug is in the module's code, not in the weights, so it reaches the compiled graph the way a
user's mistake would: every block's ln_2 normalizes with eps 1e-2 instead of the config's 1e-5.
"""

from __future__ import annotations

from typing import Any

from backends.max_gpt2 import MaxGPT2LMHeadModel


class LnEpsBug(MaxGPT2LMHeadModel):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        for block in self.transformer.h:
            block.ln_2.eps = 1e-2
