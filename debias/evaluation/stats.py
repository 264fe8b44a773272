"""Bootstrap percentile intervals: one resampling routine for every metric that reports a 95% CI."""

from __future__ import annotations

import torch


def bootstrap(stat, n: int, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
              groups: torch.Tensor | None = None):
    """Point estimate and percentile interval of each column of `stat`, resampling the n items with replacement
    (within each group when `groups` [n] is given, so that every resample keeps the groups' sizes).

    `stat(idx)`: item indices [b, n] (long) -> statistics [b, k] (float64). Returns ([k] point values,
    [k] (lo, hi) tuples).
    """
    if n_boot < 1 or not 0 < alpha < 1 or n < 1:
        raise ValueError(f"need n >= 1, n_boot >= 1 and 0 < alpha < 1, got n={n}, n_boot={n_boot}, alpha={alpha}")
    gen = torch.Generator().manual_seed(seed)
    if groups is None:
        idx = torch.randint(n, (n_boot, n), generator=gen)
    else:
        members = [torch.nonzero(groups.cpu() == g).flatten() for g in groups.cpu().unique()]
        idx = torch.stack([torch.cat([m[torch.randint(len(m), (len(m),), generator=gen)] for m in members])
                           for _ in range(n_boot)])
    point = stat(torch.arange(n)[None])[0].tolist()
    q = torch.quantile(stat(idx), torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64), dim=0)
    return point, list(zip(q[0].tolist(), q[1].tolist(), strict=True))


def grouped_interval(values: torch.Tensor, groups: torch.Tensor, stat, n_boot: int = 1000, alpha: float = 0.05,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile interval of a scalar `stat(values, groups)` (e.g. a gap between groups), resampled within groups."""
    values, groups = values.detach().double().cpu(), groups.cpu()

    def batched(idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.as_tensor(stat(values[i], groups[i]), dtype=torch.float64) for i in idx])[:, None]

    _, ((lo, hi),) = bootstrap(batched, len(values), n_boot, seed, alpha, groups)
    return lo, hi
