"""Hugging Face transformers: gpuloss's cross-entropy as a causal LM's loss
(and the other heads' losses, :data:`_HEAD_LOSSES`).

One line::

    from gpuloss.integrations.transformers import apply_gpuloss
    model = apply_gpuloss(AutoModelForCausalLM.from_pretrained(name))

What changes, on this model instance only
-----------------------------------------
* ``model.loss_function`` becomes :func:`ForCausalLMLoss` (transformers'
  signature and semantics; the loss of bf16/fp16 logits in fp32 without an
  fp32 copy of the logits, fp64 logits stay fp64).
* With ``fused_linear=True`` (the default), a training forward pass (labels
  given, ``model.training`` and gradients enabled) takes the loss from the
  last hidden states and ``lm_head`` through :func:`gpuloss.linear_cross_entropy`,
  one chunk of tokens at a time: the ``N x V`` logits never exist and
  ``outputs.logits`` is ``None``.  Any other call (no labels, ``model.eval()``,
  ``torch.no_grad()``, generation) runs the model's own forward unchanged.

No class, no ``LOSS_MAPPING`` entry and no other global state is touched, so
``Trainer`` counts ``num_items_in_batch`` and decides whether the model takes
loss kwargs exactly as it does for the unpatched model.

How the fused path stays generic
--------------------------------
The model's own forward still runs: the base model, the slicing by
``logits_to_keep``, any auxiliary loss (MoE routers), the output class.  Only
two things are intercepted, both on the instance:

1. ``lm_head``'s forward records its input (the hidden states the logits
   would be made from) and returns an empty ``(..., 0)`` tensor instead of
   the logits, so whatever the model does to its logits afterwards (Gemma 2's
   soft-capping) costs nothing (a head with hooks, or with its weight
   offloaded to the meta device, runs as itself instead: :func:`_head_runs_itself`);
2. ``model.loss_function``, which the model calls with its labels and loss
   kwargs (``num_items_in_batch``, ``ignore_index``, ``shift_labels``),
   computes the fused loss from the recorded hidden states, ``lm_head.weight``
   (tied or not) and ``lm_head.bias``.

What the forward does to the logits between ``lm_head`` and the loss is read
from its source when the patch is applied, not assumed from the config: a
soft-cap (Gemma 2's ``final_logit_softcapping``, RecurrentGemma's
``logits_soft_cap``) becomes gpuloss's ``softcap``, a scale by a number
(Cohere's ``logit_scale``, Granite's ``logits_scaling``, FalconH1's
``lm_head_multiplier``) scales the hidden states and bias.  Any other
transformation (a slice of the vocabulary, a bias added, masked tokens), or a
forward whose source cannot be read, is refused with ``fused_linear=True``
rather than trained on a different loss.

Importing this module imports torch and transformers; ``import gpuloss`` does not.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import textwrap
import threading
import types
from typing import Optional

import torch
import transformers
from torch.nn.modules import module as _torch_module
from transformers.loss import loss_utils as _hf_loss

import gpuloss
from .. import _layout, _validate, dispatch

__all__ = ["apply_gpuloss", "ForCausalLMLoss", "ForMaskedLMLoss", "ForSequenceClassificationLoss",
           "ForTokenClassification", "ForQuestionAnsweringLoss", "AutoGpulossForCausalLM"]


# ---------------------------------------------------------------------------
# the two calls into gpuloss
# ---------------------------------------------------------------------------

def _token_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int, reduction: str,
                         z_loss: float, softcap: Optional[float], backend: Optional[str]) -> torch.Tensor:
    """Cross-entropy of ``(N, V)`` logits read in their own dtype, the loss in
    fp32 (fp64 for fp64 logits), as transformers computes it on
    ``logits.float()``: ``loss_dtype`` keeps the fused pass's fp32 sum
    instead of rounding it to the logits' dtype (torch's rule)."""
    loss_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return gpuloss.cross_entropy(logits, target, ignore_index=int(ignore_index), reduction=reduction,
                                 z_loss=float(z_loss), softcap=softcap, loss_dtype=loss_dtype, backend=backend)


def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                          bias: Optional[torch.Tensor], *, ignore_index: int, reduction: str, z_loss: float,
                          softcap: Optional[float], chunk_size: Optional[int],
                          backend: Optional[str]) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, target)`` without the logits:
    the one call to :func:`gpuloss.linear_cross_entropy`, the loss in fp32
    (fp64 for fp64 operands) as transformers returns it."""
    loss_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return gpuloss.linear_cross_entropy(hidden, weight, target, linear_bias=bias, ignore_index=int(ignore_index),
                                        reduction=reduction, z_loss=z_loss, softcap=softcap,
                                        chunk_size=chunk_size, loss_dtype=loss_dtype, backend=backend)


# ---------------------------------------------------------------------------
# transformers' causal LM loss rules, written once for both paths
# ---------------------------------------------------------------------------

def _next_token_targets(labels: torch.Tensor, ignore_index: int,
                        shift_labels: Optional[torch.Tensor]) -> torch.Tensor:
    """The target of each position: ``shift_labels`` as given, else position
    ``t`` predicts ``labels[t + 1]`` and the last position has no target
    (``ignore_index``).  Shifting the labels, not the logits, keeps the logits
    (or hidden states) a view of the model's output."""
    if shift_labels is not None:
        return shift_labels
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _flat_targets(targets: torch.Tensor, n_rows: int, what: str, device: torch.device) -> torch.Tensor:
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"labels must hold integer token ids, got {targets.dtype}")
    t = targets.reshape(-1)
    if t.shape[0] != n_rows:
        raise ValueError(f"{t.shape[0]} label positions (labels or shift_labels of shape {tuple(targets.shape)}) "
                         f"do not match {n_rows} positions of {what}; with logits_to_keep, pass labels for the "
                         f"kept positions only")
    return t.to(device)


def _reduction(num_items_in_batch) -> str:
    # transformers: a sum over the tokens divided by the items Trainer counted
    # over every micro-batch of the optimizer step, else the mean over this one
    return "mean" if num_items_in_batch is None else "sum"


def _per_item(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """``loss / num_items_in_batch`` on the device (an int or a tensor; no host read)."""
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _check_loss_args(logits, labels, shift_labels, num_items_in_batch, ignore_index) -> int:
    """The loss arguments a caller can get wrong, named (they failed inside torch's pad() or
    with an AttributeError); ``ignore_index`` as an int (1.5 was truncated to 1, silently)."""
    if not torch.is_tensor(logits):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    for name, v in (("labels", labels), ("shift_labels", shift_labels)):
        if v is not None and not torch.is_tensor(v):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
    if labels is None and shift_labels is None:
        raise TypeError("labels (or shift_labels) must be given: there is nothing to score")
    if num_items_in_batch is not None and not torch.is_tensor(num_items_in_batch) and (
            isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float))):
        raise TypeError(f"num_items_in_batch must be None, a number or a tensor, got "
                        f"{type(num_items_in_batch).__name__}")
    return _validate.check_ignore_index("ignore_index", ignore_index)


