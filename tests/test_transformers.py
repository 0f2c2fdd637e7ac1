"""gpuloss.integrations.transformers on tiny random causal LMs (CPU).

The reference is always the unpatched model: the same weights, the same
batches, transformers' own loss.  fp32 runs compare a few AdamW steps (losses
and every weight) to fp32 rounding; fp64 runs compare against torch's
cross-entropy on the unpatched model's fp64 logits to ~1e-12 (transformers'
own loss upcasts to fp32, so it cannot be the fp64 reference).  CPU tensors
run on the numpy backend; one test runs the Triton kernels in the interpreter.
"""
from __future__ import annotations

import copy
import inspect
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402
from transformers.loss import loss_utils  # noqa: E402

from gpuloss.integrations import transformers as gt  # noqa: E402

V = 67          # vocabulary: not a power of two
B, T = 2, 12    # micro-batch, sequence length
ADAMW_EPS = 1e-3  # see _train

_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)


def _config(family: str):
    c = transformers
    if family == "llama":
        return c.LlamaConfig(**_COMMON)
    if family == "llama_tied":
        return c.LlamaConfig(**_COMMON, tie_word_embeddings=True)
    if family == "mistral":
        return c.MistralConfig(**_COMMON, sliding_window=8)
    if family == "qwen2":
        return c.Qwen2Config(**_COMMON)
    if family == "qwen3":
        return c.Qwen3Config(**_COMMON, head_dim=8)
    if family == "gemma2":
        # a small cap so that capping changes the loss measurably (default 30)
        return c.Gemma2Config(**_COMMON, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                              final_logit_softcapping=1.5, attn_logit_softcapping=20.0)
    if family == "phi3":
        return c.Phi3Config(**_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise AssertionError(family)


# gemma2 ties lm_head to the embeddings (llama_tied is used where that is the point)
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"]
MODES = ["fused", "ce"]  # apply_gpuloss(fused_linear=True) / (fused_linear=False)


def _model(family: str, seed: int = 0, dtype=torch.float32, lm_head_bias: bool = False):
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager")
    if lm_head_bias:
        head = torch.nn.Linear(m.config.hidden_size, V, bias=True)
        with torch.no_grad():
            head.weight.copy_(m.lm_head.weight)
            head.bias.normal_(0.0, 0.5)
        m.lm_head = head
    return m.to(dtype).train()


def _patched(model, mode: str, **kw):
    return gt.apply_gpuloss(copy.deepcopy(model), fused_linear=(mode == "fused"), **kw)


def _batch(rng, b: int = B, t: int = T, mask_first: bool = True):
    """Token ids and labels with ignored positions, a different number per row
    (so that how Trainer counts them matters)."""
    ids = torch.from_numpy(rng.integers(0, V, (b, t)))
    labels = ids.clone()
    for r in range(b):
        k = int(rng.integers(1, t // 2))
        labels[r, rng.choice(t, k, replace=False)] = -100
    if not mask_first:
        labels[:, 0] = ids[:, 0]
    return ids, labels


def _ref_loss(logits, labels, num_items=None, ignore_index=-100, shift_labels=None):
    """torch's cross-entropy on the model's own logits, in their dtype: the
    causal LM rule written out (position t predicts labels[t + 1])."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    z = logits.reshape(-1, logits.shape[-1])
    t = shift_labels.reshape(-1)
    if num_items is None:
        return F.cross_entropy(z, t, ignore_index=ignore_index)
    return F.cross_entropy(z, t, ignore_index=ignore_index, reduction="sum") / num_items


def _train(model, batches, optimizer="adamw", **fwd):
    """A few optimizer steps; (the losses, every final weight).

    AdamW's eps is 1e-3, not 1e-8: some weights have a gradient that is zero in
    exact arithmetic (a key bias shifts every score of a row by the same amount,
    which softmax ignores), or nearly zero (an embedding row whose token's
    contributions cancel), so what fp32 computes for them is rounding noise of
    ~1e-7-1e-6, and AdamW's first steps move such an element by about
    lr * g / eps.  With eps=1e-8 that turns noise into a step of the full
    learning rate, differently in any two fp32 computations; with 1e-4 noise of
    1e-6 still became 1e-5 (a seed failed the 5e-6 tolerance); with 1e-3
    (lr / eps = 1) the noise stays at its own size, while elements with a real
    gradient (|g| >> 1e-3) still take AdamW's full steps.  Over 15 seeds x 12
    models the largest difference was 0.05 of the tolerance."""
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=ADAMW_EPS)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for ids, labels in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels, **fwd).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_training(a, b, rtol=1e-5, atol=5e-6):
    """Losses and every weight equal to fp32 rounding (the weights are ~0.1-1)."""
    (la, pa), (lb, pb) = a, b
    torch.testing.assert_close(lb, la, rtol=rtol, atol=atol)
    assert pa.keys() == pb.keys()
    for n in pa:
        torch.testing.assert_close(pb[n], pa[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------- exactness

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_adamw_steps_equal_unpatched_fp32(rng, family, mode):
    """Three AdamW steps in fp32: every loss and every final weight equal the
    unpatched model's to fp32 rounding."""
    base = _model(family)
    batches = [_batch(rng) for _ in range(3)]
    ref = _train(copy.deepcopy(base), batches)
    got = _train(_patched(base, mode), batches)
    _assert_same_training(ref, got)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_fp64_loss_and_grads_equal_torch_cross_entropy(rng, family, mode):
    """In fp64 the patched loss and every parameter gradient equal torch's
    cross-entropy on the unpatched model's fp64 logits (softcapped by the model
    itself where it caps) to ~1e-12: nothing is rounded to fp32 on the way."""
    base = _model(family, dtype=torch.float64)
    ids, labels = _batch(rng)
    ref_model = copy.deepcopy(base)
    ref = _ref_loss(ref_model(input_ids=ids).logits, labels)
    ref.backward()
    model = _patched(base, mode)
    out = model(input_ids=ids, labels=labels)
    assert out.loss.dtype == torch.float64
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-12, atol=1e-12)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("mode", MODES)
def test_lm_head_bias(rng, mode):
    base = _model("llama", dtype=torch.float64, lm_head_bias=True)
    ids, labels = _batch(rng)
    ref_model = copy.deepcopy(base)
    ref = _ref_loss(ref_model(input_ids=ids).logits, labels)
    ref.backward()
    model = _patched(base, mode)
    model(input_ids=ids, labels=labels).loss.backward()
    torch.testing.assert_close(model.lm_head.bias.grad, ref_model.lm_head.bias.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.lm_head.weight.grad, ref_model.lm_head.weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["num_items_tensor", "num_items_int", "shift_labels", "ignore_index",
                                  "logits_to_keep", "positional_labels"])
def test_loss_kwargs(rng, mode, case):
    """Each loss kwarg the model forwards to its loss_function, in fp64 against
    torch's cross-entropy on the unpatched model's logits."""
    base = _model("llama", dtype=torch.float64)
    ids, labels = _batch(rng)
    kw, ref_kw, fwd_ref = {}, {}, {}
    if case == "num_items_tensor":
        kw["num_items_in_batch"] = ref_kw["num_items"] = torch.tensor(29)
    elif case == "num_items_int":
        kw["num_items_in_batch"] = ref_kw["num_items"] = 23
    elif case == "shift_labels":
        shifted = torch.roll(labels, -2, dims=1)  # any alignment the caller chose
        kw["shift_labels"] = ref_kw["shift_labels"] = shifted
    elif case == "ignore_index":
        labels = torch.where(labels == -100, torch.full_like(labels, 7), labels)
        kw["ignore_index"] = ref_kw["ignore_index"] = 7
    elif case == "logits_to_keep":
        kw["logits_to_keep"] = fwd_ref["logits_to_keep"] = 5
        labels = labels[:, -5:]
    ref_model = copy.deepcopy(base)
    ref = _ref_loss(ref_model(input_ids=ids, **fwd_ref).logits, labels, **ref_kw)
    ref.backward()
    model = _patched(base, mode)
    if case == "positional_labels":
        # forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels)
        out = model(ids, None, None, None, None, labels)
    else:
        out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-12, atol=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    if mode == "fused":
        assert out.logits is None


@pytest.mark.parametrize("mode", MODES)
def test_a_step_without_scored_tokens_gives_zero_gradients(rng, mode):
    """Every label -100 and ``num_items_in_batch`` 0 (a gradient-accumulation
    step of prompt-only rows): transformers' loss is 0 / 0 and every gradient
    exactly 0, as here; before, the upstream inf times the saved zeros made
    every gradient NaN, and Trainer's step left every weight NaN."""
    base = _model("llama", dtype=torch.float64)
    ids, _ = _batch(rng)
    labels = torch.full_like(ids, -100)
    ref_model = copy.deepcopy(base)
    ref_model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(0)).loss.backward()
    model = _patched(base, mode)
    model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(0)).loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert q.grad is None or not q.grad.any(), name
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or not p.grad.any()), name


