"""Small models with random weights for the swap tests and the end-to-end benchmark (nothing downloaded),
and the check that a swapped model computes what the original does.

The check follows the attention rule of ``tests/ops/test_attention.py`` (FlashAttention's): against
the unswapped model run in float64 as the exact answer, the swapped model's error on the output and
on every parameter gradient is at most twice the unswapped same-dtype model's error plus
``ATTENTION_ATOL``.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor, nn

from .tolerances import ATTENTION_ATOL

Forward = Callable[[nn.Module], Tensor]  # runs the model on fixed inputs, returns a float tensor


def tiny_llama(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 128,
               intermediate: int = 0, attn_implementation: str = "sdpa", seed: int = 0, **config) -> nn.Module:
    """A LLaMA-style ``LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU, GQA) from a small config."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 8 * hidden // 3,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=4096, attn_implementation=attn_implementation, **config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def tiny_gpt2(hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 128, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def tiny_mistral(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 128,
                 sliding_window: int = 8, seed: int = 0) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, sliding_window=sliding_window,
                        max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return MistralForCausalLM(cfg)


def tiny_qwen2(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 128,
               seed: int = 0) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def tiny_gemma2(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 128,
                final_logit_softcapping: float = 2.0, seed: int = 0) -> nn.Module:
    """Gemma 2 with a small final-logit softcap, so the tanh matters at random-init logit sizes, and no attention
    softcap (the swapped attention declines softcapping to transformers' SDPA path, which refuses it)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                       max_position_embeddings=256, final_logit_softcapping=final_logit_softcapping,
                       attn_logit_softcapping=None, attn_implementation="eager")  # transformers has no SDPA path for Gemma 2
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(cfg)

def tiny_vit(seed: int = 0) -> nn.Module:
    """timm ViT: 32x32 images, 8x8 patches, 2 blocks, 4 heads of 16."""
    import timm
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=2, num_heads=4, num_classes=10)


def tiny_encoder(d_model: int = 64, heads: int = 4, layers: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def outputs_and_grads(model: nn.Module, forward: Forward, seed: int = 1) -> Dict[str, Tensor]:
    """The output ("out") and every parameter's gradient of ``forward(model)`` against a fixed random
    output gradient, in float64."""
    model.zero_grad(set_to_none=True)
    out = forward(model)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    result = {"out": out.detach().double()}
    result.update({name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None})
    return result


def assert_swap_matches(original: nn.Module, swapped: nn.Module, forward: Forward,
                        dtype: torch.dtype = torch.float32) -> None:
    """``swapped`` (a swapped deep copy of ``original``) within the attention tolerance of ``original``."""
    exact = outputs_and_grads(copy.deepcopy(original).double(), forward)
    theirs = outputs_and_grads(original, forward)
    ours = outputs_and_grads(swapped, forward)
    assert ours.keys() == exact.keys(), sorted(set(exact) ^ set(ours))
    for name, e in exact.items():
        ours_err = (ours[name] - e).abs().max().item()
        torch_err = (theirs[name] - e).abs().max().item()
        assert ours_err <= 2 * torch_err + ATTENTION_ATOL[dtype], \
            f"{name}: error {ours_err:.3g} vs the unswapped model's {torch_err:.3g}"


def assert_identical(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def llama_batch(vocab: int, batch: int, length: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Token ids and next-token labels from a repeating pattern plus noise (learnable, so losses fall)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.arange(length + 1) * 7 % vocab
    noise = torch.randint(0, vocab, (batch, length + 1), generator=gen)
    keep = torch.rand(batch, length + 1, generator=gen) < 0.8
    tokens = torch.where(keep, base.expand(batch, -1), noise)
    return tokens[:, :-1], tokens[:, 1:]
