"""The training package's one console line (rank 0 only), shared by the module and what it prepares."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_only


@rank_zero_only
def say(message: str) -> None:
    """One line on the console, from rank 0 only."""
    print(f"debias: {message}", flush=True)