@pytest.mark.parametrize("mode", MODES)
def test_moe_auxiliary_loss_is_kept(rng, mode):
    """Mixtral with output_router_logits: the model's own forward still adds
    its router loss to gpuloss's (fp32: its grouped expert matmul has no fp64)."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2,
                                     output_router_logits=True, router_aux_loss_coef=0.1)
    base = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").train()
    ids, labels = _batch(rng)
    want = copy.deepcopy(base)(input_ids=ids, labels=labels)
    out = _patched(base, mode)(input_ids=ids, labels=labels)
    assert type(out) is transformers.modeling_outputs.MoeCausalLMOutputWithPast
    assert float(out.aux_loss.detach()) > 0.1
    torch.testing.assert_close(out.aux_loss, want.aux_loss)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_z_loss(rng, mode):
    """z_loss adds z * logsumexp(logits)**2 per scored token (0 is transformers' loss)."""
    base = _model("gemma2", dtype=torch.float64)  # on the capped logits
    ids, labels = _batch(rng)
    logits = copy.deepcopy(base)(input_ids=ids).logits
    t = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    z = logits.reshape(-1, V)
    keep = t != -100
    ref = F.cross_entropy(z, t) + 1e-2 * (torch.logsumexp(z, -1)[keep] ** 2).mean()
    out = _patched(base, mode, z_loss=1e-2)(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- logit transforms

_SMALL = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, initializer_range=0.2)


class _TransformedLlama(transformers.LlamaForCausalLM):
    """Every form the fused path recognises at once: a scale on the head's
    output, a neutral call, an in-place scale, tanh, a scale after it
    (2 * tanh(z / 6): softcap 2, hidden scale 1/3)."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        logits = self.lm_head(hidden).contiguous() * 0.5
        logits /= 3.0
        logits = torch.tanh(logits)
        logits = 2.0 * logits
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def _transformed(kind: str):
    """Tiny models whose forward does something to lm_head's output before the
    loss (or, for gemma3_vlm, a config that says so while the forward does not)."""
    t = transformers
    torch.manual_seed(0)
    if kind == "recurrent_gemma":  # nn.functional.tanh(logits / cap) * cap, cap = config.logits_soft_cap
        cfg = t.RecurrentGemmaConfig(**{k: v for k, v in _SMALL.items() if k != "num_key_value_heads"},
                                     lru_width=16, attention_window_size=8, block_types=["attention"],
                                     logits_soft_cap=1.0)
    elif kind == "falcon_h1":  # lm_head(h) * self.model.lm_head_multiplier
        cfg = t.FalconH1Config(**_SMALL, head_dim=8, mamba_d_ssm=16, mamba_n_heads=2, mamba_d_head=8,
                               mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=8,
                               lm_head_multiplier=0.25)
    elif kind == "cohere":  # logits * self.logit_scale
        cfg = t.CohereConfig(**_SMALL, logit_scale=0.3, eos_token_id=2)
    elif kind == "granite":  # logits / config.logits_scaling
        cfg = t.GraniteConfig(**_SMALL, logits_scaling=0.25)
    elif kind == "hyperclovax":  # lm_head(h) * config.logits_scaling: the same name, multiplied
        cfg = t.HyperCLOVAXConfig(**_SMALL, logits_scaling=0.5)
    elif kind == "llama4":  # no transformation; base_model_prefix "language_model" names no submodule (.model)
        cfg = t.Llama4TextConfig(**_SMALL, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                                 intermediate_size_mlp=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return t.Llama4ForCausalLM(cfg).double().train()
    elif kind == "gemma3_vlm":  # text_config.final_logit_softcapping, which this forward never applies
        vision = t.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=16, patch_size=4)
        cfg = t.Gemma3Config(text_config=dict(_SMALL, head_dim=8, final_logit_softcapping=0.5),
                             vision_config=vision.to_dict(), mm_tokens_per_image=4, image_token_index=V - 1,
                             boi_token_index=V - 3, eoi_token_index=V - 2)
        return t.Gemma3ForConditionalGeneration(cfg).double().train()
    elif kind == "custom":
        return _TransformedLlama(t.LlamaConfig(**_SMALL)).double().train()
    else:
        raise AssertionError(kind)
    return t.AutoModelForCausalLM.from_config(cfg).double().train()


@pytest.mark.parametrize("kind, scale, softcap", [
    ("recurrent_gemma", 1.0, 1.0), ("falcon_h1", 0.25, None), ("cohere", 0.3, None), ("granite", 4.0, None),
    ("hyperclovax", 0.5, None), ("gemma3_vlm", 1.0, None), ("custom", 0.5 / 3.0 * 2.0, 2.0), ("llama4", 1.0, None)])
def test_logit_transforms_are_read_from_the_forward(rng, kind, scale, softcap):
    """What the forward does to lm_head's output before its loss is read from
    its source, not guessed from the config: the fused loss and gradients equal
    torch's cross-entropy on the unpatched model's logits in fp64 (a soft-cap
    the forward does not apply, as in Gemma 3's VLM, is not applied)."""
    base = _transformed(kind)
    ids, labels = _batch(rng)
    ids = ids % (V - 3)  # no image tokens
    ref_model = copy.deepcopy(base)
    ref = _ref_loss(ref_model(input_ids=ids).logits, labels)
    ref.backward()
    model = gt.apply_gpuloss(copy.deepcopy(base))
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-12, atol=1e-12)
    t = model._gpuloss.options.transform
    assert t.softcap == softcap and t.scale == pytest.approx(scale, rel=1e-15)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("kind, attr, values", [("gemma2", "final_logit_softcapping", (2.0, None, 0.7)),
                                                ("granite", "logits_scaling", (1.5, 0.25))])
def test_a_config_changed_after_apply_is_followed(rng, kind, attr, values):
    """The values the transform came from are read again at each fused call: a
    soft-cap changed, removed (None: the forward's `if` no longer taken) or
    added back, or a scale changed, after apply_gpuloss gives the loss the
    unpatched model gives with the same config."""
    base = _model(kind).double() if kind == "gemma2" else _transformed(kind)
    with torch.no_grad():
        base.lm_head.weight.mul_(20.0)  # logits large enough for a cap to bend them
    ids, labels = _batch(rng)
    model = gt.apply_gpuloss(copy.deepcopy(base))
    for v in values:
        for m in (base, model):
            setattr(m.config, attr, v)
        ref = _ref_loss(base(input_ids=ids).logits, labels)
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ref, rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{attr}={v}: {m}")


_UNKNOWN_TRANSFORMS = {  # kind: (the line after lm_head, what the error names)
    "slice": ("logits = logits[..., :-3]", r"`logits = logits\[\.\.\., :-3\]`: logits\[\.\.\., :-3\]"),
    "bias": ("logits = logits + 1.0", r"`logits = logits \+ 1\.0`"),
    "in_place": ("logits.div_(2.0)", r"`logits\.div_\(2\.0\)`"),
    "training": ("if self.training:\n            logits = logits * 2.0", r"`logits = logits \* 2\.0`: self\.training"),
    "tensor_scale": ("logits = logits * self.model.embed_tokens.weight[0, 0]", r"`logits = logits \* self\.model\.embed_tokens\.weight\[0, 0\]`"),
}


def _unknown_transform_model(kind: str):
    src = f"""
def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        {_UNKNOWN_TRANSFORMS[kind][0]}
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)
"""
    ns = {"transformers": transformers}
    exec(compile(src, f"<{kind}>", "exec"), ns)  # no source file: patched in below for inspect
    cls = type(f"Llama_{kind}", (transformers.LlamaForCausalLM,), {"forward": ns["forward"]})
    torch.manual_seed(0)
    return cls(transformers.LlamaConfig(**_SMALL)), src


@pytest.mark.parametrize("kind", sorted(_UNKNOWN_TRANSFORMS))
def test_unknown_logit_transform_is_refused(monkeypatch, kind):
    """Anything else the forward does to the logits before the loss refuses the
    fused path (naming the line) instead of training on another loss; so does
    a forward whose source cannot be read.  fused_linear=False works."""
    model, src = _unknown_transform_model(kind)
    with pytest.raises(ValueError, match="cannot tell what .*forward does to the output of its output embedding "
                                         "self.lm_head .*source of .*forward cannot be read.*fused_linear=False"):
        gt.apply_gpuloss(model)
    real = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda obj: src if getattr(obj, "__name__", "") == "forward"
                        and obj.__code__.co_filename == f"<{kind}>" else real(obj))
    with pytest.raises(ValueError, match=f"at: {_UNKNOWN_TRANSFORMS[kind][1]}.*fused_linear=False"):
        gt.apply_gpuloss(model)
    gt.apply_gpuloss(model, fused_linear=False)


