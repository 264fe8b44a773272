"""`mask`: the instability mask at the SAE's layer (`debias.edits.mask.compute_mask`: the forward stops at the
SAE's hook, so no layer above it and no logits run) against the same mask ranked by a gradient taken through a full
forward of the whole model, as a plain training loop would take it."""

from __future__ import annotations

import torch
from torch.utils.benchmark import Measurement

from benchmarks.common import PATHS, Bench


def full_forward_gradient(module, batches: list[dict]) -> torch.Tensor:
    """d(Σ feature activation over real tokens)/d W_out of the SAE's layer, through a full forward (logits
    included); float32, W_out's shape."""
    from debias.models import hooks
    from debias.sae.ops import summed_feature_acts

    weight = module.net.get_parameter(module.parameter)
    grad = torch.zeros(weight.shape)
    weight.requires_grad_(True)
    try:
        for batch in batches:
            weight.grad = None
            with hooks.capture(module.net, module.site) as cap:
                module.net(**batch, use_cache=False)
            summed_feature_acts(module.sae, cap.value, module.real(batch), module.features).sum().backward()
            grad += weight.grad.float()
    finally:
        weight.grad = None
        weight.requires_grad_(False)
    return grad


def measure(bench: Bench) -> list[Measurement]:
    """Both ways of building the mask, on a fresh (unedited) copy of the config's model and its train bias prompts."""
    from debias.edits.mask import compute_mask

    module, data = bench.fresh()
    module.ensure_sae()
    batches = [module.tokenize(texts) for texts in data.mask_batches()]
    numel = module.net.get_parameter(module.parameter).numel()
    k = min(module.k or max(1, numel // 100), numel)  # the config's k (capped at one matrix), else 1 %
    common = dict(bos_token_id=module.tokenizer.bos_token_id, progress=False)

    def at_hook():
        compute_mask(module.net, module.sae, module.site, module.parameter, batches, module.features, k, **common)

    def full():
        compute_mask(module.net, module.sae, module.site, module.parameter, batches, module.features, k,
                     grad=full_forward_gradient(module, batches), **common)

    label = f"mask ({module.site.hook_name}, k={k})"
    return [bench.time(at_hook, label, PATHS[0]), bench.time(full, label, PATHS[1])]
