"""Prompt tuning against a plain re-computation (the frozen model called on embeddings with the
soft tokens in place), per family: after [CLS] (BERT), prepended (Llama, classification and LM),
after CLS in the patch sequence (ViT, VPT-shallow)."""

import pytest
import torch

from slimtune.errors import SlimtuneError
from tests.fixtures import attach, randomize, round_trip
from tests.fixtures import tiny_bert, tiny_llama, tiny_vit, token_batch

N = 5


def test_bert_inserts_after_cls_and_widens_the_masks():
    model = tiny_bert()
    delta = attach(model, ("prompt", {"num_tokens": N}))
    randomize(delta, model)
    prompt = model.prompt_tuning.embeddings.detach()
    batch = token_batch()
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    plain = tiny_bert()  # same weights, no hooks
    words = plain.bert.embeddings.word_embeddings(batch["input_ids"])
    embeds = torch.cat([words[:, :1], prompt.expand(3, -1, -1), words[:, 1:]], dim=1)
    mask = batch["attention_mask"]
    mask = torch.cat([mask[:, :1], torch.ones(3, N, dtype=mask.dtype), mask[:, 1:]], dim=1)
    expected = plain(inputs_embeds=embeds, attention_mask=mask, token_type_ids=torch.zeros_like(mask)).logits
    torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lm", [False, True])
def test_llama_prepends_and_the_head_still_finds_the_last_token(lm):
    model = tiny_llama(lm=lm)
    delta = attach(model, ("prompt", {"num_tokens": N}), objective="lm" if lm else "classification")
    randomize(delta, model)
    prompt = model.prompt_tuning.embeddings.detach()
    batch = token_batch()  # row 0 is right-padded by two
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)  # pad id 0
    plain = tiny_llama(lm=lm)
    embeds = torch.cat([prompt.expand(3, -1, -1), plain.model.embed_tokens(batch["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(3, N, dtype=torch.long), batch["attention_mask"]], dim=1)
    hidden = plain.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, N:]
    if lm:
        expected = plain.lm_head(hidden)
    else:
        last = batch["attention_mask"].sum(1) - 1  # right padding: last real token
        expected = plain.score(hidden)[torch.arange(3), last]
    got = model(**batch).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_llama_lm_loss_is_computed_on_the_text_only():
    model = tiny_llama(lm=True)
    attach(model, ("prompt", {"num_tokens": N}), objective="lm")
    batch = token_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] and torch.isfinite(out.loss)


def test_vit_prompts_follow_the_cls_token():
    model = tiny_vit()
    attach(model, ("prompt", {"num_tokens": N}))
    pixels = torch.randn(2, 1, 8, 8)
    seen = {}
    model.vit.layers[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model(pixel_values=pixels).logits.sum().backward()
    plain = tiny_vit().vit.embeddings(pixels)
    x = seen["x"]
    assert x.shape[1] == plain.shape[1] + N
    torch.testing.assert_close(x[:, 0], plain[:, 0])
    torch.testing.assert_close(x[:, 1 : 1 + N], model.prompt_tuning.embeddings.detach().expand(2, -1, -1))
    torch.testing.assert_close(x[:, 1 + N :], plain[:, 1:])
    assert model.prompt_tuning.embeddings.grad.abs().sum() > 0
    with pytest.raises(SlimtuneError, match="method.init: a ViT has no vocabulary"):
        attach(tiny_vit(), ("prompt", {"init": "vocab"}))


def test_vocab_init_copies_sampled_non_special_embeddings_deterministically():
    model = tiny_bert()
    attach(model, ("prompt", {"num_tokens": N, "seed": 3}))
    table = model.bert.embeddings.word_embeddings.weight
    rows = [((table - p).abs().sum(1) == 0).nonzero().flatten().tolist() for p in model.prompt_tuning.embeddings]
    assert all(len(r) == 1 and r[0] != model.config.pad_token_id for r in rows)
    again = tiny_bert()
    attach(again, ("prompt", {"num_tokens": N, "seed": 3}))
    assert torch.equal(again.prompt_tuning.embeddings, model.prompt_tuning.embeddings)
    random = tiny_bert()
    attach(random, ("prompt", {"num_tokens": N, "init": "random"}))
    assert random.prompt_tuning.embeddings.abs().max() <= 0.5


def test_parameter_count_is_tokens_times_hidden():
    model = tiny_llama()
    method = attach(model, "prompt").methods[0]
    assert method.param_count(model) == method.expected_param_count(model) == 20 * 32


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama])
def test_delta_alone_round_trips(factory, tmp_path):
    round_trip(factory, [("prompt", {"num_tokens": N})], token_batch(), tmp_path)


@pytest.mark.parametrize("factory", [tiny_bert, tiny_llama])
def test_composes_with_adapters_and_lora(factory):
    model = factory()
    delta = attach(model, ("prompt", {"num_tokens": N}), "pfeiffer", "lora")
    randomize(delta, model)
    out = model(**token_batch(), labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    assert all(p.grad is not None for p in delta.trainable_parameters(model).values())


def test_two_prompt_methods_conflict():
    from slimtune.methods.delta import Delta
    from slimtune.methods.prompt import PromptTuning
    from slimtune.core.arch import Arch

    model = tiny_bert()
    with pytest.raises(SlimtuneError, match="already holds soft prompts"):
        Delta([PromptTuning(), PromptTuning()]).attach(model, Arch.of(model))


def test_needs_input_ids():
    model = tiny_bert()
    attach(model, "prompt")
    with pytest.raises(SlimtuneError, match="without input_ids"):
        model(inputs_embeds=torch.randn(1, 3, 32))


def test_mpnet_inserts_after_the_first_token():
    from tests.fixtures import tiny_mpnet

    model = tiny_mpnet()
    delta = attach(model, ("prompt", {"num_tokens": N}))
    randomize(delta, model)
    prompt = model.prompt_tuning.embeddings.detach()
    batch = token_batch()
    plain = tiny_mpnet()
    words = plain.mpnet.embeddings.word_embeddings(batch["input_ids"])
    embeds = torch.cat([words[:, :1], prompt.expand(3, -1, -1), words[:, 1:]], dim=1)
    mask = batch["attention_mask"]
    mask = torch.cat([mask[:, :1], torch.ones(3, N, dtype=mask.dtype), mask[:, 1:]], dim=1)
    torch.testing.assert_close(model(**batch).logits, plain(inputs_embeds=embeds, attention_mask=mask).logits, rtol=0, atol=1e-6)


def test_too_long_for_the_position_table_fails_clearly():
    model = tiny_bert()  # 64 positions
    attach(model, ("prompt", {"num_tokens": 20}))
    with pytest.raises(SlimtuneError, match="50 tokens \\+ 20 soft tokens exceed the model's 64 positions"):
        model(input_ids=torch.ones(1, 50, dtype=torch.long))