# ---------------------------------------------------------------- behaviour

def test_fused_training_has_no_logits_and_eval_is_unchanged(rng):
    base = _model("llama")
    ids, labels = _batch(rng)
    model = _patched(base, "fused")
    out = model(input_ids=ids, labels=labels)
    assert type(out) is transformers.modeling_outputs.CausalLMOutputWithPast
    assert out.logits is None and "logits" not in out.keys() and out.loss.dtype == torch.float32
    tup = model(input_ids=ids, labels=labels, return_dict=False)
    want_tup = copy.deepcopy(base)(input_ids=ids, labels=labels, return_dict=False)
    # the unpatched model's positions, (loss, logits, past_key_values), with None for the logits
    assert isinstance(tup, tuple) and len(tup) == len(want_tup) == 3 and tup[1] is None
    assert [type(x) for x in tup[2:]] == [type(x) for x in want_tup[2:]]
    torch.testing.assert_close(tup[0], out.loss)
    # without labels, in eval mode or without gradients: the model's own forward, logits included
    ref = copy.deepcopy(base)
    want = ref(input_ids=ids, labels=labels)
    torch.testing.assert_close(model(input_ids=ids).logits, want.logits)
    with torch.no_grad():
        o = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(o.logits, want.logits)
    torch.testing.assert_close(o.loss, want.loss.detach(), rtol=2e-6, atol=2e-6)
    model.eval()
    o = model(input_ids=ids, labels=labels)
    assert o.logits is not None
    torch.testing.assert_close(o.loss, want.loss, rtol=2e-6, atol=2e-6)
    # generation runs the unchanged forward
    model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)


