"""Cross-entropy of DTensor logits sharded along the class dimension.

Tensor parallelism leaves a language model's logits as a DTensor sharded over
its vocabulary (``ColwiseParallel(use_local_output=False)`` on the output
projection: placements ``(Shard(-1),)``), which torch's own
``F.cross_entropy`` takes inside its ``loss_parallel()`` context.
:func:`gpuloss.cross_entropy` takes such logits directly: they go to
:func:`gpuloss.distributed.vocab_parallel_cross_entropy` on each rank's shard
(``to_local()``), over the mesh's process group, with the shard sizes of
DTensor's layout, so no rank ever holds a whole row; the loss comes back as a
replicated DTensor and the gradient as the logits' own sharding.

What this route covers: a 1-D device mesh, the class dimension last (2-D
``(N, C)`` logits, or ``(C,)``) and sharded, class-index targets (a
replicated DTensor or a plain tensor, the same on every rank), no class
weights.  Anything else on a DTensor goes through the operators' replicate
rule (:func:`gpuloss.torch_ops.dtensor_sharding`): the same values, the
logits gathered first.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional

from .. import config

__all__ = ["class_sharded", "cross_entropy"]


def _is_dtensor(a: Any) -> bool:
    return type(a).__name__ == "DTensor" and hasattr(a, "device_mesh")


def class_sharded(input: Any, target: Any, weight: Any) -> bool:
    """Whether :func:`cross_entropy` takes this call: DTensor logits on a 1-D
    mesh, sharded along their last dimension, which is the class dimension;
    integer targets; no class weights."""
    if not _is_dtensor(input) or weight is not None or input.ndim not in (1, 2):
        return False
    if input.device_mesh.ndim != 1 or len(input.placements) != 1:
        return False
    p = input.placements[0]
    if not (p.is_shard() and p.dim % input.ndim == input.ndim - 1):
        return False
    if target is None or target.is_floating_point():
        return False
    return not _is_dtensor(target) or all(q.is_replicate() for q in target.placements)


def _shard_sizes(n: int, world: int) -> List[int]:
    """The sizes of DTensor's even ``Shard`` of ``n`` over ``world`` ranks
    (``torch.chunk``'s: ``ceil(n / world)`` each, the last ones short or empty)."""
    full = math.ceil(n / world) if world else 0
    return [max(0, min(full, n - r * full)) for r in range(world)]


def cross_entropy(input, target, ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                  softcap: Optional[float], loss_dtype=None):
    """``gpuloss.cross_entropy`` of class-sharded DTensor logits
    (:func:`class_sharded`): the loss a replicated DTensor on the logits' mesh."""
    from torch.distributed.tensor import DTensor, Replicate

    from . import vocab_parallel_cross_entropy
    mesh = input.device_mesh
    local = input.to_local()
    t = target.to_local() if _is_dtensor(target) else target
    C = input.shape[-1]
    # targets checked wherever gpuloss checks values (always on the CPU): one small all-gather
    validate = t.device.type == "cpu" or config.value_checks() == "always"
    loss = vocab_parallel_cross_entropy(local, t, mesh.get_group(), vocab_sizes=_shard_sizes(C, mesh.size()),
                                        vocab_size=C, ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                        validate=validate)
    if loss_dtype is not None:
        loss = loss.to(loss_dtype)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)