def ForCausalLMLoss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_items_in_batch=None,
                    ignore_index: int = -100, shift_labels: Optional[torch.Tensor] = None, *,
                    z_loss: float = 0.0, softcap: Optional[float] = None, backend: Optional[str] = None,
                    **kwargs) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on gpuloss's fused cross-entropy.

    Parameters
    ----------
    logits : (..., vocab_size) floating, any dtype; read in place (no fp32 copy)
    labels : (...) integer token ids, logits' leading shape; position ``t``
        is scored against ``labels[t + 1]`` unless ``shift_labels`` is given
    vocab_size : the logits' last dimension
    num_items_in_batch : int or 0-d tensor: the loss is the sum over tokens
        divided by it (Trainer's count over a whole gradient-accumulation
        step); None: the mean over the non-ignored tokens
    ignore_index : labels equal to it contribute nothing
    shift_labels : (...) targets already aligned with the logits
    z_loss, softcap, backend : gpuloss's options (keyword-only; see
        :func:`gpuloss.cross_entropy`).  ``softcap`` is for logits the model
        has not capped itself.
    **kwargs : ignored, as transformers does (models pass their loss kwargs)

    Returns
    -------
    0-d loss, float32 for bf16/fp16/fp32 logits, float64 for float64 logits.
    No ``.item()``: the division by ``num_items_in_batch`` runs on the device.
    """
    ignore_index = _check_loss_args(logits, labels, shift_labels, num_items_in_batch, ignore_index)
    if logits.shape[-1] != vocab_size:
        raise ValueError(f"logits' last dimension is {logits.shape[-1]}, vocab_size is {vocab_size}")
    rows = logits.reshape(-1, vocab_size)
    target = _flat_targets(_next_token_targets(labels, ignore_index, shift_labels), rows.shape[0],
                           f"logits of shape {tuple(logits.shape)}", rows.device)
    loss = _token_cross_entropy(rows, target, ignore_index=ignore_index, reduction=_reduction(num_items_in_batch),
                                z_loss=z_loss, softcap=softcap, backend=backend)
    return _per_item(loss, num_items_in_batch)


def _fused_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          labels: torch.Tensor, opts: "_Options", num_items_in_batch=None, ignore_index: int = -100,
                          shift_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`ForCausalLMLoss` of ``F.linear(hidden, weight, bias)`` transformed
    as the model's forward transforms it (``opts.transform``) without the logits."""
    # lm_head's input as the model passed it: a device-placement hook (accelerate's
    # device_map) would have moved it to the weight's device inside lm_head
    h = hidden.reshape(-1, hidden.shape[-1]).to(weight.device)
    scale, softcap = opts.transform.scale, opts.transform.softcap
    if scale != 1.0:
        # s * (h @ W.T + b) as (s * h) @ W.T + s * b: N x H and V elements, not N x V
        h = h * scale
        bias = None if bias is None else bias * scale
    target = _flat_targets(_next_token_targets(labels, ignore_index, shift_labels), h.shape[0],
                           f"hidden states of shape {tuple(hidden.shape)}", h.device)
    kw = dict(ignore_index=ignore_index, reduction=_reduction(num_items_in_batch), z_loss=opts.z_loss,
              softcap=softcap, chunk_size=opts.chunk_size, backend=opts.backend)
    # under autocast, gpuloss.linear_cross_entropy runs lm_head's matmul in
    # autocast's dtype, as lm_head would (gpuloss._autocast)
    loss = _linear_cross_entropy(h, weight, target, bias, **kw)
    return _per_item(loss, num_items_in_batch)


# ---------------------------------------------------------------------------
# transformers' other heads' losses (loss_function only: no fused path)
# ---------------------------------------------------------------------------

def _fixed_cross_entropy(source: torch.Tensor, target: torch.Tensor, num_items_in_batch=None,
                         ignore_index: int = -100, *, as_float: bool, z_loss: float, backend: Optional[str],
                         **kwargs) -> torch.Tensor:
    """transformers' ``fixed_cross_entropy``: the mean over the non-ignored
    targets, or their sum divided by ``num_items_in_batch``.  ``as_float``:
    the loss of ``source.float()`` (fp32; fp64 stays fp64), read from
    ``source`` as it is, as the heads that upcast their logits first have it;
    else in ``source``'s dtype."""
    if num_items_in_batch is not None and not torch.is_tensor(num_items_in_batch) and (
            isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float))):
        raise TypeError(f"num_items_in_batch must be None, a number or a tensor, got "
                        f"{type(num_items_in_batch).__name__}")
    ignore_index = _validate.check_ignore_index("ignore_index", ignore_index)
    loss_dtype = None
    if as_float:
        loss_dtype = torch.float64 if source.dtype == torch.float64 else torch.float32
    loss = gpuloss.cross_entropy(source, target.to(source.device), ignore_index=ignore_index,
                                 reduction=_reduction(num_items_in_batch), z_loss=float(z_loss),
                                 loss_dtype=loss_dtype, backend=backend)
    return _per_item(loss, num_items_in_batch)


def ForMaskedLMLoss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, num_items_in_batch=None,
                    ignore_index: int = -100, *, z_loss: float = 0.0, backend: Optional[str] = None,
                    **kwargs) -> torch.Tensor:
    """transformers' ``ForMaskedLMLoss`` on gpuloss's cross-entropy: every
    position scored against its own label (no shift), the loss in fp32 from
    16-bit logits without an fp32 copy of them."""
    if not torch.is_tensor(logits) or not torch.is_tensor(labels):
        raise TypeError(f"logits and labels must be torch.Tensors, got {type(logits).__name__} and "
                        f"{type(labels).__name__}")
    if logits.shape[-1] != vocab_size:
        raise ValueError(f"logits' last dimension is {logits.shape[-1]}, vocab_size is {vocab_size}")
    rows = logits.reshape(-1, vocab_size)
    target = _flat_targets(labels, rows.shape[0], f"logits of shape {tuple(logits.shape)}", rows.device)
    return _fixed_cross_entropy(rows, target, num_items_in_batch, ignore_index, as_float=True, z_loss=z_loss,
                                backend=backend)


def ForTokenClassification(logits: torch.Tensor, labels: torch.Tensor, config, *, z_loss: float = 0.0,
                           backend: Optional[str] = None, **kwargs) -> torch.Tensor:
    """transformers' ``ForTokenClassification`` loss on gpuloss's cross-entropy
    (``config.num_labels`` classes per token, the loss in fp32)."""
    rows = logits.reshape(-1, config.num_labels)
    target = _flat_targets(labels, rows.shape[0], f"logits of shape {tuple(logits.shape)}", rows.device)
    return _fixed_cross_entropy(rows, target, as_float=True, z_loss=z_loss, backend=backend, **kwargs)


