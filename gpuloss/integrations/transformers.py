"""Hugging Face transformers: gpuloss's cross-entropy as a causal LM's loss.

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
   soft-capping) costs nothing;
2. ``model.loss_function``, which the model calls with its labels and loss
   kwargs (``num_items_in_batch``, ``ignore_index``, ``shift_labels``),
   computes the fused loss from the recorded hidden states, ``lm_head.weight``
   (tied or not) and ``lm_head.bias``, with the config's
   ``final_logit_softcapping`` as gpuloss's ``softcap``.

A model whose logits go through another transformation between ``lm_head`` and
the loss (Cohere's ``logit_scale``, Granite's ``logits_scaling``) is refused with
``fused_linear=True`` rather than trained on a different loss.

Importing this module imports torch and transformers; ``import gpuloss`` does not.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Optional

import torch
import transformers
from transformers.loss import loss_utils as _hf_loss

import gpuloss
from .. import _validate, dispatch

__all__ = ["apply_gpuloss", "ForCausalLMLoss", "AutoGpulossForCausalLM"]


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
    if logits.shape[-1] != vocab_size:
        raise ValueError(f"logits' last dimension is {logits.shape[-1]}, vocab_size is {vocab_size}")
    rows = logits.reshape(-1, vocab_size)
    target = _flat_targets(_next_token_targets(labels, ignore_index, shift_labels), rows.shape[0],
                           f"logits of shape {tuple(logits.shape)}", rows.device)
    loss = _token_cross_entropy(rows, target, ignore_index=ignore_index, reduction=_reduction(num_items_in_batch),
                                z_loss=z_loss, softcap=softcap, backend=backend)
    return _per_item(loss, num_items_in_batch)


def _fused_causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, opts: "_Options",
                          num_items_in_batch=None, ignore_index: int = -100,
                          shift_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`ForCausalLMLoss` of ``head(hidden)`` (softcapped by ``opts.softcap``)
    without the logits."""
    weight, bias = head.weight, head.bias
    # lm_head's input as the model passed it: a device-placement hook (accelerate's
    # device_map) would have moved it to the weight's device inside lm_head
    h = hidden.reshape(-1, hidden.shape[-1]).to(weight.device)
    target = _flat_targets(_next_token_targets(labels, ignore_index, shift_labels), h.shape[0],
                           f"hidden states of shape {tuple(hidden.shape)}", h.device)
    kw = dict(ignore_index=ignore_index, reduction=_reduction(num_items_in_batch), z_loss=opts.z_loss,
              softcap=opts.softcap, chunk_size=opts.chunk_size, backend=opts.backend)
    # under autocast, gpuloss.linear_cross_entropy runs lm_head's matmul in
    # autocast's dtype, as lm_head would (gpuloss._autocast)
    loss = _linear_cross_entropy(h, weight, target, bias, **kw)
    return _per_item(loss, num_items_in_batch)


# ---------------------------------------------------------------------------
# the per-instance patch
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Options:
    fused_linear: bool
    z_loss: float
    chunk_size: Optional[int]
    backend: Optional[str]
    softcap: Optional[float]  # the config's final_logit_softcapping, for the fused path


class _State:
    """What :func:`apply_gpuloss` keeps on a model (``model._gpuloss``): the
    options, and the hand-over from ``lm_head`` to ``loss_function`` during one
    fused forward call."""

    def __init__(self, options: _Options, labels_position: Optional[int], return_dict_ok: bool):
        self.options = options
        self.labels_position = labels_position
        self.return_dict_ok = return_dict_ok
        self.capturing = False
        self.hidden: Optional[torch.Tensor] = None
        self.head: Optional[torch.nn.Module] = None
        self.loss_done = False


def _model_loss(state: _State, logits, labels, vocab_size, num_items_in_batch=None, ignore_index: int = -100,
                shift_labels=None, **kwargs):
    """``model.loss_function``: the fused loss while a fused forward call is
    under way, else :func:`ForCausalLMLoss` of the logits the model made (and
    capped itself, if it caps)."""
    o = state.options
    if not state.capturing:
        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels,
                               z_loss=o.z_loss, backend=o.backend)
    if state.hidden is None:
        raise RuntimeError("gpuloss: the model computed its loss without calling lm_head through gpuloss; was "
                           "lm_head replaced after apply_gpuloss (resize_token_embeddings, set_output_embeddings)? "
                           "Call apply_gpuloss(model) again")
    hidden, head = state.hidden, state.head
    state.hidden, state.head, state.loss_done = None, None, True
    return _fused_causal_lm_loss(hidden, head, labels, o, num_items_in_batch, ignore_index, shift_labels)


