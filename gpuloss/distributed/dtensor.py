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

Likewise :func:`gpuloss.linear_cross_entropy` of a projection weight sharded
along the classes (``ColwiseParallel``'s ``Shard(0)`` of the ``(C, H)``
weight, the bias ``Shard(0)`` too) and replicated hidden states goes to
:func:`gpuloss.distributed.vocab_parallel_linear_cross_entropy`: no rank
gathers the weight or forms more than its own classes' logits.

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

__all__ = ["class_sharded", "cross_entropy", "weight_class_sharded", "linear_cross_entropy"]


def _is_dtensor(a: Any) -> bool:
    return type(a).__name__ == "DTensor" and hasattr(a, "device_mesh")


def _replicated_or_plain(a: Any) -> bool:
    return not _is_dtensor(a) or all(q.is_replicate() for q in a.placements)


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
    return _replicated_or_plain(target)


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


def weight_class_sharded(input: Any, linear_weight: Any, target: Any, linear_bias: Any, weight: Any) -> bool:
    """Whether :func:`linear_cross_entropy` takes this call: a ``(C, H)``
    DTensor weight on a 1-D mesh sharded along the classes (dim 0), a bias
    (if any) sharded alike on the same mesh, replicated (or plain) hidden
    states and class-index targets, no class weights."""
    if not _is_dtensor(linear_weight) or weight is not None or linear_weight.ndim != 2:
        return False
    mesh = linear_weight.device_mesh
    if mesh.ndim != 1 or len(linear_weight.placements) != 1 or not linear_weight.placements[0].is_shard(0):
        return False
    if linear_bias is not None and not (_is_dtensor(linear_bias) and linear_bias.device_mesh == mesh
                                        and tuple(linear_bias.placements) == tuple(linear_weight.placements)):
        return False
    if target is None or target.is_floating_point() or input.ndim not in (1, 2):
        return False
    return _replicated_or_plain(input) and _replicated_or_plain(target)


def linear_cross_entropy(input, linear_weight, target, linear_bias, ignore_index: int, reduction: str,
                         label_smoothing: float, z_loss: float, softcap: Optional[float], chunk_size: Optional[int],
                         loss_dtype=None):
    """``gpuloss.linear_cross_entropy`` with a class-sharded weight
    (:func:`weight_class_sharded`): the loss a replicated DTensor; grad_input
    the whole gradient on every rank, grad of the weight (and bias) sharded as
    they are."""
    from torch.distributed.tensor import DTensor, Replicate

    from . import vocab_parallel_linear_cross_entropy
    mesh = linear_weight.device_mesh
    h = input.to_local() if _is_dtensor(input) else input
    t = target.to_local() if _is_dtensor(target) else target
    b = None if linear_bias is None else linear_bias.to_local()
    C = linear_weight.shape[0]
    validate = t.device.type == "cpu" or config.value_checks() == "always"
    loss = vocab_parallel_linear_cross_entropy(h, linear_weight.to_local(), t, mesh.get_group(), b,
                                               vocab_sizes=_shard_sizes(C, mesh.size()), vocab_size=C,
                                               ignore_index=ignore_index, reduction=reduction,
                                               label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                               chunk_size=chunk_size, validate=validate)
    if loss_dtype is not None:
        loss = loss.to(loss_dtype)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)