def _no_z_loss(z_loss: float, what: str) -> None:
    if z_loss:
        raise ValueError(f"apply_gpuloss(z_loss={z_loss}) adds to a cross-entropy; this model's loss is {what}. "
                         f"Apply it with z_loss=0")


def ForSequenceClassificationLoss(labels: torch.Tensor, pooled_logits: torch.Tensor, config, *,
                                  z_loss: float = 0.0, backend: Optional[str] = None, **kwargs) -> torch.Tensor:
    """transformers' ``ForSequenceClassificationLoss`` (also its image, video
    and audio classification) on gpuloss: ``config.problem_type`` chosen and
    set as transformers sets it on the first call, then mean squared error
    ("regression"), cross-entropy ("single_label_classification", in the
    logits' dtype as transformers has it) or BCE with logits
    ("multi_label_classification")."""
    num_labels = config.num_labels
    if config.problem_type is None:  # transformers' rule, and its side effect on the config
        if num_labels == 1:
            config.problem_type = "regression"
        elif num_labels > 1 and (labels.dtype in (torch.long, torch.int)):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(pooled_logits.device)
    if config.problem_type == "regression":
        _no_z_loss(z_loss, "a regression's mean squared error")
        if num_labels == 1:
            return gpuloss.mse_loss(pooled_logits.squeeze(), labels.squeeze(), backend=backend)
        return gpuloss.mse_loss(pooled_logits, labels, backend=backend)
    if config.problem_type == "single_label_classification":
        return _fixed_cross_entropy(pooled_logits.view(-1, num_labels), labels.view(-1), as_float=False,
                                    z_loss=z_loss, backend=backend, **kwargs)
    if config.problem_type == "multi_label_classification":
        _no_z_loss(z_loss, "a multi-label BCE")
        return gpuloss.binary_cross_entropy_with_logits(pooled_logits, labels, backend=backend)
    raise RuntimeError(f"Invalid problem type: {config.problem_type}")


def ForQuestionAnsweringLoss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions,
                             end_positions, *, z_loss: float = 0.0, backend: Optional[str] = None,
                             **kwargs) -> Optional[torch.Tensor]:
    """transformers' ``ForQuestionAnsweringLoss`` on gpuloss's cross-entropy:
    the mean of the start and end positions' losses, positions outside the
    sequence clamped to its length and ignored."""
    if start_positions is None or end_positions is None:
        return None
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1).to(start_logits.device)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1).to(end_logits.device)
    ignored_index = start_logits.size(1)
    start_positions = start_positions.clamp(0, ignored_index)
    end_positions = end_positions.clamp(0, ignored_index)
    kw = dict(as_float=False, z_loss=z_loss, backend=backend, **kwargs)
    start_loss = _fixed_cross_entropy(start_logits, start_positions, ignore_index=ignored_index, **kw)
    end_loss = _fixed_cross_entropy(end_logits, end_positions, ignore_index=ignored_index, **kw)
    return (start_loss + end_loss) / 2


#: transformers' loss functions that apply_gpuloss replaces with loss_function alone, and by what
_HEAD_LOSSES = {_hf_loss.ForMaskedLMLoss: ForMaskedLMLoss,
                _hf_loss.ForSequenceClassificationLoss: ForSequenceClassificationLoss,
                _hf_loss.ForTokenClassification: ForTokenClassification,
                _hf_loss.ForQuestionAnsweringLoss: ForQuestionAnsweringLoss}


# ---------------------------------------------------------------------------
# the per-instance patch
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Options:
    fused_linear: bool
    z_loss: float
    chunk_size: Optional[int]
    backend: Optional[str]
    transform: "_Transform"  # what the model's forward does to lm_head's output, for the fused path


class _State:
    """What :func:`apply_gpuloss` keeps on a model (``model._gpuloss``): the
    options, the output embedding wired to this state (``head``), and the
    hand-over from it to ``loss_function`` during one fused forward call."""

    def __init__(self, options: _Options, labels_position: Optional[int], return_dict_ok: bool):
        self.options = options
        self.labels_position = labels_position
        self.return_dict_ok = return_dict_ok
        self.head: Optional[torch.nn.Module] = None
        self.capturing = False
        self.hidden: Optional[torch.Tensor] = None
        # lm_head's weight and bias as its call had them: a hook around the call may
        # swap the module's parameters afterwards (accelerate's offloading puts them back to meta)
        self.captured_params: Optional[tuple] = None
        self.loss_done = False
        self.head_called = False  # lm_head ran as itself in this fused call (see _head_runs_itself)
        self.told_unfused = False

    def fresh(self) -> "_State":
        """The same options with a hand-over of its own (a replica's: DataParallel
        runs its replicas in threads at once)."""
        return _State(self.options, self.labels_position, self.return_dict_ok)


def _model_loss(state: _State, logits, labels, vocab_size, num_items_in_batch=None, ignore_index: int = -100,
                shift_labels=None, **kwargs):
    """``model.loss_function``: the fused loss while a fused forward call is
    under way, else :func:`ForCausalLMLoss` of the logits the model made (and
    capped itself, if it caps)."""
    o = state.options
    if not state.capturing or state.head_called:
        state.loss_done = True
        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels,
                               z_loss=o.z_loss, backend=o.backend)
    if state.hidden is None:
        raise RuntimeError("gpuloss: the model computed its loss without calling its output embedding "
                           "(get_output_embeddings()) in this forward call; apply_gpuloss(model, "
                           "fused_linear=False) keeps its logits")
    hidden, (weight, bias) = state.hidden, state.captured_params
    state.hidden, state.captured_params, state.loss_done = None, None, True
    return _fused_causal_lm_loss(hidden, weight, bias, labels, o, num_items_in_batch, ignore_index, shift_labels)


def _head_forward(head: torch.nn.Module, state: _State, orig_forward, input: torch.Tensor) -> torch.Tensor:
    """``lm_head.forward``: the logits, or, during a fused call, the hidden
    states kept for the loss and an empty ``(..., 0)`` tensor in their place
    (unless the head must run as itself: :func:`_head_runs_itself`)."""
    if not state.capturing:
        return orig_forward(input)
    why = _head_runs_itself(head)
    if why:
        if not state.told_unfused:
            state.told_unfused = True
            _layout.user_warning(
                f"gpuloss: lm_head {why}; this call computes the full logits and their loss, as the unpatched "
                f"model does (the fused path would skip them)", _caller_level(), input)
        state.head_called = True
        return orig_forward(input)
    state.hidden, state.captured_params = input, (head.weight, head.bias)
    return input.new_empty((*input.shape[:-1], 0))