def test_instance_only_and_idempotent(rng):
    """apply_gpuloss touches this instance: no class, no LOSS_MAPPING; twice is once;
    fused_linear=False afterwards restores the class's forward."""
    mapping = dict(loss_utils.LOSS_MAPPING)
    cls_forward = transformers.LlamaForCausalLM.forward
    base = _model("llama")
    ids, labels = _batch(rng)
    model = _patched(base, "fused")
    fwd, lossfn, head_fwd = model.forward, model.loss_function, model.lm_head.forward
    assert gt.apply_gpuloss(model) is model
    assert model.forward is fwd and model.loss_function is lossfn and model.lm_head.forward is head_fwd
    assert dict(loss_utils.LOSS_MAPPING) == mapping
    assert transformers.LlamaForCausalLM.forward is cls_forward
    assert inspect.signature(model.forward) == inspect.signature(base.forward)
    other = copy.deepcopy(base)
    assert other.loss_function is loss_utils.ForCausalLMLoss and other(input_ids=ids, labels=labels).logits is not None
    assert model(input_ids=ids, labels=labels).logits is None
    gt.apply_gpuloss(model, fused_linear=False)
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    assert model.loss_function is lossfn
    assert model(input_ids=ids, labels=labels).logits is not None
    gt.apply_gpuloss(model, chunk_size=5)
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, other(input_ids=ids, labels=labels).loss,
                               rtol=2e-6, atol=2e-6)


def test_deepcopy_and_from_pretrained(rng, tmp_path):
    """A deep copy of a patched model is patched itself (its forward is its
    own); save_pretrained + AutoGpulossForCausalLM.from_pretrained gives back a
    patched model with the same loss."""
    model = _patched(_model("llama_tied"), "fused")
    ids, labels = _batch(rng)
    twin = copy.deepcopy(model)
    twin(input_ids=ids, labels=labels).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert twin.model.embed_tokens.weight.grad is not None
    model.save_pretrained(tmp_path)
    loaded = gt.AutoGpulossForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    loaded.train()
    assert isinstance(loaded.__dict__.get("_gpuloss"), gt._State)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    out = loaded(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, model(input_ids=ids, labels=labels).loss, rtol=1e-6, atol=1e-6)
    m2, info = gt.AutoGpulossForCausalLM.from_pretrained(tmp_path, output_loading_info=True, fused_linear=False)
    assert m2.__dict__["_gpuloss"].options.fused_linear is False and isinstance(info, dict)


def test_for_causal_lm_loss_bf16_is_fp32_without_fp32_logits(rng):
    """bf16 logits: the loss is fp32 and equals transformers' (which upcasts the
    logits to fp32 first); no fp32 tensor of the logits' size is made (the Triton
    kernels, in the interpreter here, read bf16 directly)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gpuloss import dispatch
    if not dispatch.backend_status()["triton"][0] or not dispatch.get_backend("triton").accepts("torch", "cpu"):
        pytest.skip("triton backend not available on CPU tensors (set TRITON_INTERPRET=1)")

    class FP32Allocations(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.hits = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor) and o.dtype == torch.float32 and o.numel() >= self.numel:
                    self.hits.append(str(func))
            return out

    logits = torch.from_numpy(rng.standard_normal((B, T, V)) * 3).to(torch.bfloat16).requires_grad_()
    _, labels = _batch(rng)
    with FP32Allocations(B * T * V) as hf_mode:
        want = loss_utils.ForCausalLMLoss(logits, labels, V, num_items_in_batch=torch.tensor(13))
    assert hf_mode.hits, "the detector sees transformers' fp32 upcast"
    with FP32Allocations(B * T * V) as mode:
        got = gt.ForCausalLMLoss(logits, labels, V, num_items_in_batch=torch.tensor(13), backend="triton")
    assert mode.hits == []
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    assert g_got.dtype == torch.bfloat16
    torch.testing.assert_close(g_got.float(), g_want.float(), rtol=1.6e-2, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_triton_backend_in_the_model(rng, mode):
    """The same training step through the Triton kernels (interpreter on CPU)."""
    from gpuloss import dispatch
    if not dispatch.backend_status()["triton"][0] or not dispatch.get_backend("triton").accepts("torch", "cpu"):
        pytest.skip("triton backend not available on CPU tensors (set TRITON_INTERPRET=1)")
    base = _model("qwen2")
    batches = [_batch(rng, b=1, t=8)]
    ref = _train(copy.deepcopy(base), batches, "sgd")
    got = _train(_patched(base, mode, backend="triton", chunk_size=3), batches, "sgd")
    _assert_same_training(ref, got)


def test_cpu_autocast_bf16(rng):
    """Under autocast the fused loss uses the operands autocast's lm_head would
    (bf16 here) and computes the cross-entropy in fp32, as torch's autocast
    does: the loss equals the unpatched model's to fp32 rounding; the
    gradients come from bf16 matmuls in both (scaled before them there,
    after them here): equal at bf16 precision."""
    base = _model("llama")
    ids, labels = _batch(rng)
    got_model, ref_model = _patched(base, "fused"), copy.deepcopy(base)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = got_model(input_ids=ids, labels=labels).loss
        ref = ref_model(input_ids=ids, labels=labels).loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    got.backward()
    ref.backward()
    torch.testing.assert_close(got_model.lm_head.weight.grad, ref_model.lm_head.weight.grad, rtol=5e-2, atol=2e-3)


# ---------------------------------------------------------------- errors

def test_clear_errors():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        gt.apply_gpuloss(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="before torch.compile"):
        gt.apply_gpuloss(torch.compile(_model("llama")))
    torch.manual_seed(0)
    cfg = _config("llama")
    cfg.pad_token_id = 0
    other = _model("llama")
    other.loss_type = "ForSegmentation"  # a loss gpuloss does not replace
    with pytest.raises(ValueError, match="masked-LM, sequence, token and question-answering heads; LlamaForCausalLM "
                                         "has loss_type='ForSegmentation'"):
        gt.apply_gpuloss(other)
    base = transformers.LlamaModel(_config("llama"))  # a base model: no lm_head
    with pytest.raises(ValueError, match="LlamaModel.forward does not compute its loss with self.loss_function.*"
                                         "without an output embedding.*AutoModelForCausalLM"):
        gt.apply_gpuloss(base)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64,
                                                                       num_layers=1, num_heads=4))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        gt.apply_gpuloss(t5)
    class NoLabels(type(_model("llama"))):  # a head that computes no loss (transformers' draft-model assistants)
        def forward(self, input_ids=None, attention_mask=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="NoLabels.forward does not compute its loss with self.loss_function.*"
                                         "takes no labels and computes no loss"):
        gt.apply_gpuloss(NoLabels(_config("llama")))
    model = _model("llama")
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, V))
    with pytest.raises(ValueError, match="torch.nn.Linear.*Sequential"):
        gt.apply_gpuloss(model)
    gt.apply_gpuloss(model, fused_linear=False)  # any head works without the fused path

    class AdapterLinear(torch.nn.Linear):  # as peft's LoRA layer on lm_head: a Linear with its own forward
        def forward(self, x):
            return super().forward(x) * 2

    model = _model("llama")
    model.lm_head = AdapterLinear(32, V, bias=False)
    with pytest.raises(ValueError, match=r"plain torch.nn.Linear.*test_transformers.*AdapterLinear \(a torch.nn.Linear "
                                         r"subclass with its own forward"):
        gt.apply_gpuloss(model)
    model = _model("llama")
    FullyShardedDataParallel = type("FullyShardedDataParallel", (torch.nn.Module,), {})  # FSDP1's wrapper, by name
    model.lm_head = FullyShardedDataParallel()
    with pytest.raises(ValueError, match="FSDP wrapped lm_head as a unit of its own: keep it out of the auto_wrap"):
        gt.apply_gpuloss(model)
    model = _model("llama")
    model.base_model_prefix = "decoder"
    model.backbone = model.model
    del model.model
    with pytest.raises(ValueError, match="no base model.*'decoder'"):
        gt.apply_gpuloss(model)
    model = _model("llama")
    model.loss_function = lambda *a, **k: 0.0
    with pytest.raises(ValueError, match="already has its own loss_function"):
        gt.apply_gpuloss(model)
    model = _model("llama")
    for kw, exc in [(dict(z_loss=-1.0), ValueError), (dict(chunk_size=0), ValueError),
                    (dict(chunk_size=2.5), TypeError), (dict(backend="nope"), ValueError),
                    (dict(fused_linear=1), TypeError)]:
        with pytest.raises(exc):
            gt.apply_gpuloss(model, **kw)


def test_errors_at_call_time(rng):
    model = _patched(_model("llama"), "fused")
    ids, labels = _batch(rng)
    with pytest.raises(ValueError, match="label positions.*logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=3)
    with pytest.raises(ValueError, match="outside \\[0, 67\\)"):
        model(input_ids=ids, labels=torch.full_like(labels, V))
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, V))  # replaced after apply_gpuloss
    with pytest.raises(ValueError, match="torch.nn.Linear.*Sequential"):
        model(input_ids=ids, labels=labels)


def test_forward_replaced_by_another_library_is_named(rng):
    """A library that replaced model.forward with its own loss (TRL's fused lm
    head: functools.wraps gives the wrapper the model's names) before
    apply_gpuloss: the error named the model's forward only; it now names the
    wrapper's code and file."""
    import functools
    model = _model("llama")
    ids, labels = _batch(rng)
    inner = model.forward

    @functools.wraps(inner)
    def own_loss_forward(input_ids=None, labels=None, **kwargs):  # the head's weight read directly, as TRL's
        hidden = model.model(input_ids=input_ids).last_hidden_state
        logits = F.linear(hidden, model.lm_head.weight)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss)

    model.forward = own_loss_forward
    gt.apply_gpuloss(model)
    with pytest.raises(RuntimeError, match=r"replaced by test_forward_replaced_by_another_library_is_named.<locals>"
                                           r".own_loss_forward in .*test_transformers.py"):
        model(input_ids=ids, labels=labels)


