"""Bootstrap percentile intervals: one resampling routine for every metric that reports a 95% CI."""

from __future__ import annotations

import torch


def _bootstrap(values: torch.Tensor, groups: torch.Tensor, stat, n_boot: int, alpha: float, seed: int):
    """Percentile interval of `stat(values, groups)`, resampling with replacement within each group."""
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_boot >= 1, got alpha={alpha}, n_boot={n_boot}")
    gen = torch.Generator().manual_seed(seed)
    values, groups = values.detach().double().cpu(), groups.cpu()
    members = [torch.nonzero(groups == g).flatten() for g in groups.unique()]
    samples: list[torch.Tensor] = []
    for _ in range(n_boot):
        idx = torch.cat([m[torch.randint(len(m), (len(m),), generator=gen)] for m in members])
        samples.append(stat(values[idx], groups[idx]))
    stats = torch.stack(samples)
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=stats.dtype)
    lo, hi = torch.quantile(stats, q).tolist()
    return lo, hi


def bootstrap(stat, n: int, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05):
    """Point estimate and percentile interval of each column of `stat`, resampling the n items.

    `stat(idx)`: item indices [b, n] (long) -> statistics [b, k] (float64). Returns ([k] point values,
    [k] (lo, hi) tuples).
    """
    if n_boot < 1 or not 0 < alpha < 1 or n < 1:
        raise ValueError(f"need n >= 1, n_boot >= 1 and 0 < alpha < 1, got n={n}, n_boot={n_boot}, alpha={alpha}")
    point = stat(torch.arange(n)[None])[0].tolist()
    idx = torch.randint(n, (n_boot, n), generator=torch.Generator().manual_seed(seed))
    q = torch.quantile(stat(idx), torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64), dim=0)
    return point, list(zip(q[0].tolist(), q[1].tolist(), strict=False))