def _caller_level() -> int:
    """The stack level (for :func:`gpuloss._layout.user_warning`, called from
    the caller of this function) of the first frame outside gpuloss, torch,
    transformers and accelerate: the user's line that called the model."""
    import os
    import sys
    skip = tuple(os.path.dirname(m.__file__) + os.sep for m in (gpuloss, torch, transformers))
    frame, level = sys._getframe(2), 2  # level 1: the caller of this function
    while frame is not None and (frame.f_code.co_filename.startswith(skip)
                                 or f"{os.sep}accelerate{os.sep}" in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _head_runs_itself(head: torch.nn.Module) -> str:
    """Why ``head`` must compute its logits in this call ("" if it need not):
    hooks on its output or its gradient (a forward hook that changes the
    logits, DeepSpeed ZeRO-3's parameter release, an activation recorder)
    would see the fused path's empty tensor; a weight on the meta device
    exists only during the head's own call (accelerate's offloading hook,
    ``device_map`` with "cpu"/"disk" entries, loads it around ``forward`` and
    puts it back afterwards)."""
    if head._forward_hooks or _torch_module._global_forward_hooks:
        return "has forward hooks"
    if (head._backward_hooks or head._backward_pre_hooks or _torch_module._global_backward_hooks
            or _torch_module._global_backward_pre_hooks):
        return "has backward hooks"
    if head.weight.is_meta:
        return "has its weight on the meta device (offloaded, loaded only inside its own call)"
    return ""


def _forward(model, state: _State, orig_forward, *args, **kwargs):
    """``model.forward``: the model's own forward; during training with labels,
    with the loss from the hidden states and ``outputs.logits = None``."""
    if args and args[0] is model:
        # bound again as a method of the model: accelerate's unwrap_model(keep_fp32_wrapper=False)
        # follows __wrapped__ down to this partial and sets model.forward = MethodType(partial, model)
        args = args[1:]
    labels = kwargs.get("labels")
    pos = state.labels_position
    if labels is None and pos is not None and len(args) > pos:
        labels = args[pos]
    if not (state.options.fused_linear and labels is not None and model.training and torch.is_grad_enabled()):
        return orig_forward(*args, **kwargs)
    # the head the model calls now: one set by resize_token_embeddings or
    # set_output_embeddings after apply_gpuloss, or a DataParallel replica's
    head = model.get_output_embeddings()
    wired = _ours(head, _head_forward) if isinstance(head, torch.nn.Module) else None
    if head is not state.head or (wired is not None and wired.args[1] is not state):
        # a new head, or one shared with another patched model that wired it to its own state
        # (a forward wrapped around ours since, e.g. accelerate's hooks, is left as it is)
        _attach_head(model, state, head)
    if _FSDPModule is not None and isinstance(head, _FSDPModule):
        # checked per call: fully_shard usually comes after apply_gpuloss
        raise RuntimeError(_FSDP_HEAD_ERROR.format(name=type(model).__name__))
    _current_transform(model, state, head)
    # transformers' can_return_tuple rule, applied here so the output can be
    # rebuilt without its placeholder logits first
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    if state.return_dict_ok:
        kwargs["return_dict"] = True
    state.capturing, state.hidden, state.captured_params, state.loss_done = True, None, None, False
    state.head_called = False
    try:
        out = orig_forward(*args, **kwargs)
    finally:
        state.capturing, state.hidden, state.captured_params = False, None, None
    if not state.loss_done:
        replaced = _replaced_forward(model, orig_forward)
        raise RuntimeError(f"gpuloss: {type(model).__name__}.forward returned without calling self.loss_function"
                           + (replaced if replaced else "; apply_gpuloss(model, fused_linear=False) keeps its logits"))
    if isinstance(out, tuple):
        raise RuntimeError(f"gpuloss: {type(model).__name__}.forward returned a tuple with return_dict=True")
    if state.head_called:  # the head ran as itself: the model's own output, logits included
        return out if return_dict else out.to_tuple()
    if return_dict:
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})
    # to_tuple() skips None fields: the logits' slot is kept (as None) so that
    # out[1:] is what it is for the unpatched model, e.g. (loss, None, past_key_values)
    return tuple(None if f.name == "logits" else getattr(out, f.name) for f in dataclasses.fields(out)
                 if f.name == "logits" or getattr(out, f.name) is not None)


def _replaced_forward(model, orig_forward) -> str:
    """Where the forward gpuloss wrapped is not the class's own (another
    library replaced ``model.forward`` before ``apply_gpuloss``, e.g. TRL's
    fused lm head, which computes the loss itself), a clause naming it."""
    fn = getattr(orig_forward, "__func__", orig_forward)
    if fn is type(model).forward:
        return ""
    code = getattr(fn, "__code__", None)  # a wrapper's own code (functools.wraps copies the names)
    name = f"{getattr(code, 'co_qualname', code.co_name)} in {code.co_filename}" if code is not None else repr(fn)
    return (f": model.forward had been replaced by {name}, which computes the loss its own way, without "
            f"self.loss_function; gpuloss has nothing to replace there: leave this model unpatched")


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without torch.distributed
        return None
    return FSDPModule


_FSDPModule = _fsdp_module_class()

#: why a head sharded as its own FSDP2 unit is refused rather than handled:
#: FSDP reshards its weight in its post-forward hook, before the loss reads it,
#: and gathers it again for backward (and reduce-scatters its gradient) from
#: hooks on the head's output, which the fused loss never uses
_FSDP_HEAD_ERROR = (
    "gpuloss: {name}'s output embedding is an FSDP unit of its own (fully_shard(model.lm_head)); FSDP "
    "reshards its weight right after its forward and gathers it for backward from its output, which the "
    "fused loss does not use. Leave lm_head in the root's unit (fully_shard each decoder layer, then "
    "fully_shard(model), not fully_shard(model.lm_head)), or apply_gpuloss(model, fused_linear=False)")


def _is_ours(fn, impl) -> bool:
    return isinstance(fn, functools.partial) and fn.func is impl


def _ours(module: torch.nn.Module, impl):
    """``module``'s forward if it is ``impl``'s partial, as set by :func:`_bind`
    or bound again as a method of ``module`` (accelerate's unwrap_model), else None."""
    fn = module.__dict__.get("forward")
    if inspect.ismethod(fn) and fn.__self__ is module:
        fn = fn.__func__
    return fn if _is_ours(fn, impl) else None


def _rebind(orig, old: torch.nn.Module, new: torch.nn.Module):
    """``orig`` (a forward of ``old``) as ``new``'s: a method bound to ``old``
    is bound to ``new`` instead; any other callable is kept."""
    if inspect.ismethod(orig) and orig.__self__ is old:
        return types.MethodType(orig.__func__, new)
    return orig


