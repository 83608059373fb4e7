"""Tests for slimtune.measure.flops: counts against closed forms that can fail."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel, LlamaConfig, LlamaForCausalLM

from slimtune.measure.flops import analytic_linear_flops, eager_attention, flops_per_example

D, F, L, V = 32, 64, 2, 100


def tiny_bert(cls=BertModel, **kw):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=F, vocab_size=V, **kw)
    return cls(cfg)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=V, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def bert_layer_flops(t: int) -> int:
    """Q, K, V, O projections + FFN in/out on t tokens, plus Q K^T and A V."""
    return 2 * t * (4 * D * D + 2 * D * F) + 4 * t * t * D


def batch(b: int, t: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_bert_eager_count_equals_closed_form() -> None:
    model = tiny_bert()
    t = 16
    expected = L * bert_layer_flops(t) + 2 * D * D  # + pooler on the [CLS] token
    assert flops_per_example(model, batch(3, t)) == expected


def test_sequence_classifier_adds_its_head() -> None:
    model = tiny_bert(BertForSequenceClassification, num_labels=3)
    t = 12
    assert flops_per_example(model, batch(2, t)) == L * bert_layer_flops(t) + 2 * D * D + 2 * D * 3


def test_sdpa_model_is_counted_as_eager_and_restored() -> None:
    model = tiny_bert()
    model.config._attn_implementation_internal = "sdpa"
    t = 16
    eager = flops_per_example(model, batch(2, t))
    assert model.config._attn_implementation == "sdpa"
    assert eager == L * bert_layer_flops(t) + 2 * D * D
    # what the counter sees with the CPU sdpa kernel: the attention products are missing
    sdpa = flops_per_example(model, batch(2, t), eager=False)
    assert eager - sdpa == L * 4 * t * t * D


def test_eager_attention_context_restores_on_error() -> None:
    model = tiny_bert()
    before = model.config._attn_implementation
    with pytest.raises(ValueError):
        with eager_attention(model):
            assert model.config._attn_implementation == "eager"
            raise ValueError
    assert model.config._attn_implementation == before


def test_llama_count_equals_closed_form() -> None:
    model = tiny_llama()
    t, kv = 16, 16  # 2 kv heads of head_dim 8
    per_layer = 2 * t * (2 * D * D + 2 * D * kv + 3 * D * F) + 4 * t * t * D
    assert flops_per_example(model, {"input_ids": torch.randint(0, V, (2, t))}) == L * per_layer + 2 * t * D * V


def test_per_example_does_not_depend_on_batch_size() -> None:
    model = tiny_bert()
    assert flops_per_example(model, batch(1, 10)) == flops_per_example(model, batch(4, 10))


def test_state_is_left_alone() -> None:
    model = tiny_bert()
    model.train()
    model.encoder.eval()
    flops_per_example(model, batch(2, 8))
    assert model.training and not model.encoder.training and model.embeddings.training
    assert all(p.grad is None for p in model.parameters())


def test_int8_model_counts_like_float_twin() -> None:
    model = tiny_bert().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    inputs = batch(2, 16)
    float_count = flops_per_example(model, inputs)
    assert flops_per_example(qmodel, inputs) == float_count
    assert flops_per_example(qmodel, inputs, shapes_from=model) == float_count


def test_analytic_linear_flops() -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(5, 7, 8)  # 7 tokens per example
    assert analytic_linear_flops(mlp, 7) == 2 * 7 * (8 * 16 + 16 * 4)
    assert flops_per_example(mlp, x) == analytic_linear_flops(mlp, 7)
    model = tiny_bert()
    t = 16
    assert analytic_linear_flops(model.encoder, t) == L * (bert_layer_flops(t) - 4 * t * t * D)


def test_vit_count_equals_closed_form() -> None:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=D, num_hidden_layers=L,
                    num_attention_heads=4, intermediate_size=F, num_labels=3)
    model = ViTForImageClassification(cfg)
    t = 4 + 1  # 4 patches + [CLS]
    patch_embed = 2 * 4 * (1 * 4 * 4) * D  # the stride-4 conv, once per patch
    expected = L * bert_layer_flops(t) + patch_embed + 2 * D * 3  # classifier reads [CLS]
    assert flops_per_example(model, {"pixel_values": torch.randn(2, 1, 8, 8)}) == expected
