"""The loss from hidden states: equal to `combined_loss` on the logits, in value and gradients,
and `batch_loss(loss_from="hidden")` equal to the logits path on tiny real models."""

from __future__ import annotations

import pytest
import torch

from fusion_ray.trainer.losses import batch_loss, combined_loss, combined_loss_from_hidden, hidden_path


def _inputs(seed: int, b: int = 3, length: int = 9, h: int = 6, v: int = 23, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.7
    bias = torch.randn(v, generator=g) * 0.3
    ids = torch.randint(0, v, (b, length), generator=g)
    mask = torch.rand(b, length - 1, generator=g) > 0.3
    n = int(mask.sum())
    teacher = torch.log_softmax(torch.randn(n, v, generator=g) * 3, -1).topk(k)
    lp = teacher.values.clone()
    lp[::3, -1] = -float("inf")  # padding entries
    lp[1, :] = torch.log(torch.tensor([0.6, 0.3, 0.0999, 0.0001]))  # a tail of ~0: the bucket's clamp
    return hidden, weight, bias, ids, mask, teacher.indices, lp


def _grads(loss: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature, lam", [(1.0, 0.3), (2.0, 0.3), (0.7, 0.0), (1.5, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("chunk, with_bias, no_teacher", [(None, False, False), (4, True, True), (1, True, False),
                                                          (5, False, True)])
def test_hidden_loss_equals_the_logits_loss(tail, temperature, lam, chunk, with_bias, no_teacher):
    hidden, weight, bias, ids, mask, top_ids, lp = _inputs(7)
    n = int(mask.sum())
    fusion_mask = (torch.arange(n) % 3 != 1) if no_teacher else None  # every third position has no teacher
    kw = {"lambda_clm": lam, "tail": tail, "temperature": temperature, "fusion_mask": fusion_mask}
    leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    if with_bias:
        leaves.append(bias.clone().requires_grad_(True))
    logits = torch.nn.functional.linear(*leaves)
    want = combined_loss(logits, ids, mask, top_ids, lp, **kw)
    want_grads = _grads(want["loss"] * 1.7, *leaves)
    mine = [t.detach().clone().requires_grad_(True) for t in leaves]
    got = combined_loss_from_hidden(mine[0], mine[1], ids, mask, top_ids, lp, chunk=chunk,
                                    lm_head_bias=mine[2] if with_bias else None, **kw)
    got_grads = _grads(got["loss"] * 1.7, *mine)  # the upstream gradient is honoured
    for key in ("loss", "clm", "fusion"):
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-5, abs=1e-6), key
    for name, a, b in zip(("hidden", "weight", "bias"), got_grads, want_grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_all_masked_batch_gives_zero_loss_and_zero_gradients():
    hidden, weight, _, ids, mask, _, _ = _inputs(8)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    none = torch.zeros_like(mask)
    out = combined_loss_from_hidden(hidden, weight, ids, none, torch.zeros(0, 4, dtype=torch.long),
                                    torch.zeros(0, 4), lambda_clm=0.3)
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_unscored_positions_get_no_gradient_and_frozen_inputs_none():
    hidden, weight, _, ids, mask, top_ids, lp = _inputs(9)
    hidden.requires_grad_(True)  # the head is frozen (LoRA): no [V, H] gradient is computed
    out = combined_loss_from_hidden(hidden, weight, ids, mask, top_ids, lp, lambda_clm=0.5, chunk=2)
    out["loss"].backward()
    assert weight.grad is None
    scored = torch.zeros(ids.shape, dtype=torch.bool)
    scored[:, :-1] = mask
    assert hidden.grad[~scored].abs().sum() == 0 and hidden.grad[scored].abs().sum() > 0


# --- batch_loss on tiny real models ---------------------------------------------------------------


def _tiny(arch: str, vocab: int = 96):
    import transformers

    torch.manual_seed(0)
    common = {"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    elif arch == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, head_dim=8,
                                                                         final_logit_softcapping=5.0))
    else:
        raise ValueError(arch)
    return model.float().train()


def _batch(vocab: int, seed: int = 1, b: int = 3, length: int = 12, k: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (b, length), generator=g)
    attention_mask = torch.ones(b, length, dtype=torch.long)
    attention_mask[1, -3:] = 0  # a padded row
    loss_mask = torch.rand(b, length - 1, generator=g) > 0.4
    loss_mask[1, -3:] = False
    n = int(loss_mask.sum())
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=g) * 2, -1).topk(k)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "topk_ids": teacher.indices, "topk_logprobs": teacher.values,
            "transferred": torch.rand(n, generator=g) > 0.3}


def _run(model, batch, loss_from: str, **kw) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = batch_loss(model, batch, loss_from=loss_from, **kw)
    out["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {key: value.item() for key, value in out.items()}, grads


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "llama", "mistral"])
@pytest.mark.parametrize("tail, temperature, lam, positions", [("bucket", 1.0, 0.3, "all"),
                                                               ("renormalize", 2.0, 0.0, "transferred")])
def test_batch_loss_from_hidden_equals_from_logits(arch, tail, temperature, lam, positions):
    model = _tiny(arch)
    assert hidden_path(model) is not None, arch
    batch = _batch(model.config.vocab_size)
    kw = {"lam": lam, "tail": tail, "temperature": temperature, "fusion_positions": positions}
    want, want_grads = _run(model, batch, "logits", **kw)
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
    got, got_grads = _run(model, batch, "hidden", **kw)
    hook.remove()
    assert shapes == [(3, 1, model.config.vocab_size)], "the model's own head ran on one position only"
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_soft_capped_logits_fall_back_to_the_logits_path():
    model = _tiny("gemma2")
    assert hidden_path(model) is None
    batch = _batch(model.config.vocab_size)
    kw = {"lam": 0.3, "tail": "bucket", "temperature": 1.0, "fusion_positions": "all"}
    want, _ = _run(model, batch, "logits", **kw)
    got, _ = _run(model, batch, "hidden", **kw)
    assert got == want
    with pytest.raises(ValueError, match="loss_from"):
        batch_loss(model, batch, loss_from="logit", **kw)


def test_lora_model_takes_the_hidden_path():
    import peft
    model = _tiny("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    for p in lora.parameters():  # fresh LoRA B is zero: give the adapters something to carry
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    assert hidden_path(lora) is not None
    batch = _batch(model.config.vocab_size)
    kw = {"lam": 0.3, "tail": "bucket", "temperature": 1.0, "fusion_positions": "all"}
    want, want_grads = _run(lora, batch, "logits", **kw)
    got, got_grads = _run(lora, batch, "hidden", **kw)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert want_grads and got_grads.keys() == want_grads.keys()
    assert all("lora_" in name for name in got_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