def _bind(module: torch.nn.Module, impl, state: _State, orig) -> None:
    """``module.forward = impl(module, state, orig, ...)`` on the instance.
    ``functools.update_wrapper`` keeps the original signature visible
    (``inspect.signature`` follows ``__wrapped__``: Trainer inspects it), and a
    partial of module-level functions is copied along with the model by
    ``copy.deepcopy`` and pickled by ``torch.save``.  DataParallel's replicas
    copy ``module.__dict__`` (this forward included, bound to ``module``):
    ``_replicate_for_data_parallel`` is overridden on the instance to bind
    the replica's forward to the replica.  A partial with ``__wrapped__`` is
    what accelerate's ``unwrap_model(keep_fp32_wrapper=False)`` stops at and
    binds as a method of the model: :func:`_forward` then drops the model
    passed first, and :func:`_wrap` puts the partial back."""
    module.forward = functools.update_wrapper(functools.partial(impl, module, state, orig), orig)
    module._replicate_for_data_parallel = functools.partial(_replicate, module)


def _wrap(module: torch.nn.Module, impl, state: _State) -> None:
    """Wrap ``module``'s forward in ``impl`` for ``state``, once: a forward of
    ours for another module (a copy's) or state is rebound, not wrapped twice."""
    fn = _ours(module, impl)
    if fn is not None:
        if fn.args[0] is module and fn.args[1] is state and module.__dict__["forward"] is fn:
            return
        _bind(module, impl, state, _rebind(fn.args[2], fn.args[0], module))
    else:
        _bind(module, impl, state, module.forward)


def _unwrap(module: torch.nn.Module, impl) -> None:
    fn = _ours(module, impl)
    if fn is None:
        return
    orig = _rebind(fn.args[2], fn.args[0], module)
    module.__dict__.pop("_replicate_for_data_parallel", None)
    if getattr(orig, "__self__", None) is module and getattr(orig, "__func__", None) is type(module).forward:
        del module.forward  # it was the class's own forward
    else:
        module.forward = orig


def _replicate(module: torch.nn.Module) -> torch.nn.Module:
    """``module._replicate_for_data_parallel()``: the class's replica (a shallow
    copy of ``__dict__`` with its own parameters), with gpuloss's forward
    bound to the replica rather than to ``module``, so that it runs the
    replica's weights on the replica's device; a model's replica gets its own
    hand-over state."""
    replica = type(module)._replicate_for_data_parallel(module)
    state = replica.__dict__.get("_gpuloss")
    if isinstance(state, _State):
        state = state.fresh()
        replica._gpuloss = state
        replica.loss_function = functools.partial(_model_loss, state)
    for impl in (_forward, _head_forward):
        fn = _ours(module, impl)  # the replica's too: a copy of module.__dict__
        if fn is not None:
            # a head keeps its model's state until the model's replica wires it to its own
            _bind(replica, impl, state if impl is _forward else fn.args[1], _rebind(fn.args[2], module, replica))
    return replica


def _attach_head(model, state: _State, head) -> None:
    """Wire ``head`` (the model's output embedding now) to ``state``."""
    _check_head(model, head)
    _wrap(head, _head_forward, state)
    state.head = head


# ---------------------------------------------------------------------------
# what a model must have
# ---------------------------------------------------------------------------

def _check_model(model):
    """The gpuloss loss for a model that is not a causal LM (None for a causal
    LM), after checking that its forward computes its loss with
    ``self.loss_function``; raises naming what is wrong."""
    name = type(model).__name__
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"apply_gpuloss takes a transformers PreTrainedModel (e.g. from "
                        f"AutoModelForCausalLM), got {name}; apply it to the model before torch.compile or "
                        f"get_peft_model")
    loss_type = getattr(model, "loss_type", None)
    resolved = loss_type if loss_type in _hf_loss.LOSS_MAPPING else "ForCausalLM"  # transformers' own rule
    hf_loss = _hf_loss.LOSS_MAPPING.get(resolved)
    head_loss = None
    if hf_loss is not _hf_loss.ForCausalLMLoss:
        head_loss = _HEAD_LOSSES.get(hf_loss)
        if head_loss is None:
            raise ValueError(f"apply_gpuloss replaces the loss of causal LMs and of masked-LM, sequence, token "
                             f"and question-answering heads; {name} has loss_type={loss_type!r} "
                             f"({hf_loss.__name__})")
    own = model.__dict__.get("_loss_function")
    if own is not None and not (_is_ours(own, _model_loss) or any(_is_ours(own, f) for f in _HEAD_LOSSES.values())):
        raise ValueError(f"{name} already has its own loss_function ({own!r}); apply_gpuloss would replace it")
    try:
        src = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        src = None  # no source (a compiled or generated class): not checked
    if src is not None and "loss_function" not in src:
        if head_loss is not None:
            why = (f"a {resolved} model whose forward builds its own loss module (e.g. nn.CrossEntropyLoss()) "
                   f"instead of calling self.loss_function")
        elif getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            why = "an encoder-decoder model (apply_gpuloss takes decoder-only causal LMs)"
        elif model.get_output_embeddings() is None:
            why = ("a model without an output embedding (a base model; apply_gpuloss takes the causal LM around "
                   "it, e.g. from AutoModelForCausalLM)")
        elif "labels" not in inspect.signature(type(model).forward).parameters:
            why = "a model whose forward takes no labels and computes no loss"
        else:
            why = "a model whose forward computes its loss itself"
        raise ValueError(f"{name}.forward does not compute its loss with self.loss_function, so apply_gpuloss "
                         f"cannot replace it: {name} is {why}")
    return head_loss


def _forward_layout(model) -> tuple:
    """(position of ``labels`` among the forward's positional parameters or
    None, whether it takes ``return_dict``)."""
    params = list(inspect.signature(model.forward).parameters.values())
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    names = [p.name for p in params]
    if "labels" not in names and not var_kw:
        raise ValueError(f"{type(model).__name__}.forward takes no labels")
    positional = [p.name for p in params
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    pos = positional.index("labels") if "labels" in positional else None
    return pos, var_kw or "return_dict" in names


def _check_fused_layout(model) -> torch.nn.Linear:
    """The output head, after checking the base-model / ``lm_head`` layout the
    fused path relies on; raises naming what is missing."""
    name = type(model).__name__
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, torch.nn.Module) or base is model:
        # a prefix the causal-LM class does not use (Llama4ForCausalLM's "language_model": its base is .model)
        base = getattr(model, "model", None)
    if not isinstance(base, torch.nn.Module) or base is model:
        raise ValueError(f"apply_gpuloss(fused_linear=True) needs a base model and an lm_head; {name} has no base "
                         f"model (base_model_prefix={prefix!r} names no submodule, nor has it a .model)")
    head = model.get_output_embeddings()
    _check_head(model, head)
    return head


