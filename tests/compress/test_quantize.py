"""int8 (torch.ao dynamic, per-channel) and quantisation-aware training."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.compress.qat import disable_fake_quant, enable_fake_quant, fake_quant_activation, fake_quant_weight
from slimtune.compress.quantize import int8_state, load_int8_state, quantize_int8
from slimtune.errors import SlimtuneError
from slimtune.recipe import validate_recipe
from slimtune.runner import train_run
from tests.fixtures import tiny_bert, token_batch


def test_fake_quant_weight_is_what_int8_conversion_stores():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    want = fake_quant_weight(linear.weight.detach())
    quantized = quantize_int8(torch.nn.Sequential(linear))[0]
    assert torch.allclose(quantized.weight().dequantize(), want, atol=1e-7)


def test_int8_state_round_trips_through_safetensors_tensors():
    model = quantize_int8(tiny_bert())
    state = int8_state(model)
    assert state["bert.encoder.layer.0.attention.self.query.weight"].dtype == torch.int8
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    rebuilt = load_int8_state(tiny_bert(), state)
    batch = token_batch()
    with torch.no_grad():
        assert torch.equal(rebuilt(**batch).logits, model(**batch).logits)
    with pytest.raises(SlimtuneError, match="missing"):
        load_int8_state(tiny_bert(), {k: v for k, v in state.items() if "key.weight_scale" not in k})


def lora_bert():
    from slimtune.core.arch import Arch
    from slimtune.methods.delta import Delta
    from slimtune.methods.lora import LoRAConfig
    from slimtune.recipe import MethodSpec

    model = tiny_bert()
    delta = Delta.from_specs([MethodSpec(name="lora", config=LoRAConfig(r=4))])
    delta.attach(model, Arch.of(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model, delta


def test_fake_quant_forward_quantises_the_effective_weight_and_trains_the_delta():
    model, delta = lora_bert()
    batch = token_batch()
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        dense = model(**batch).logits
    query = model.bert.encoder.layer[0].attention.self.query
    x = torch.randn(3, 5, 32)
    assert enable_fake_quant(model) == 2 * 6 + 2  # 6 Linears per layer (2 wrapped by LoRA), pooler, classifier
    want = F.linear(fake_quant_activation(x), fake_quant_weight(query.base.weight + query.delta_weight()), query.base.bias)
    assert torch.allclose(query(x), want, atol=1e-6)
    loss = model(**batch, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    assert query.lora_B.grad is not None and query.lora_B.grad.abs().sum() > 0  # straight-through
    assert [n for n, _ in model.named_parameters()] == names  # nothing renamed: the delta saves as usual
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, dense)
        disable_fake_quant(model)
        assert torch.equal(model(**batch).logits, dense)


def test_qat_recipe_section_trains_then_exports_int8(tiny_recipe, tmp_path):
    from slimtune.runner import export_run

    tiny_recipe["compress"] = {"qat": {}}
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    assert report["qat"]["fake_quant_linears"] == 13
    export_run(tmp_path / "run", tmp_path / "int8", int8=True, measure=False)
    import slimtune

    assert slimtune.load_exported(tmp_path / "int8").slimtune_export["kinds"] == ["merged", "int8"]
    bad = dict(tiny_recipe, compress={"qat": {"activation": True}})
    with pytest.raises(SlimtuneError, match="compress"):
        validate_recipe(bad)


def test_int8_of_a_layer_slimmed_to_nothing_keeps_its_empty_linear_and_round_trips():
    """Removing every head of a layer leaves an output projection with no inputs: the per-channel
    observer cannot quantise it, so it stays a (zero-cost) float Linear."""
    from slimtune.sparsity.structured import remove_heads, shape_record

    model = tiny_bert()
    heads = model.config.num_attention_heads
    remove_heads(model, {0: list(range(heads))})
    record = shape_record(model)
    quantized = quantize_int8(model)
    empty = quantized.bert.encoder.layer[0].attention.output.dense
    assert isinstance(empty, torch.nn.Linear) and empty.weight.numel() == 0
    fresh = tiny_bert()
    from slimtune.sparsity.structured import apply_shape_record

    apply_shape_record(fresh, record)
    rebuilt = load_int8_state(fresh, int8_state(quantized))
    batch = token_batch()
    with torch.no_grad():
        assert torch.equal(rebuilt(**batch).logits, quantized(**batch).logits)
