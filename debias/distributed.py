"""Several processes (DDP): every rank trains the same mask.

Each rank computes the mask in `DebiasModule.setup` from the same prompts; on CPU that is deterministic, but GPU
kernels may sum gradients in another order and break a tie differently, so the ranks compare digests and, if any
differs, all adopt rank 0's mask. The delta's gradients are then all-reduced by DDP like any parameter's, and only
rank 0 writes the export (`ReportAndExport`).
"""

from __future__ import annotations

import hashlib
import logging

import torch

from debias.mask import InstabilityMask

log = logging.getLogger(__name__)


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def mask_digest(mask: InstabilityMask) -> str:
    """sha256 of the mask's parameter, shape and sorted flat indices."""
    h = hashlib.sha256(f"{mask.parameter}:{list(mask.shape)}:".encode())
    h.update(mask.indices.to(torch.int64).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def same_mask_on_all_ranks(mask: InstabilityMask) -> InstabilityMask:
    """`mask` outside a process group; inside one, rank 0's mask on every rank (logged when ranks disagreed)."""
    if not distributed():
        return mask
    dist = torch.distributed
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, mask_digest(mask))
    if len(set(digests)) == 1:
        log.info("mask identical on all %d ranks (sha256 %s)", len(digests), digests[0][:12])
        return mask
    log.warning("the ranks computed different masks (%d distinct digests); all ranks use rank 0's",
                len(set(digests)))
    box = [mask if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    received = box[0]
    return InstabilityMask(**{**received.__dict__, "indices": received.indices.cpu()})