def _head_forward(head: torch.nn.Module, state: _State, orig_forward, input: torch.Tensor) -> torch.Tensor:
    """``lm_head.forward``: the logits, or, during a fused call, the hidden
    states kept for the loss and an empty ``(..., 0)`` tensor in their place."""
    if not state.capturing:
        return orig_forward(input)
    state.hidden, state.head = input, head
    return input.new_empty((*input.shape[:-1], 0))


def _forward(model, state: _State, orig_forward, *args, **kwargs):
    """``model.forward``: the model's own forward; during training with labels,
    with the loss from the hidden states and ``outputs.logits = None``."""
    labels = kwargs.get("labels")
    pos = state.labels_position
    if labels is None and pos is not None and len(args) > pos:
        labels = args[pos]
    if not (state.options.fused_linear and labels is not None and model.training and torch.is_grad_enabled()):
        return orig_forward(*args, **kwargs)
    # transformers' can_return_tuple rule, applied here so the output can be
    # rebuilt without its placeholder logits first
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    if state.return_dict_ok:
        kwargs["return_dict"] = True
    state.capturing, state.hidden, state.head, state.loss_done = True, None, None, False
    try:
        out = orig_forward(*args, **kwargs)
    finally:
        state.capturing, state.hidden, state.head = False, None, None
    if not state.loss_done:
        raise RuntimeError(f"gpuloss: {type(model).__name__}.forward returned without calling "
                           f"self.loss_function; apply_gpuloss(model, fused_linear=False) keeps its logits")
    if isinstance(out, tuple):
        raise RuntimeError(f"gpuloss: {type(model).__name__}.forward returned a tuple with return_dict=True")
    out = type(out)(**{k: v for k, v in out.items() if k != "logits"})
    return out if return_dict else out.to_tuple()


def _is_ours(fn, impl) -> bool:
    return isinstance(fn, functools.partial) and fn.func is impl


def _wrap(module: torch.nn.Module, impl, *front) -> None:
    """``module.forward = impl(*front, original forward, ...)`` on the instance,
    once.  ``functools.update_wrapper`` keeps the original signature visible
    (``inspect.signature`` follows ``__wrapped__``: Trainer inspects it), and a
    partial of module-level functions is copied along with the model by
    ``copy.deepcopy`` and pickled by ``torch.save``."""
    if _is_ours(module.__dict__.get("forward"), impl):
        return
    orig = module.forward
    module.forward = functools.update_wrapper(functools.partial(impl, *front, orig), orig)


def _unwrap(module: torch.nn.Module, impl) -> None:
    fn = module.__dict__.get("forward")
    if not _is_ours(fn, impl):
        return
    orig = fn.args[-1]
    if getattr(orig, "__self__", None) is module and getattr(orig, "__func__", None) is type(module).forward:
        del module.forward  # it was the class's own forward
    else:
        module.forward = orig


# ---------------------------------------------------------------------------
# what a model must have
# ---------------------------------------------------------------------------

#: config attributes that transform the logits between lm_head and the loss
#: (a value of 1 or None is no transformation)
_LOGIT_TRANSFORMS = {
    "logit_scale": "multiplies its logits by config.logit_scale",
    "logits_scaling": "divides its logits by config.logits_scaling",
    "output_multiplier": "multiplies its logits by config.output_multiplier",
}


def _configs(model) -> list:
    cfg = model.config
    out = [cfg]
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if text is not cfg:
        out.append(text)
    return out


def _softcap(model) -> Optional[float]:
    for cfg in _configs(model):
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap is not None:
            return float(cap)
    return None