@pytest.mark.parametrize("how", ["resize_token_embeddings", "set_output_embeddings"])
def test_head_replaced_after_apply_is_followed(rng, how):
    """The head is looked up at each fused call (get_output_embeddings()): one
    that resize_token_embeddings (untied) or set_output_embeddings put in
    after apply_gpuloss trains as in the unpatched model, in fp64; the old one
    is left as it was."""
    base = _model("llama", dtype=torch.float64)
    ids, labels = _batch(rng)
    ref_model, model = copy.deepcopy(base), _patched(base, "fused")
    old = model.lm_head
    for m in (ref_model, model):
        torch.manual_seed(1)  # the same new rows
        if how == "resize_token_embeddings":
            m.resize_token_embeddings(V + 5, mean_resizing=False)
        else:
            m.set_output_embeddings(torch.nn.Linear(32, V, bias=True, dtype=torch.float64))
    assert model.lm_head is not old
    ref = _ref_loss(ref_model(input_ids=ids).logits, labels)
    ref.backward()
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-12, atol=1e-12)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")
    assert old(torch.ones(1, 32, dtype=torch.float64)).shape == (1, V)


@pytest.mark.parametrize("hook", ["forward", "backward", "global_forward"])
def test_hooked_head_runs_itself(rng, hook):
    """A hook on lm_head's output or gradient must see the real logits: the
    fused path would hand it an empty tensor and ignore what it returns.
    With a hook the call runs the head as itself (the unpatched model's
    logits, loss and gradients, in fp64), with one warning; without, fused."""
    base = _model("llama", dtype=torch.float64)
    ids, labels = _batch(rng)
    seen = {}

    def halve(module, args, out):
        seen[id(module)] = tuple(out.shape)
        return out / 2

    def double_grad(module, grad_in, grad_out):
        return (grad_in[0] * 2,)

    results = []
    for m in (copy.deepcopy(base), _patched(base, "fused")):
        if hook == "forward":
            handle = m.lm_head.register_forward_hook(halve)
        elif hook == "backward":
            handle = m.lm_head.register_full_backward_hook(double_grad)
        else:
            handle = torch.nn.modules.module.register_module_forward_hook(
                lambda mod, a, o: halve(mod, a, o) if mod is m.lm_head else None)
        try:
            if isinstance(m.__dict__.get("_gpuloss"), gt._State):
                with pytest.warns(UserWarning, match="lm_head has .*hooks; this call computes the full logits") as told:
                    out = m(input_ids=ids, labels=labels)
                assert [w.filename for w in told if "lm_head" in str(w.message)] == [__file__]  # the caller's line
                assert out.logits is not None
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # told once
                    m(input_ids=ids, labels=labels)
            else:
                out = m(input_ids=ids, labels=labels)
                out = type(out)(loss=_ref_loss(out.logits, labels), logits=out.logits)
            out.loss.backward()
        finally:
            handle.remove()
        results.append((out.loss.detach(), out.logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
        if hook != "backward":
            assert seen.pop(id(m.lm_head)) == (B, T, V)
    (want, want_logits, want_g), (got, got_logits, got_g) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=0)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-10, atol=1e-12, msg=lambda msg: f"{n}: {msg}")
    # without the hook the next call is fused again
    assert m(input_ids=ids, labels=labels).logits is None


