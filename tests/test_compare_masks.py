"""`debias compare` builds its shared masks with the builder `debias fit` uses: the same method, k and seed give the
same entries either way."""

import pytest
import torch
from conftest import make_data, make_module

from debias.commands.compare.grid import Cell, cell_name, grid_masks, plan
from debias.edits.mask import InstabilityMask


@pytest.mark.parametrize(("method", "seed"), [("instability", None), ("instability_gxw", None), ("bias_gradient", None),
                                              ("random", 3)])
def test_a_grid_mask_is_the_mask_fit_builds(method, seed, tmp_path):
    from debias.edits import registry

    base, fixed = registry.grid_entry(method)
    data = make_data()
    fitted = make_module(method=base.name, k=20, seed=seed or 0, **fixed)
    fitted.prepare(data)
    grid = make_module(method=base.name, k=20, seed=seed or 0, **fixed)
    paths = grid_masks(grid, data, [Cell(cell_name(method, 20, seed), method, 20, seed)], tmp_path)
    mask = InstabilityMask.load(paths[cell_name(method, 20, seed)])
    assert mask.k == 20 and torch.equal(mask.indices, fitted.mask.indices)
    assert mask.strategy == fitted.mask.strategy and mask.extra["mask_from"] == base.mask_from


def test_a_ranked_method_gets_a_cell_per_rank():
    cells = plan(["lora", "dense"], [20], 20, [0], [2, 4], objectives=False)
    assert [c.name for c in cells] == ["lora-r2", "lora-r4", "dense"]