def _check_causal_lm(model) -> None:
    name = type(model).__name__
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"apply_gpuloss takes a transformers PreTrainedModel (e.g. from "
                        f"AutoModelForCausalLM), got {name}; apply it to the model before torch.compile or "
                        f"get_peft_model")
    loss_type = getattr(model, "loss_type", None)
    resolved = loss_type if loss_type in _hf_loss.LOSS_MAPPING else "ForCausalLM"
    if _hf_loss.LOSS_MAPPING.get(resolved) is not _hf_loss.ForCausalLMLoss:
        raise ValueError(f"apply_gpuloss replaces a causal LM's loss; {name} has loss_type={loss_type!r} "
                         f"({_hf_loss.LOSS_MAPPING[resolved].__name__})")
    own = model.__dict__.get("_loss_function")
    if own is not None and not _is_ours(own, _model_loss):
        raise ValueError(f"{name} already has its own loss_function ({own!r}); apply_gpuloss would replace it")
    try:
        src = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        src = None  # no source (a compiled or generated class): not checked
    if src is not None and "loss_function" not in src:
        raise ValueError(f"{name}.forward does not compute its loss with self.loss_function, so apply_gpuloss "
                         f"cannot replace it")


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
        raise ValueError(f"apply_gpuloss(fused_linear=True) needs a base model and an lm_head; {name} has no base "
                         f"model (base_model_prefix={prefix!r} names no submodule)")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"apply_gpuloss(fused_linear=True) needs a base model and an lm_head; {name} has no "
                         f"output embedding (get_output_embeddings() is None)")
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise ValueError(f"apply_gpuloss(fused_linear=True) needs lm_head to be a torch.nn.Linear (logits = "
                         f"F.linear(hidden, weight, bias)); {name}'s is a {type(head).__name__}. "
                         f"fused_linear=False works with any head")
    if not head.weight.is_floating_point():
        raise ValueError(f"apply_gpuloss(fused_linear=True): lm_head.weight is {head.weight.dtype}, not floating")
    for cfg in _configs(model):
        for attr, what in _LOGIT_TRANSFORMS.items():
            v = getattr(cfg, attr, None)
            if v is not None and v != 1:
                raise ValueError(f"apply_gpuloss(fused_linear=True): {name} {what} (= {v}) after lm_head, which "
                                 f"the fused loss does not apply; use fused_linear=False")
    if getattr(model, "final_logits_bias", None) is not None:
        raise ValueError(f"apply_gpuloss(fused_linear=True): {name} adds final_logits_bias to its logits after "
                         f"lm_head, which the fused loss does not apply; use fused_linear=False")
    return head


def _check_options(fused_linear, z_loss, chunk_size, backend) -> None:
    _validate.check_bool("fused_linear", fused_linear)
    _validate.check_finite_number("z_loss", z_loss)
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if backend is not None and backend not in dispatch.registered():
        raise ValueError(f"unknown backend {backend!r}; registered: {', '.join(dispatch.registered())}")


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

def apply_gpuloss(model, *, fused_linear: bool = True, z_loss: float = 0.0, chunk_size: Optional[int] = None,
                  backend: Optional[str] = None):
    """Give this causal LM instance gpuloss's loss; returns the same model.

    Parameters
    ----------
    model : a transformers causal LM (``PreTrainedModel`` whose forward computes
        its loss with ``self.loss_function``)
    fused_linear : in training forward calls with labels (``model.training``,
        gradients enabled), compute the loss from the last hidden states and
        ``lm_head`` in chunks, never materialising the logits;
        ``outputs.logits`` is then ``None``.  Needs the usual base-model /
        ``nn.Linear`` ``lm_head`` layout.  False: the model's forward is
        unchanged and only its loss function is replaced.
    z_loss : adds ``z_loss * logsumexp(logits)**2`` per scored token (PaLM);
        0 keeps transformers' loss exactly
    chunk_size : tokens per chunk of the fused path (default: automatic)
    backend : gpuloss backend name, or None for the automatic choice

    Only this instance changes: its ``forward``, its ``lm_head.forward`` (both
    instance attributes) and ``loss_function``; never a class or
    ``transformers``' ``LOSS_MAPPING``.  Calling it again replaces the options
    (idempotent for the same ones); the config's ``final_logit_softcapping``
    becomes gpuloss's ``softcap`` on the fused path.
    """
    _check_options(fused_linear, z_loss, chunk_size, backend)
    _check_causal_lm(model)
    head = _check_fused_layout(model) if fused_linear else None
    options = _Options(bool(fused_linear), float(z_loss), chunk_size, backend,
                       _softcap(model) if fused_linear else None)
    state = model.__dict__.get("_gpuloss")
    if not isinstance(state, _State):
        state = _State(options, *_forward_layout(model))
        model._gpuloss = state
        model.loss_function = functools.partial(_model_loss, state)
    state.options = options
    old_head = model.get_output_embeddings()
    if fused_linear:
        _wrap(model, _forward, model, state)
        _wrap(head, _head_forward, head, state)
    else:
        _unwrap(model, _forward)
        if isinstance(old_head, torch.nn.Module):
            _unwrap(old_head, _head_forward)
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