@pytest.mark.parametrize("order", ["offload_then_patch", "patch_then_offload"])
def test_offloaded_head(rng, order):
    """accelerate's offloading (``cpu_offload``; ``device_map`` with "cpu" or
    "disk" entries) keeps lm_head's weight on the meta device and loads it
    only inside the head's call.  Offloaded before the patch, the head's
    call is outside gpuloss's: the weight is meta there, so the head runs
    itself (full logits, one warning).  Offloaded after, the hook loads the
    weight around gpuloss's forward, which keeps the loaded tensors for the
    fused loss.  Loss and input gradients equal the unpatched model's (fp64)."""
    accelerate = pytest.importorskip("accelerate")
    base = _model("llama", dtype=torch.float64)
    ids, labels = _batch(rng)
    got = []
    for patch in (False, True):
        m = copy.deepcopy(base)
        if patch and order == "patch_then_offload":
            gt.apply_gpuloss(m)
        accelerate.cpu_offload(m, execution_device=torch.device("cpu"))
        if patch and order == "offload_then_patch":
            gt.apply_gpuloss(m)
        assert m.lm_head.weight.is_meta
        emb = base.model.embed_tokens(ids).detach().requires_grad_()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = m(inputs_embeds=emb, labels=labels)
        told = [w for w in seen if "meta device" in str(w.message)]
        assert len(told) == (patch and order == "offload_then_patch")
        if patch:
            assert (out.logits is None) == (order == "patch_then_offload")
            loss = out.loss
        else:
            loss = _ref_loss(out.logits, labels)
        loss.backward()
        got.append((loss.detach(), emb.grad))
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-10, atol=1e-13)


def test_head_shared_by_two_patched_models(rng):
    """Two patched models sharing one lm_head module (a draft or reference
    model reusing the base model's head): each call wires the head to the
    model that calls, so both train as the unpatched model."""
    base = _model("llama", dtype=torch.float64)
    ids, labels = _batch(rng)
    want = _ref_loss(copy.deepcopy(base)(input_ids=ids).logits, labels)
    a = _patched(base, "fused")
    b = copy.deepcopy(base)
    b.lm_head = a.lm_head
    gt.apply_gpuloss(b)
    for m in (b, a, b):
        out = m(input_ids=ids, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)


def _replica(module, memo, scale: float):
    """torch.nn.parallel.replicate without devices: each module's
    _replicate_for_data_parallel (a shallow copy of __dict__), given its own
    parameters (here the original's times ``scale``)."""
    r = module._replicate_for_data_parallel()
    memo[module] = r
    for k, p in module._parameters.items():
        r._parameters[k] = None if p is None else (p.detach() * scale).requires_grad_()
    for k, c in module._modules.items():
        if c is not None:
            r._modules[k] = memo[c] if c in memo else _replica(c, memo, scale)
    return r


@pytest.mark.parametrize("train", [True, False])
def test_data_parallel_replica_runs_its_own_weights(rng, train):
    """nn.DataParallel's replicas copy each module's __dict__, gpuloss's
    forwards included: a replica must run its own forward on its own weights
    (and hand over in its own state: replicas run in threads at once), as the
    unpatched model's replica does."""
    base = _model("llama", dtype=torch.float64).train(train)
    ids, labels = _batch(rng)
    model = _patched(base, "fused").train(train)
    want = _ref_loss(_replica(base, {}, 0.5)(input_ids=ids).logits, labels)
    rep = _replica(model, {}, 0.5)
    out = rep(input_ids=ids, labels=labels)
    assert (out.logits is None) == train
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-12)
    assert rep._gpuloss is not model._gpuloss and model._gpuloss.head is model.lm_head
    assert model(input_ids=ids, labels=labels).loss.item() != pytest.approx(out.loss.item())


def test_accelerate_unwrap_model_without_fp32_wrapper(rng):
    """accelerate's prepare(mixed_precision=...) wraps model.forward in its
    autocast / fp32-output wrappers; unwrap_model(keep_fp32_wrapper=False)
    follows __wrapped__ down to gpuloss's forward and binds it as a method of
    the model (the model arrives as an extra first argument): training,
    eval and generate still work, and apply_gpuloss restores the forward."""
    pytest.importorskip("accelerate")
    from accelerate.utils import convert_outputs_to_fp32, extract_model_from_parallel

    base = _model("llama")
    ids, labels = _batch(rng)
    model = _patched(base, "fused")
    sig = inspect.signature(model.forward)
    # Accelerator.prepare's wrapping of a forward without __func__ (accelerator.py, native_amp)
    model._original_forward = model.forward
    model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = copy.deepcopy(base)(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, want, rtol=1e-6, atol=1e-6)
    model = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    assert inspect.ismethod(model.__dict__["forward"])  # what accelerate leaves
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, copy.deepcopy(base)(input_ids=ids, labels=labels).loss,
                               rtol=2e-6, atol=2e-6)
    out = model(ids, None, None, None, None, labels)  # positional labels
    assert out.logits is None
    model.eval()
    model.generate(ids[:1, :3], max_new_tokens=2, do_sample=False)
    gt.apply_gpuloss(model)
    assert not inspect.ismethod(model.__dict__["forward"]) and inspect.signature(model.forward) == sig


def test_fsdp2_head_as_its_own_unit_is_refused(rng, tmp_path):
    """FSDP2 (gloo, one process): with lm_head in the root's unit the fused
    loss and gradients equal the unpatched model's; with lm_head sharded as
    a unit of its own (its weight resharded before the loss reads it) the
    fused call says how to shard instead of failing inside the loss."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    from torch.distributed.fsdp import fully_shard

    ids, labels = _batch(rng)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for split_head in (False, True):
            ref, model = _model("llama"), _patched(_model("llama"), "fused")
            for m in (ref, model):
                for layer in m.model.layers:
                    fully_shard(layer)
                if split_head:
                    fully_shard(m.lm_head)
                fully_shard(m)
            if split_head:
                with pytest.raises(RuntimeError, match="FSDP unit of its own.*not fully_shard\\(model.lm_head\\)"):
                    model(input_ids=ids, labels=labels)
                gt.apply_gpuloss(model, fused_linear=False)
            want, out = ref(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
            want.loss.backward()
            out.loss.backward()
            torch.testing.assert_close(out.loss, want.loss, rtol=2e-6, atol=2e-6)
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p.grad.full_tensor(), q.grad.full_tensor(), rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{n}: {m}")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- Trainer

def _trainer_run(model, tmp_path, rng_seed: int):
    """Two optimizer steps of Trainer with gradient_accumulation_steps=2 (four
    micro-batches of 2): the logged losses, the final weights, and what Trainer
    decided about the model's loss kwargs."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for _ in range(8):
        ids, labels = _batch(rng, b=1, mask_first=False)
        rows.append({"input_ids": ids[0], "labels": labels[0]})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=1e-3, adam_epsilon=ADAMW_EPS, lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   data_collator=transformers.default_data_collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = (trainer.model_accepts_loss_kwargs, getattr(trainer, "_loss_shifts_labels", None))
    return losses, weights, seen


