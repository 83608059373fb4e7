"""Task-conditioned adapters of multi-task runs (VL-Adapter's per-task, shared and half-shared
adapters): parameter counts, routing by task, gradients that stay with their task."""

from __future__ import annotations

import pytest
import torch

from slimtune.zoo.heads import attach_task_heads
from tests.fixtures import attach, randomize, tiny_bert, token_batch

TASKS, SIZES = ["two", "three", "four"], [2, 3, 4]


def assert_mixed_batch_is_each_example_alone(model, batch, ids):
    """A batch whose examples belong to several tasks gives each what it gets alone; the logits."""
    with torch.no_grad():
        mixed = model(**batch, task_ids=ids).logits
        alone = torch.cat([model(**{k: v[i:i + 1] for k, v in batch.items()}, task_ids=ids[i:i + 1]).logits for i in range(len(ids))])
    assert torch.allclose(mixed, alone, atol=1e-5)
    return mixed


def multitask_bert():
    model = tiny_bert(num_labels=sum(SIZES))
    attach_task_heads(model, TASKS, SIZES)
    return model


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("sharing, shared_projection", [("shared", None), ("per-task", None), ("half-shared", "down"), ("half-shared", "up")])
def test_parameter_counts_follow_the_sharing(method, sharing, shared_projection):
    model = multitask_bert()
    fields = {"sharing": sharing, "train_layer_norm": False, **({"shared_projection": shared_projection} if shared_projection else {})}
    delta = attach(model, (method, fields))
    d, m, t = 32, 32 // 16, len(TASKS)
    down, up = d * m + m, m * d + d
    per_adapter = {"shared": down + up, "per-task": t * (down + up),
                   "half-shared": (down + t * up) if shared_projection == "down" else (t * down + up)}[sharing]
    sites = 2 * 2 if method == "houlsby" else 2  # 2 layers; Houlsby after attention and FFN
    method_params = {n: p for n, p in delta.trainable_parameters(model).items() if n not in delta.head_names}
    assert sum(p.numel() for p in method_params.values()) == sites * per_adapter
    assert delta.methods[0].expected_param_count(model) == sites * per_adapter


def test_each_example_uses_its_own_tasks_adapter_and_only_its_task_learns():
    torch.manual_seed(0)
    model = multitask_bert()
    delta = attach(model, ("houlsby", {"sharing": "per-task", "train_layer_norm": False}))
    randomize(delta, model, scale=0.3)
    batch = token_batch(batch=3)
    ids = torch.tensor([2, 0, 1])
    mixed = assert_mixed_batch_is_each_example_alone(model, batch, ids)
    # Changing task 1's adapters changes task 1's outputs only.
    adapter = delta.methods[0].adapters[next(iter(delta.methods[0].adapters))]
    with torch.no_grad():
        adapter.up_weight[1] += torch.randn(adapter.up_weight[1].shape)  # not a constant: a LayerNorm follows
        changed = model(**batch, task_ids=ids).logits
    assert torch.allclose(changed[[0, 1]], mixed[[0, 1]], atol=1e-6) and not torch.allclose(changed[2], mixed[2])
    # A batch of task 0: no gradient reaches tasks 1 and 2's copies.
    model.zero_grad()
    model(**batch, labels=torch.tensor([0, 1, 1]), task_ids=torch.zeros(3, dtype=torch.long)).loss.backward()
    grad = adapter.down_weight.grad
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


def test_a_shared_adapter_is_one_set_of_weights_for_every_task():
    model = multitask_bert()
    delta = attach(model, ("houlsby", {}))
    for adapter in delta.methods[0].adapters.values():
        assert adapter.down_weight.dim() == 2 and adapter.up_weight.dim() == 2


# ----------------------------------------------------------------------------- Hyperformer++


def test_hyperformer_counts_its_hyper_network_by_the_closed_form():
    model = multitask_bert()
    delta = attach(model, ("hyperformer", {"train_layer_norm": False}))
    method = delta.methods[0]
    trained = {n: p for n, p in delta.trainable_parameters(model).items() if n not in delta.head_names}
    t, h, p, d, m, tasks, layers = 64, 128, 64, 32, 32 // 32, len(TASKS), 2
    generated = m * d + m + d * m + d + 2 * d
    expected = (tasks + layers + 2) * t + (3 * t * h + h) + (h * p + p) + 2 * p + (p + 1) * generated
    assert sum(x.numel() for x in trained.values()) == expected == method.expected_param_count(model)
    assert all(n.startswith("hyperformer_network.") for n in trained)  # one network, no per-site weights
    assert len(method.adapters) == 4  # after attention and FFN in both layers