def _check_head(model, head) -> None:
    """The output embedding (at apply time or a forward call's) is one the fused loss computes."""
    name = type(model).__name__
    if head is None:
        raise ValueError(f"apply_gpuloss(fused_linear=True) needs a base model and an lm_head; {name} has no "
                         f"output embedding (get_output_embeddings() is None)")
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        kind = type(head)
        what = f"{kind.__module__}.{kind.__qualname__}"
        if isinstance(head, torch.nn.Linear):
            what += " (a torch.nn.Linear subclass with its own forward, e.g. an adapter such as LoRA)"
        elif kind.__name__ == "FullyShardedDataParallel":
            what += (" (FSDP wrapped lm_head as a unit of its own: keep it out of the auto_wrap_policy so that it "
                     "stays in the root's unit)")
        raise ValueError(f"apply_gpuloss(fused_linear=True) needs lm_head to be a plain torch.nn.Linear (logits = "
                         f"F.linear(hidden, weight, bias)); {name}'s is a {what}. "
                         f"fused_linear=False works with any head")
    if not head.weight.is_floating_point():
        raise ValueError(f"apply_gpuloss(fused_linear=True): lm_head.weight is {head.weight.dtype}, not floating")


def _check_options(fused_linear, z_loss, chunk_size, backend) -> None:
    if fused_linear is not None:
        _validate.check_bool("fused_linear", fused_linear)
    _validate.check_finite_number("z_loss", z_loss)
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    _validate.check_chunk_size("chunk_size", chunk_size)
    if backend is not None and backend not in dispatch.registered():
        raise ValueError(f"unknown backend {backend!r}; registered: {', '.join(dispatch.registered())}")


# ---------------------------------------------------------------------------
# what the model does to lm_head's output before its loss, read from its source
# ---------------------------------------------------------------------------

class _Unknown(Exception):
    """A piece of forward source that :func:`_logit_transform` cannot read."""


@dataclasses.dataclass(frozen=True)
class _Transform:
    """``logits = softcap * tanh(scale * z / softcap)`` of lm_head's output ``z``
    (no tanh: ``scale * z``), which the fused loss applies as a hidden-state
    scale and gpuloss's ``softcap``."""
    scale: float = 1.0
    softcap: Optional[float] = None
    #: what the numbers came from: (module path from the model, expression, local bindings,
    #: value read), read again at each fused call (:func:`_current_transform`)
    reads: tuple = dataclasses.field(default=(), compare=False, repr=False)


#: calls on the logits that do not change the loss: the fused loss is computed
#: in fp32 (fp64 for fp64 operands) whatever the logits' dtype would have been
_NEUTRAL_METHODS = {"float", "contiguous"}


def _function_ast(fn) -> Optional[ast.FunctionDef]:
    try:
        src = inspect.getsource(inspect.unwrap(fn))
    except (OSError, TypeError):
        return None
    tree = ast.parse(textwrap.dedent(src))
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _statements(body, conds=(), loop=False, out=None) -> list:
    """The function's simple statements in source order, each with the ``if``
    tests it runs under ``(test, taken)`` and whether it is inside a loop;
    a compound statement's header counts as a statement of its own."""
    out = [] if out is None else out
    for s in body:
        if isinstance(s, ast.If):
            out.append((s.test, conds, loop))
            _statements(s.body, conds + ((s.test, True),), loop, out)
            _statements(s.orelse, conds + ((s.test, False),), loop, out)
        elif isinstance(s, (ast.For, ast.AsyncFor, ast.While)):
            out.append((s.iter if isinstance(s, (ast.For, ast.AsyncFor)) else s.test, conds, loop))
            _statements(s.body + s.orelse, conds, True, out)
        elif isinstance(s, (ast.With, ast.AsyncWith)):
            out.append((ast.Tuple([i.context_expr for i in s.items], ast.Load()), conds, loop))
            _statements(s.body, conds, loop, out)
        elif isinstance(s, ast.Try):
            _statements(s.body + s.orelse + s.finalbody, conds, loop, out)
            for h in s.handlers:
                _statements(h.body, conds, True, out)  # may or may not run
        elif isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        else:
            out.append((s, conds, loop))
    return out


def _is_self_call(node, attr: str) -> bool:
    f = node.func if isinstance(node, ast.Call) else None
    return (isinstance(f, ast.Attribute) and f.attr == attr and isinstance(f.value, ast.Name)
            and f.value.id == "self")


def _mentions(node, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node))