_TRAINER_SEED = 1234


@pytest.fixture(scope="module")
def trainer_reference(tmp_path_factory):
    """The unpatched model under Trainer (computed once for the tests below)."""
    base = _model("llama")
    return base, _trainer_run(copy.deepcopy(base), tmp_path_factory.mktemp("ref"), _TRAINER_SEED)


@pytest.mark.parametrize("mode", MODES)
def test_trainer_gradient_accumulation_equals_unpatched(trainer_reference, tmp_path, mode):
    """Trainer sees the patched model exactly as the unpatched one (it takes loss
    kwargs; its loss shifts labels, so num_items_in_batch is counted over
    labels[..., 1:]): equal logged losses and final weights."""
    base, (ref_losses, ref_w, ref_seen) = trainer_reference
    losses, w, seen = _trainer_run(_patched(base, mode), tmp_path, _TRAINER_SEED)
    assert seen == ref_seen == (True, True)
    assert len(losses) == len(ref_losses) == 2
    _assert_same_training((torch.tensor(ref_losses), ref_w), (torch.tensor(losses), w))


def test_trainer_trap_replacing_loss_mapping(trainer_reference, tmp_path, monkeypatch):
    """Why apply_gpuloss leaves LOSS_MAPPING alone: with its ForCausalLM entry
    replaced, Trainer no longer knows the loss shifts labels, counts the first
    label of every row in num_items_in_batch, and logs a different loss.  (The
    test above would catch a patch that did this.)"""
    base, (ref_losses, _, _) = trainer_reference
    monkeypatch.setitem(loss_utils.LOSS_MAPPING, "ForCausalLM", gt.ForCausalLMLoss)
    losses, _, seen = _trainer_run(copy.deepcopy(base), tmp_path, _TRAINER_SEED)
    assert seen == (True, False)
    assert not np.allclose(losses, ref_losses, rtol=1e-3)


# ---------------------------------------------------------------- torch.compile

def _breaks(model, ids, labels):
    """(graph breaks in all, those with a gpuloss frame on their stack)."""
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(input_ids=ids, labels=labels)
    ours = [r for r in ex.break_reasons if any("gpuloss" in f.filename for f in r.user_stack)]
    return ex.graph_break_count, ours


@pytest.mark.parametrize("mode", ["fused", "ce"])
def test_compile_adds_no_graph_breaks(rng, mode):
    """A training forward under torch.compile: no graph break comes from gpuloss.

    The unpatched model is explained first: where transformers itself traces
    without a break (Llama here), the patched model must compile with
    fullgraph=True (any break is then ours, and the first one raises at once);
    otherwise the patched model must break exactly where the unpatched one does."""
    base = _model("llama")
    ids, labels = _batch(rng)
    ref_total, ref_ours = _breaks(copy.deepcopy(base), ids, labels)
    assert ref_ours == []
    model = _patched(base, mode)
    if ref_total:
        total, ours = _breaks(model, ids, labels)
        assert [r.reason.splitlines()[0] for r in ours] == []
        assert total == ref_total
        return
    torch._dynamo.reset()
    try:
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, labels=labels)
    except torch._dynamo.exc.Unsupported as e:
        pytest.fail(f"a graph break in the patched model: {e}")
    assert (out.logits is None) == (mode == "fused")


def test_fused_path_traces_apart_from_linear_cross_entropy(rng, monkeypatch):
    """The fused path's own code (the capture in lm_head, the hand-over to
    loss_function, the rebuilt output) compiles with fullgraph=True once the
    linear cross-entropy itself traces: stood in for here by the same loss in
    plain torch.  What is left for issue 13 is gpuloss.linear_cross_entropy."""
    def plain(hidden, weight, target, bias, *, ignore_index, reduction, z_loss, softcap, chunk_size, backend):
        z = F.linear(hidden, weight, bias)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction)

    monkeypatch.setattr(gt, "_linear_cross_entropy", plain)
    base = _model("gemma2")
    ids, labels = _batch(rng)
    want = copy.deepcopy(base)(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(9))
    torch._dynamo.reset()
    model = _patched(base, "fused")
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, labels=labels,
                                                                    num_items_in_batch=torch.tensor(9))
    assert out.logits is None
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None


@pytest.mark.parametrize("mode", MODES)
def test_compiled_training_equals_eager(rng, mode):
    """torch.compile(model) of the patched model: two SGD steps equal eager."""
    base = _model("gemma2")
    batches = [_batch(rng) for _ in range(2)]
    eager = _train(_patched(base, mode), batches, "sgd")
    torch._dynamo.reset()
    model = _patched(base, mode)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for ids, labels in batches:
        opt.zero_grad(set_to_none=True)
        out = compiled(input_ids=ids, labels=labels)
        assert (out.logits is None) == (mode == "fused")
        out.loss.backward()
        opt.step()
        losses.append(out.loss.detach())
    got = torch.stack(losses), {n: p.detach().clone() for n, p in model.named_parameters()}
    _assert_same_training(eager, got)


def test_for_causal_lm_loss_compiles_fullgraph(rng):
    """ForCausalLMLoss under fullgraph=True: no host read anywhere (a .item()
    would break the graph), num_items_in_batch a device tensor."""
    logits = torch.from_numpy(rng.standard_normal((B, T, V))).float().requires_grad_()
    _, labels = _batch(rng)
    n = torch.tensor(11)
    torch._dynamo.reset()
    fn = torch.compile(gt.ForCausalLMLoss, fullgraph=True, backend="aot_eager")
    got = fn(logits, labels, V, num_items_in_batch=n)
    want = gt.ForCausalLMLoss(logits, labels, V, num_items_in_batch=n)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, logits)[0], torch.autograd.grad(want, logits)[0])


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_llama_matches_unpatched(rng, mode):
    """On the GPU (Triton kernels, several chunks): three AdamW steps in fp32
    equal the unpatched model's, and one bf16 step agrees at bf16 precision
    with the loss in fp32."""
    base = _model("llama").cuda()
    batches = [tuple(t.cuda() for t in _batch(rng, b=4, t=32)) for _ in range(3)]
    ref = _train(copy.deepcopy(base), batches)
    got = _train(_patched(base, mode, chunk_size=48), batches)
    _assert_same_training(ref, got)
    half = base.to(torch.bfloat16)
    ids, labels = batches[0]
    ref_model, model = copy.deepcopy(half), _patched(half, mode, chunk_size=48)
    want, out = ref_model(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    assert out.loss.dtype == want.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-2, atol=1e-2)
    out.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(model.lm_head.weight.grad.float(), ref_model.lm_head.weight.grad.float(),
                               rtol=5e-2, atol=5e-3)


