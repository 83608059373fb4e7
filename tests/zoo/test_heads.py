"""The head's pooling: masked mean against a plain re-computation; cls keeps the model's head."""

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.zoo.heads import MaskedMeanPooler, configure_pooling
from tests.fixtures import tiny_bert, tiny_llama, token_batch


def test_mean_pooling_feeds_the_classifier_the_masked_mean_of_the_last_states():
    model = tiny_bert()
    assert configure_pooling(model, "auto", "classification") == "mean"
    assert isinstance(model.bert.pooler, MaskedMeanPooler)
    batch = token_batch(batch=3, seq=7)
    captured = {}
    model.classifier.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    out = model(**batch, output_hidden_states=True)
    last = out.hidden_states[-1]
    mask = batch["attention_mask"].double()
    expected = torch.stack([(last[i].double() * mask[i, :, None]).sum(0) / mask[i].sum() for i in range(3)])
    torch.testing.assert_close(captured["x"].double(), expected, rtol=1e-6, atol=1e-6)
    # padded positions do not matter
    changed = dict(batch)
    changed["input_ids"] = batch["input_ids"].clone()
    changed["input_ids"][0, -2:] = 5
    torch.testing.assert_close(model(**changed).logits[0], out.logits[0], rtol=1e-5, atol=1e-6)


def test_cls_keeps_the_models_own_head():
    model = tiny_bert()
    pooler = model.bert.pooler
    assert configure_pooling(model, "cls", "classification") == "cls" and model.bert.pooler is pooler
    llama = tiny_llama()
    assert configure_pooling(llama, "auto", "classification") == "cls"
    with pytest.raises(SlimtuneError, match="head.pooling: 'mean' needs a BERT-style encoder"):
        configure_pooling(llama, "mean", "classification")
    assert configure_pooling(tiny_bert(), "mean", "lm") == "none"