def test_hyperformer_generates_adapter_shaped_weights_that_get_gradients():
    torch.manual_seed(0)
    model = multitask_bert()
    delta = attach(model, ("hyperformer", {"reduction_factor": 8}))
    method = delta.methods[0]
    network = method.network
    weights = network.generate(torch.tensor([0, 2]), layer=1, block=0)
    d, m = 32, 4
    assert weights["down_weight"].shape == (2, m, d) and weights["up_weight"].shape == (2, d, m)
    assert weights["down_bias"].shape == (2, m) and weights["up_bias"].shape == (2, d) and weights["norm_weight"].shape == (2, d)
    sites = {name: (a.layer, a.block) for name, a in method.adapters.items()}
    assert sites["bert.encoder.layer.1.attention.output.dense.hyperformer"] == (1, 1)
    assert sites["bert.encoder.layer.0.output.dense.hyperformer"] == (0, 0)
    randomize(delta, model, scale=0.3)
    batch = token_batch(batch=3)
    model.zero_grad()
    model(**batch, labels=torch.tensor([0, 1, 1]), task_ids=torch.full((3,), 2)).loss.backward()
    grads = {n: p.grad for n, p in network.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n != "task_embeddings"), grads.keys()
    assert grads["task_embeddings"][2].abs().sum() > 0 and grads["task_embeddings"][:2].abs().sum() == 0
    # Examples of several tasks in one batch: each as if alone.
    ids = torch.tensor([1, 0, 2])
    assert_mixed_batch_is_each_example_alone(model, batch, ids)


def test_hyperformer_in_a_single_task_run_has_one_task_embedding():
    model = tiny_bert()
    delta = attach(model, "hyperformer")
    assert delta.methods[0].network.task_embeddings.shape == (1, 64)
    assert model(**token_batch()).logits.shape == (3, 2)


def test_per_task_prompts_are_one_prompt_per_task():
    torch.manual_seed(0)
    model = multitask_bert()
    delta = attach(model, ("prompt", {"num_tokens": 3, "sharing": "per-task"}))
    method = delta.methods[0]
    assert method.prompt.embeddings.shape == (3, 3, 32) == (len(TASKS), 3, 32)
    assert method.expected_param_count(model) == len(TASKS) * 3 * 32
    batch = token_batch(batch=3)
    ids = torch.tensor([2, 0, 1])
    assert_mixed_batch_is_each_example_alone(model, batch, ids)
    model.zero_grad()
    model(**batch, labels=torch.tensor([0, 1, 1]), task_ids=torch.ones(3, dtype=torch.long)).loss.backward()
    grad = method.prompt.embeddings.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


def test_a_run_saved_before_a_field_existed_still_loads():
    from slimtune.methods.delta import Delta
    from tests.fixtures import method_spec

    delta = Delta.from_specs([method_spec("houlsby")])
    saved = [{k: v for k, v in delta.config()[0].items() if k not in ("sharing", "shared_projection")}]
    assert delta.trained_with(saved)  # the new fields at their defaults: the same methods
    assert not delta.trained_with([{**saved[0], "reduction_factor": 8}])
    per_task = Delta.from_specs([method_spec("houlsby", sharing="per-task")])
    assert not per_task.trained_with(saved)  # a non-default value of a new field is another method


@pytest.mark.parametrize("sharing", ["per-task", "half-shared"])
def test_per_task_lora_counts_routes_and_refuses_to_merge(sharing):
    from slimtune.errors import SlimtuneError

    torch.manual_seed(0)
    model = multitask_bert()
    delta = attach(model, ("lora", {"r": 2, "sharing": sharing}))
    method = delta.methods[0]
    t, d, r, sites = len(TASKS), 32, 2, 2 * 2  # query and value in 2 layers
    per_site = (t * r * d if sharing == "per-task" else r * d) + t * r * d
    trained = {n: p for n, p in delta.trainable_parameters(model).items() if n not in delta.head_names}
    assert sum(p.numel() for p in trained.values()) == sites * per_site == method.expected_param_count(model)
    randomize(delta, model, scale=0.3)
    batch, ids = token_batch(batch=3), torch.tensor([1, 2, 0])
    assert_mixed_batch_is_each_example_alone(model, batch, ids)
    assert not method.mergeable and not delta.can_merge
    with pytest.raises(SlimtuneError, match="cannot be merged"):
        delta.merge(model)


@pytest.mark.parametrize("method", ["compacter", "compacter++"])
def test_per_task_compacter_shares_its_rules_and_routes_fast_weights(method):
    torch.manual_seed(0)
    model = multitask_bert()
    delta = attach(model, (method, {"reduction_factor": 4, "sharing": "per-task"}))
    trained = {n: p for n, p in delta.trainable_parameters(model).items() if n not in delta.head_names}
    t, d, m, sites = len(TASKS), 32, 32 // 4, 4 if method == "compacter" else 2
    per_site = t * ((d + m) + m) + t * ((m + d) + d)  # rank-1 fast weights (in + out) and the bias, per task
    assert sum(p.numel() for p in trained.values()) == sites * per_site + 4**3 == delta.methods[0].expected_param_count(model)
    rules = [n for n in trained if "phm_rule" in n]
    assert len(rules) == 1 and trained[rules[0]].shape == (4, 4, 4)  # one rule container for every layer and task
    randomize(delta, model, scale=0.3)
    batch, ids = token_batch(batch=3), torch.tensor([2, 1, 0])
    assert_mixed_batch_is_each_example_alone(model, batch, ids)