def test_hf_step_bench_dry_run():
    """bench/hf_step.py's CPU dry run (--device cpu --tiny): every variant runs
    or says why not, and the losses agree."""
    from gpuloss.bench import hf_step
    result = hf_step.run("cpu", tiny=True, batch=1, seq=16, layers=2, steps=1,
                         variants=["unpatched", "gpuloss", "gpuloss-ce", "liger"])
    rows = {r["variant"]: r for r in result["rows"]}
    assert [rows[v]["status"] for v in ("unpatched", "gpuloss", "gpuloss-ce")] == ["ok"] * 3
    assert rows["liger"]["status"] == "ok" or rows["liger"]["status"].startswith("n/a")
    assert rows["gpuloss"]["logits"] == "none" and rows["unpatched"]["logits"] == "kept"
    assert rows["gpuloss"]["loss_rel_diff"] < 1e-5 and rows["gpuloss"]["grad_norm_rel_diff"] < 1e-5
    assert "| gpuloss |" in hf_step.table(result)


# ---------------------------------------------------------------- the other heads

def _head_model(kind: str, seed: int = 0, **cfg):
    torch.manual_seed(seed)
    if kind == "mlm":
        c = transformers.ModernBertConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                          global_attn_every_n_layers=1, local_attention=8, **cfg)
        return transformers.ModernBertForMaskedLM(c).train()
    if kind == "vit":
        c = transformers.ViTConfig(image_size=8, patch_size=4, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4, **cfg)
        return transformers.ViTForImageClassification(c).train()
    c = _config("llama")
    c.pad_token_id = 0
    for k, v in cfg.items():
        setattr(c, k, v)
    cls = {"seq": transformers.LlamaForSequenceClassification, "token": transformers.LlamaForTokenClassification,
           "qa": transformers.LlamaForQuestionAnswering}[kind]
    return cls(c).train()


def _head_cases():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (B, T), generator=g)
    mlm = torch.full((B, T), -100)
    mlm[:, ::3] = ids[:, ::3]
    tok = torch.randint(0, 5, (B, T), generator=g)
    tok[0, :4] = -100
    return [
        ("mlm", "mlm", {}, dict(input_ids=ids, labels=mlm)),
        ("mlm num_items", "mlm", {}, dict(input_ids=ids, labels=mlm, num_items_in_batch=torch.tensor(11))),
        ("image", "vit", dict(num_labels=3), dict(pixel_values=torch.randn(B, 3, 8, 8, generator=g),
                                                  labels=torch.tensor([1, 2]))),
        ("single label", "seq", dict(num_labels=3), dict(input_ids=ids, labels=torch.tensor([2, 0]))),
        ("regression", "seq", dict(num_labels=1), dict(input_ids=ids, labels=torch.tensor([0.5, -1.25]))),
        ("regression 2", "seq", dict(num_labels=2), dict(input_ids=ids, labels=torch.randn(B, 2, generator=g))),
        ("multi label", "seq", dict(num_labels=3), dict(input_ids=ids, labels=torch.tensor([[1., 0, 1], [0, 0, 1]]))),
        ("token", "token", dict(num_labels=5), dict(input_ids=ids, labels=tok)),
        ("qa", "qa", {}, dict(input_ids=ids, start_positions=torch.tensor([3, T + 4]),
                              end_positions=torch.tensor([[5], [1]]))),
    ]


@pytest.mark.parametrize("case", _head_cases(), ids=lambda c: c[0])
def test_other_heads_replace_their_loss_function(case):
    """Masked-LM, sequence-classification (all three problem types), token-
    classification and question-answering models whose forward calls
    ``self.loss_function`` were refused ("apply_gpuloss replaces a causal
    LM's loss").  apply_gpuloss now replaces their loss function with
    gpuloss's form of transformers' (the fused path is for causal LMs): the
    same loss and gradients as the unpatched model, the same
    ``config.problem_type`` set on the first call."""
    name, kind, cfg, inputs = case
    ref = _head_model(kind, **cfg)
    got = gt.apply_gpuloss(copy.deepcopy(ref))
    assert isinstance(got.loss_function, __import__("functools").partial)
    assert got.loss_function.func.__module__ == gt.__name__
    torch.manual_seed(5)  # the same dropout masks (the token classifier's)
    want_loss = ref(**inputs).loss
    torch.manual_seed(5)
    got_loss = got(**inputs).loss
    assert got_loss.dtype == want_loss.dtype
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got.config.problem_type == ref.config.problem_type
    want_loss.backward()
    got_loss.backward()
    for (n, p), q in zip(ref.named_parameters(), got.parameters()):
        if p.grad is None:
            assert q.grad is None, n
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)
    gt.apply_gpuloss(got, z_loss=0.0)  # again, the same options: still gpuloss's
    assert got.loss_function.func.__module__ == gt.__name__


def test_other_heads_options_and_refusals():
    """z_loss reaches the cross-entropy heads; the options that only a causal
    LM has are refused by name, as is a z-loss on a loss that is not a
    cross-entropy, and a head whose forward builds its own loss module."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    model = gt.apply_gpuloss(_head_model("mlm"), z_loss=1e-2)
    out = model(input_ids=ids, labels=labels)
    logits = out.logits.detach()
    z = torch.logsumexp(logits.double(), -1).reshape(-1)
    want = F.cross_entropy(logits.double().reshape(-1, V), labels.reshape(-1)) + 1e-2 * (z ** 2).mean()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fused_linear=True.*ModernBertForMaskedLM is not a causal LM"):
        gt.apply_gpuloss(_head_model("mlm"), fused_linear=True)
    with pytest.raises(ValueError, match="chunk_size.*ModernBertForMaskedLM has none"):
        gt.apply_gpuloss(_head_model("mlm"), chunk_size=64)
    reg = gt.apply_gpuloss(_head_model("seq", num_labels=1), z_loss=1e-3)
    with pytest.raises(ValueError, match="z_loss=0.001.*regression's mean squared error"):
        reg(input_ids=ids, labels=torch.tensor([0.5, 1.0]))
    bert_mlm = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match="BertForMaskedLM.forward does not compute its loss with "
                                         "self.loss_function.*ForMaskedLM model whose forward builds its own loss"):
        gt.apply_gpuloss(bert_mlm)
