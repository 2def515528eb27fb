"""The sentences the audit uses for what is wrong and how to fix it.

Kept in one place so that `compare`'s diagnosis can say the same thing when a matmul stage fails
because of the same mistake (an untransposed Conv1D weight): one vocabulary for one bug.
"""

from __future__ import annotations

CONV1D_LAYOUT = "HF Conv1D stores W as [in, out]"
FIX_TRANSPOSE = f"transpose: {CONV1D_LAYOUT} and computes x @ W; nn.Linear stores [out, in]"
FIX_NO_TRANSPOSE = f"do not transpose: {CONV1D_LAYOUT} and computes x @ W"
FIX_QKV_ORDER = "split c_attn along its output axis in the order [q | k | v] (thirds of 3·n_embd)"
FIX_TIE = "tie lm_head to the token embedding: GPT-2 computes logits with wte"
PARTS = ("q", "k", "v")


def orientation_problem(tensor: str, found_transposed: bool, conv1d: bool) -> tuple[str, str]:
    """(problem, fix) for a tensor held in the other orientation than expected."""
    if found_transposed:
        held = "[out, in] (transposed)" if conv1d else "transposed"
        return f"{tensor} holds it {held}, where [in, out] is expected", FIX_NO_TRANSPOSE if conv1d else \
            "do not transpose it"
    held = "[in, out] (HF Conv1D layout, not transposed)" if conv1d else "untransposed"
    return f"{tensor} holds it {held}, where [out, in] is expected", FIX_TRANSPOSE if conv1d else "transpose it"


def inconsistent_orientation(found_transposed: bool, others: int) -> tuple[str, str]:
    """(problem, fix) for a Conv1D weight stored the other way round from the rest of the checkpoint."""
    layout, other_layout = ("[out, in]", "[in, out]") if found_transposed else ("[in, out]", "[out, in]")
    return (f"stored {layout}, unlike the other {others} Conv1D weights of this checkpoint ({other_layout})",
            f"transpose: {CONV1D_LAYOUT}; this checkpoint stores the others as {other_layout}")


def parts_problem(held: dict[str, str]) -> tuple[str, str]:
    """(problem, fix) for q/k/v parts in the wrong tensors; `held` maps tensor -> the part it holds."""
    text = ", ".join(f"{t} holds {p}" for t, p in held.items())
    return f"c_attn split in the wrong order: {text}", FIX_QKV_ORDER