def _static(node, owner, env: dict):
    """The value of a side-effect-free expression of ``self`` (attributes, the
    ``get_*()`` accessors, numbers, ``is (not) None``), evaluated now; raises
    :class:`_Unknown` for anything else.  ``training`` is refused: it can
    change between this call and the forward's."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (int, float))):
        return node.value
    if isinstance(node, ast.Name):
        if node.id == "self":
            return owner
        if node.id in env:
            return _static(env[node.id], owner, env)
    elif isinstance(node, ast.NamedExpr):
        return _static(node.value, owner, env)
    elif isinstance(node, ast.Attribute) and node.attr != "training":
        try:
            return getattr(_static(node.value, owner, env), node.attr)
        except AttributeError:
            pass
    elif (isinstance(node, ast.Call) and not node.args and not node.keywords
          and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("get_")):
        return getattr(_static(node.func.value, owner, env), node.func.attr)()
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.comparators[0], ast.Constant) \
            and node.comparators[0].value is None and isinstance(node.ops[0], (ast.Is, ast.IsNot)):
        v = _static(node.left, owner, env)
        return (v is None) == isinstance(node.ops[0], ast.Is)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        v = _static(node.operand, owner, env)
        return -v if isinstance(node.op, ast.USub) else not v
    raise _Unknown(ast.unparse(node))


#: the values :func:`_read` took while :func:`_logit_transform` reads a forward (None otherwise)
_READS = threading.local()


def _read(node, owner, env):
    """:func:`_static`, noted for :func:`_logit_transform` (the config values a
    transform depends on, read again at each fused call)."""
    v = _static(node, owner, env)
    reads = getattr(_READS, "reads", None)
    if reads is not None:
        reads.append((owner, node, env, v))
    return v


def _number(node, owner, env) -> float:
    v = _read(node, owner, env)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Unknown(f"{ast.unparse(node)} (= {v!r}, not a number)")
    return float(v)


def _ops(expr, is_base, owner, env) -> list:
    """What ``expr`` does to its base (lm_head's output), as a list of
    ``("scale", s)`` / ``("tanh",)``; raises :class:`_Unknown` for anything
    that is not one of those."""
    if is_base(expr):
        return []
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
        f = expr.func
        if f.attr in _NEUTRAL_METHODS and not expr.args and not expr.keywords:
            return _ops(f.value, is_base, owner, env)
        if f.attr == "tanh" and not expr.keywords:
            if not expr.args:  # z.tanh()
                return _ops(f.value, is_base, owner, env) + [("tanh",)]
            if len(expr.args) == 1:  # torch.tanh(z), nn.functional.tanh(z), F.tanh(z)
                return _ops(expr.args[0], is_base, owner, env) + [("tanh",)]
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Mult, ast.Div)):
        has = [any(is_base(n) for n in ast.walk(side)) for side in (expr.left, expr.right)]
        if has == [True, False]:
            s = _number(expr.right, owner, env)
            return _ops(expr.left, is_base, owner, env) + [("scale", s if isinstance(expr.op, ast.Mult) else 1 / s)]
        if has == [False, True] and isinstance(expr.op, ast.Mult):
            return _ops(expr.right, is_base, owner, env) + [("scale", _number(expr.left, owner, env))]
    raise _Unknown(ast.unparse(expr))


def _follow(fdef, owner, call_attr: str, sink) -> list:
    """The ops between the one statement of ``fdef`` that calls
    ``self.<call_attr>(...)`` and the first statement ``sink`` accepts, which
    returns the expression that receives the result (or None)."""
    stmts = _statements(fdef.body)
    env = {}
    for node in ast.walk(fdef):  # simple local bindings (cap = self.config.x) and walruses
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            env.setdefault(node.targets[0].id, node.value)
        elif isinstance(node, ast.NamedExpr):
            env.setdefault(node.target.id, node.value)
    at = [i for i, (s, _, _) in enumerate(stmts) if any(_is_self_call(n, call_attr) for n in ast.walk(s))]
    if len(at) != 1:
        raise _Unknown(f"self.{call_attr}(...) is called {len(at) or 'nowhere'} times, not once")
    s0, conds0, loop0 = stmts[at[0]]
    if loop0:
        raise _Unknown(f"self.{call_attr}(...) is called in a loop")

    def is_call(n):
        return _is_self_call(n, call_attr)

    with _at(s0):
        if isinstance(s0, ast.Return):
            return _ops(s0.value, is_call, owner, env)
        if not (isinstance(s0, ast.Assign) and len(s0.targets) == 1 and isinstance(s0.targets[0], ast.Name)):
            raise _Unknown("not assigned to a name")
        z = s0.targets[0].id
        ops = _ops(s0.value, is_call, owner, env)

    def is_z(n):
        return isinstance(n, ast.Name) and n.id == z

    for s, conds, loop in stmts[at[0] + 1:]:
        with _at(s):
            received = sink(s)
            if received is not None:
                return ops + _ops(received, is_z, owner, env)
            if not _mentions(s, z):
                continue
            if loop or not (isinstance(s, (ast.Assign, ast.AugAssign)) and _is_z_target(s, z)):
                raise _Unknown("")
            if not all(bool(_read(t, owner, env)) == taken for t, taken in conds):
                continue  # under an if that is not taken (e.g. a softcap of None)
            if isinstance(s, ast.AugAssign):
                s = ast.Assign([ast.Name(z, ast.Store())], ast.BinOp(ast.Name(z, ast.Load()), s.op, s.value))
            ops += _ops(s.value, is_z, owner, env)
    raise _Unknown(f"the result of self.{call_attr}(...) does not reach the loss")


@contextlib.contextmanager
def _at(stmt):
    """Name the source line in a :class:`_Unknown` raised while reading it."""
    try:
        yield
    except _Unknown as e:
        line = ast.unparse(stmt).splitlines()[0]
        raise _Unknown(f"`{line}`" + (f": {e}" if str(e) else "")) from None


def _is_z_target(s, z: str) -> bool:
    t = s.targets[0] if isinstance(s, ast.Assign) and len(s.targets) == 1 else getattr(s, "target", None)
    return isinstance(t, ast.Name) and t.id == z


def _loss_logits(s):
    """The expression a ``... self.loss_function(logits, ...)`` statement scores."""
    for n in ast.walk(s):
        if _is_self_call(n, "loss_function"):
            for k in n.keywords:
                if k.arg == "logits":
                    return k.value
            if n.args:
                return n.args[0]
            raise _Unknown(ast.unparse(n))
    return None


def _returned(s):
    return s.value if isinstance(s, ast.Return) and s.value is not None else None


def _class_forward(module, what: str):
    """The AST of the forward that ``module``'s class runs, following
    ``super().forward(...)`` overrides."""
    for cls in type(module).__mro__:
        fn = cls.__dict__.get("forward")
        if fn is None:
            continue
        fdef = _function_ast(fn)
        if fdef is None:
            raise _Unknown(f"the source of {cls.__name__}.forward cannot be read")
        yield cls, fdef
    raise _Unknown(f"no forward calls {what}")


def _module_ops(module, path: list, sink, what: str) -> list:
    """Ops from the output of ``module.<path>`` (a dotted child path) to what
    ``module``'s forward hands ``sink``."""
    for cls, fdef in _class_forward(module, what):
        if not any(_is_self_call(n, path[0]) for n in ast.walk(fdef)):
            if "super" in {n.id for n in ast.walk(fdef) if isinstance(n, ast.Name)}:
                continue  # an override that calls the parent's forward
            raise _Unknown(f"{cls.__name__}.forward does not call self.{path[0]}(...)")
        inner = []
        if len(path) > 1:  # the head is inside self.<path[0]>: what that module returns of it
            inner = _module_ops(getattr(module, path[0]), path[1:], _returned, what)
        return inner + _follow(fdef, module, path[0], sink)


def _logit_transform(model, head) -> _Transform:
    """What ``model``'s forward does to ``head``'s output before passing it to
    ``self.loss_function``, read from the source of the forward (and of the
    modules between it and the head): the fused loss must apply the same.
    Soft-capping and scaling by a number are recognised (Gemma 2's
    ``final_logit_softcapping``, RecurrentGemma's ``logits_soft_cap``, Cohere's
    ``logit_scale``, Granite's ``logits_scaling``, FalconH1's
    ``lm_head_multiplier``, ``.float()``); the fused path is refused for
    anything else (a slice of the vocabulary, a bias added, masked tokens) and
    for a forward whose source cannot be read.  The values it depends on (a
    config's soft-cap, whether it is None) are noted and read again at each
    fused call: a config changed afterwards is followed (:func:`_current_transform`)."""
    name = type(model).__name__
    modules = dict(model.named_modules())
    path = next((p for p, m in modules.items() if m is head), None)
    _READS.reads = reads = []
    try:
        if not path:
            raise _Unknown("the output embedding is not a submodule of the model")
        ops = _module_ops(model, path.split("."), _loss_logits, f"self.{path}")
    except _Unknown as e:
        raise ValueError(f"apply_gpuloss(fused_linear=True) cannot tell what {name}.forward does to the output of "
                         f"its output embedding self.{path or 'lm_head'} before its loss (at: {e}); the fused loss "
                         f"would not apply it. "
                         f"Use fused_linear=False") from None
    finally:
        _READS.reads = None
    where = {id(m): tuple(p.split(".")) if p else () for p, m in modules.items()}
    return dataclasses.replace(_canonical(ops, name),
                               reads=tuple((where[id(o)], n, e, v) for o, n, e, v in reads if id(o) in where))


def _current_transform(model, state: "_State", head) -> None:
    """The transform of ``state``'s options, read again where a value it came
    from has changed since (``model.config.final_logit_softcapping = 2.0``
    after apply_gpuloss): the fused loss applies what the forward would."""
    t = state.options.transform
    for path, node, env, value in t.reads:
        try:
            owner = functools.reduce(getattr, path, model)
            same = _static(node, owner, env) == value
        except Exception:
            same = False
        if not same:
            state.options = dataclasses.replace(state.options, transform=_logit_transform(model, head))
            return


def _canonical(ops: list, name: str) -> _Transform:
    """``ops`` as ``softcap * tanh(scale * z / softcap)``: scales, then at most
    one tanh, then scales (``q * tanh(p * z)`` is softcap ``q``, scale ``p * q``)."""
    pre = post = 1.0
    tanh = False
    for op in ops:
        if op[0] == "tanh":
            if tanh:
                raise ValueError(f"apply_gpuloss(fused_linear=True): {name} applies tanh to its logits twice, which "
                                 f"the fused loss cannot; use fused_linear=False")
            tanh = True
        elif tanh:
            post *= op[1]
        else:
            pre *= op[1]
    if not tanh:
        return _Transform(scale=pre)
    if not post > 0:
        raise ValueError(f"apply_gpuloss(fused_linear=True): {name} soft-caps its logits with a cap of {post}, "
                         f"not > 0; use fused_linear=False")
    return _Transform(scale=pre * post, softcap=post)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

def apply_gpuloss(model, *, fused_linear: Optional[bool] = None, z_loss: float = 0.0,
                  chunk_size: Optional[int] = None, backend: Optional[str] = None):
    """Give this model instance gpuloss's loss; returns the same model.

    Parameters
    ----------
    model : a transformers causal LM (``PreTrainedModel`` whose forward computes
        its loss with ``self.loss_function``), or a masked-LM, sequence- (text,
        image, video, audio), token-classification or question-answering model
        whose forward does (``loss_function`` alone is replaced there:
        :func:`ForMaskedLMLoss`, :func:`ForSequenceClassificationLoss`,
        :func:`ForTokenClassification`, :func:`ForQuestionAnsweringLoss`)
    fused_linear : in training forward calls with labels (``model.training``,
        gradients enabled), compute the loss from the last hidden states and
        ``lm_head`` in chunks, never materialising the logits;
        ``outputs.logits`` is then ``None``.  Needs the usual base-model /
        ``nn.Linear`` ``lm_head`` layout.  False: the model's forward is
        unchanged and only its loss function is replaced.  None (the
        default): True for a causal LM, False for the other heads (True is
        refused there)
    z_loss : adds ``z_loss * logsumexp(logits)**2`` per scored token (PaLM);
        0 keeps transformers' loss exactly
    chunk_size : tokens per chunk of the fused path (default: automatic)
    backend : gpuloss backend name, or None for the automatic choice

    Only this instance changes: its ``forward``, its ``lm_head.forward`` (both
    instance attributes; a head set later by ``resize_token_embeddings`` or
    ``set_output_embeddings`` is wrapped at its first fused call) and
    ``loss_function``; never a class or
    ``transformers``' ``LOSS_MAPPING``.  Calling it again replaces the options
    (idempotent for the same ones).  What the forward does to ``lm_head``'s
    output before its loss (soft-capping, scaling by a number) is read from
    its source and applied by the fused loss; anything else is refused
    (:func:`_logit_transform`).
    """
    _check_options(fused_linear, z_loss, chunk_size, backend)
    head_loss = _check_model(model)
    if head_loss is not None:
        name = type(model).__name__
        if fused_linear:
            raise ValueError(f"apply_gpuloss(fused_linear=True) fuses a causal LM's lm_head with its loss; {name} is "
                             f"not a causal LM. Leave fused_linear unset: its loss function is replaced")
        if chunk_size is not None:
            raise ValueError(f"apply_gpuloss(chunk_size=...) sizes the fused causal-LM path; {name} has none")
        _unwrap(model, _forward)  # a model patched as a causal LM before (its loss_type changed since)
        model.__dict__.pop("_gpuloss", None)
        model.loss_function = functools.partial(head_loss, z_loss=float(z_loss), backend=backend)
        return model
    fused_linear = True if fused_linear is None else fused_linear
    head = _check_fused_layout(model) if fused_linear else None
    options = _Options(bool(fused_linear), float(z_loss), chunk_size, backend,
                       _logit_transform(model, head) if fused_linear else _Transform())
    state = model.__dict__.get("_gpuloss")
    if not isinstance(state, _State):
        state = _State(options, *_forward_layout(model))
        model._gpuloss = state
        model.loss_function = functools.partial(_model_loss, state)
    state.options = options
    if fused_linear:
        _wrap(model, _forward, state)
        _attach_head(model, state, head)
    else:
        _unwrap(model, _forward)
        for old in (state.head, model.get_output_embeddings()):
            if isinstance(old, torch.nn.Module):
                _unwrap(old, _head_forward)
        state.head = None
    return model


class AutoGpulossForCausalLM:
    """``AutoModelForCausalLM`` followed by :func:`apply_gpuloss`.

    ``AutoGpulossForCausalLM.from_pretrained(name_or_path, *args, fused_linear=True,
    z_loss=0.0, chunk_size=None, backend=None, **kwargs)``: every other argument
    goes to ``AutoModelForCausalLM.from_pretrained`` (``from_config`` likewise).
    """

    def __init__(self, *args, **kwargs):
        raise EnvironmentError("AutoGpulossForCausalLM is instantiated with from_pretrained() or from_config()")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, fused_linear: bool = True,
                        z_loss: float = 0.0, chunk_size: Optional[int] = None, backend: Optional[str] = None,
                        **kwargs):
        _check_options(fused_linear, z_loss, chunk_size, backend)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *model_args,
                                                                   **kwargs)
        opts = dict(fused_linear=fused_linear, z_loss=z_loss, chunk_size=chunk_size, backend=backend)
        if isinstance(loaded, tuple):  # output_loading_info=True: (model, info)
            return (apply_gpuloss(loaded[0], **opts),) + tuple(loaded[1:])
        return apply_gpuloss(loaded, **opts)

    @classmethod
    def from_config(cls, config, *, fused_linear: bool = True, z_loss: float = 0.0,
                    chunk_size: Optional[int] = None, backend: Optional[str] = None, **kwargs):
        _check_options(fused_linear, z_loss, chunk_size, backend)
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        return apply_gpuloss(model, fused_linear=fused_linear, z_loss=z_loss, chunk_size=chunk_size,
                             backend=backend)
