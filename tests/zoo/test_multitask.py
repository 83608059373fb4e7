"""Multi-task runs: the recipe's task list, the task sampler, one head per task, per-task and
average metrics, resume and DP (slimtune.zoo.multitask, slimtune.zoo.heads)."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.recipe import recipe_from_data, validate_recipe
from slimtune.zoo.heads import MultiTaskHead, TaskRouter, attach_task_heads
from slimtune.zoo.multitask import MultiTaskBatchPlan, average_metrics, sampling_weights
from tests.fixtures import assert_same_delta, crash_run, tiny_bert, token_batch

TOPICS = {"sport": ["match", "goal", "team"], "food": ["bread", "soup", "cake"], "music": ["song", "band", "drum"]}


@pytest.fixture(scope="module")
def topics_file(tmp_path_factory):
    """90 three-class sentences (sport/food/music) as a csv."""
    import random

    rng = random.Random(1)
    rows = ["text,label"]
    for i in range(90):
        topic = list(TOPICS)[i % 3]
        rows.append(f"a note on the {rng.choice(TOPICS[topic])} of {rng.choice(['today', 'may', 'june'])},{topic}")
    path = tmp_path_factory.mktemp("topics") / "topics.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def multitask_recipe(tiny_recipe, topics_file):
    reviews = tiny_recipe["task"]
    tiny_recipe["task"] = {"tasks": [reviews, {"file": str(topics_file), "text": "text", "label": "label"}]}
    return tiny_recipe


# ----------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize("task, message", [
    (["trec-6", "trec-6"], "task 'trec-6' is listed twice"),
    (["trec-6"], "needs at least two tasks"),
    ({"tasks": ["trec-6", "sms-spam"], "name": "movie-sentiment"}, "go on each of them"),
    ({"tasks": ["trec-6", {"name": "corpus", "objective": "lm"}]}, "task.tasks.1: multi-task runs train classification heads"),
    ({"tasks": ["trec-6", "sms-spam"], "objective": "lm"}, "multi-task runs are classification"),
    ({"tasks": ["trec-6", {"name": "fmnist", "shots": 2}]}, "image tasks cannot be combined"),
    ({"name": "trec-6", "sampling": "proportional"}, "give task.tasks"),
    ({"tasks": ["trec-6", "sms-spam"], "sampling": "round-robin", "temperature": 2}, "applies to sampling: temperature"),
])
def test_bad_task_lists_are_refused_in_one_line(task, message):
    with pytest.raises(SlimtuneError) as error:
        recipe_from_data({"task": task})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_task_list_is_the_tasks_shorthand_and_aliases_tell_twins_apart():
    recipe = recipe_from_data({"task": ["trec-6", {"name": "trec-6", "alias": "trec-small", "train_size": 100}], "method": "lora"})
    assert [m.member_name for m in recipe.task.tasks] == ["trec-6", "trec-small"]
    assert validate_recipe(recipe.to_dict()).to_dict() == recipe.to_dict()  # recipe.yaml reads back the same
    seeded = recipe_from_data({"task": {"tasks": ["trec-6", {"name": "sms-spam", "split_seed": 2}], "split_seed": 5}, "method": "lora"})
    assert [m.split_seed for m in seeded.task.tasks] == [5, 2]  # the list's seed unless a task sets its own
    assert [m.split_seed for m in validate_recipe(seeded.to_dict()).task.tasks] == [5, 2]


def test_a_task_with_one_class_is_refused(tiny_recipe, tmp_path):
    from slimtune.runner import recipe_task

    one = tmp_path / "one.csv"
    one.write_text("text,label\n" + "".join(f"row {i},same\n" for i in range(30)))
    tiny_recipe["task"] = {"tasks": [tiny_recipe["task"], {"file": str(one), "text": "text", "label": "label"}]}
    with pytest.raises(SlimtuneError, match="task.tasks.1"):
        recipe_task(validate_recipe(tiny_recipe))


def test_per_task_sharing_needs_several_tasks(tiny_recipe):
    from slimtune.runner import build

    tiny_recipe["method"] = {"name": "houlsby", "sharing": "per-task"}
    with pytest.raises(SlimtuneError, match="needs a multi-task run"):
        build(validate_recipe(tiny_recipe))


# ----------------------------------------------------------------------------- the sampler


def test_sampling_weights_follow_hyperformers_formula():
    sizes = [1000, 100, 10]
    assert sampling_weights(sizes, "proportional") == pytest.approx([s / 1110 for s in sizes])
    raw = [(s / 1110) ** 0.1 for s in sizes]
    assert sampling_weights(sizes, "temperature", 10) == pytest.approx([r / sum(raw) for r in raw])
    assert sampling_weights(sizes, "temperature", 1e9) == pytest.approx([1 / 3] * 3)
    assert sampling_weights(sizes, "round-robin") == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("sampling", ["proportional", "temperature"])
def test_the_sampler_draws_tasks_in_proportion(sampling):
    sizes = [600, 300, 100]
    plan = MultiTaskBatchPlan(sizes, batch_size=4, seed=3, sampling=sampling, temperature=2.0)
    counts = collections.Counter(task for epoch in range(40) for task, _ in plan.epoch_batches(epoch))
    total = sum(counts.values())
    expected = sampling_weights(sizes, sampling, 2.0)
    for task, weight in enumerate(expected):  # 10,000 draws: within 4 binomial standard deviations
        assert abs(counts[task] / total - weight) < 4 * math.sqrt(weight * (1 - weight) / total)


def test_every_batch_is_one_tasks_rows_and_round_robin_takes_turns():
    sizes, offsets = [10, 7, 3], [0, 10, 17]
    for sampling in ("temperature", "round-robin"):
        plan = MultiTaskBatchPlan(sizes, batch_size=4, seed=0, sampling=sampling)
        assert plan.batches_per_epoch == 5
        for task, rows in plan.epoch_batches(0):
            assert len(rows) == 4 and all(offsets[task] <= r < offsets[task] + sizes[task] for r in rows)
    robin = MultiTaskBatchPlan(sizes, batch_size=4, seed=0, sampling="round-robin")
    batches = robin.epoch_batches(0) + robin.epoch_batches(1)
    assert [task for task, _ in batches] == [0, 1, 2, 0, 1] * 2
    # Each task walks through all of its rows before it sees one again.
    first_pass = [r for task, rows in robin.epoch_batches(0) if task == 0 for r in rows]
    assert sorted(first_pass) == list(range(8)) or len(set(first_pass)) == len(first_pass)


def test_the_plan_is_seeded_by_epoch_and_sliced_per_rank():
    plan = MultiTaskBatchPlan([50, 20], batch_size=8, seed=1)
    again = MultiTaskBatchPlan([50, 20], batch_size=8, seed=1)
    assert plan.epoch_batches(2) == again.epoch_batches(2) and plan.epoch_batches(2) != plan.epoch_batches(3)
    resumed = list(again.iter_epoch(1, start=4))
    assert resumed == list(plan.iter_epoch(1))[4:]
    ranks = [MultiTaskBatchPlan([50, 20], batch_size=8, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for index in range(plan.batches_per_epoch):
        full = plan.global_batch(0, index)
        parts = [dict(p.iter_epoch(0))[index] for p in ranks]
        assert parts[0] == full[0::2] and parts[1] == full[1::2]


# ----------------------------------------------------------------------------- one head per task


def test_each_task_reads_its_own_head_block_and_its_gradients_only_reach_it():
    torch.manual_seed(0)
    router = TaskRouter(["a", "b", "c"])
    linear = nn.Linear(5, 2 + 3 + 4)
    head = MultiTaskHead(linear, [2, 3, 4], router)
    x = torch.randn(6, 5)
    router.task_ids = torch.tensor([0, 1, 2, 1, 0, 2])
    out = head(x)
    assert out.shape == (6, 4)
    blocks = {0: (0, 2), 1: (2, 5), 2: (5, 9)}
    for row, task in enumerate(router.task_ids.tolist()):
        start, end = blocks[task]
        assert torch.allclose(out[row, : end - start], linear(x[row])[start:end])
        assert (out[row, end - start:] == torch.finfo(out.dtype).min).all()
    # A batch of task b only: no gradient reaches a's or c's rows of the stacked head.
    router.task_ids = torch.tensor([1, 1, 1])
    loss = nn.functional.cross_entropy(head(x[:3]), torch.tensor([0, 2, 1]))
    loss.backward()
    assert linear.weight.grad[2:5].abs().sum() > 0
    assert linear.weight.grad[:2].abs().sum() == 0 and linear.weight.grad[5:].abs().sum() == 0
    router.task_ids = None
    with pytest.raises(SlimtuneError, match="task_ids"):
        head(x)


def test_a_bert_with_task_heads_scores_each_task_as_its_own_model():
    model = tiny_bert(num_labels=2 + 3)
    attach_task_heads(model, ["two", "three"], [2, 3])
    batch = token_batch(batch=4)
    labels, task_ids = torch.tensor([1, 2, 0, 1]), torch.tensor([0, 1, 1, 0])
    out = model(**batch, labels=labels, task_ids=task_ids)
    assert out.logits.shape == (4, 3)
    # The loss is each example's cross-entropy over its own task's labels only.
    stacked = model.classifier.linear(model.bert(**batch).pooler_output)
    own = [stacked[0, :2], stacked[1, 2:], stacked[2, 2:], stacked[3, :2]]
    expected = torch.stack([nn.functional.cross_entropy(o[None], labels[i:i + 1]) for i, o in enumerate(own)]).mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_average_metrics_are_means_over_tasks():
    metrics = average_metrics({"a": {"accuracy": 0.5, "macro_f1": 0.4}, "b": {"accuracy": 0.9, "macro_f1": 0.8}},
                              {"a": "accuracy", "b": "macro_f1"})
    assert metrics["average"] == pytest.approx((0.5 + 0.8) / 2)
    assert metrics["accuracy"] == pytest.approx(0.7) and metrics["b/macro_f1"] == 0.8


# ----------------------------------------------------------------------------- runs


def test_a_multitask_run_reports_every_task_and_evaluates_them_again(multitask_recipe, tmp_path):
    from slimtune.runner import evaluate_run, train_run

    report = train_run(validate_recipe(multitask_recipe), tmp_path / "run", progress=False)
    tasks = report["task"]["tasks"]
    assert [t["name"] for t in tasks] == ["reviews", "topics"] and [len(t["labels"]) for t in tasks] == [2, 3]
    assert report["task"]["primary_metric"] == "average" and report["task"]["sampling"] == "temperature"
    metrics = report["metrics"]
    assert {"average", "accuracy", "reviews/accuracy", "topics/accuracy"} <= set(metrics)
    assert metrics["accuracy"] == pytest.approx((metrics["reviews/accuracy"] + metrics["topics/accuracy"]) / 2)
    assert report["params"]["head"] == (2 + 3) * (32 + 1)
    again = evaluate_run(tmp_path / "run")
    assert again["metrics"] == pytest.approx(metrics)
    with pytest.raises(SlimtuneError, match="evaluated on its own tasks"):
        evaluate_run(tmp_path / "run", task="trec-6")


@pytest.mark.parametrize("sharing", ["shared", "per-task"])
def test_a_multitask_run_resumes_bit_for_bit(multitask_recipe, tmp_path, sharing):
    from slimtune.runner import train_run

    multitask_recipe["method"] = {"name": "houlsby", "sharing": sharing}
    multitask_recipe["train"].update(max_steps=10, checkpoint_every=3)
    multitask_recipe["measure"] = {"latency": False, "flops": False, "memory": False}
    recipe = validate_recipe(multitask_recipe)
    train_run(recipe, tmp_path / "ref", progress=False)
    crash_run(recipe, tmp_path / "run", step=7)
    train_run(recipe, tmp_path / "run", resume=True, progress=False)
    assert_same_delta(tmp_path / "ref", tmp_path / "run")


def test_a_private_multitask_run_counts_every_example_of_every_task(multitask_recipe, tmp_path):
    from slimtune.runner import train_run

    multitask_recipe["privacy"] = {"epsilon": 8.0, "delta": 1e-5}
    multitask_recipe["train"].update(max_steps=4)
    report = train_run(validate_recipe(multitask_recipe), tmp_path / "run", progress=False)
    n_train = sum(t["n_train"] for t in report["task"]["tasks"])
    assert report["task"]["n_train"] == n_train
    assert report["privacy"]["sample_rate"] == pytest.approx(16 / n_train)
    assert report["privacy"]["epsilon"] <= 8.0 + 1e-6
    assert not report["privacy"]["slow_path"]  # the stacked head keeps the fast per-sample rule of a Linear


@pytest.mark.parametrize("int8", [False, True])
def test_a_multitask_export_keeps_every_tasks_head(multitask_recipe, tmp_path, int8):
    from slimtune.compress.loader import load_exported
    from slimtune.runner import export_run, load_run, train_run

    multitask_recipe["measure"] = {"latency": False, "flops": False, "memory": False}
    train_run(validate_recipe(multitask_recipe), tmp_path / "run", progress=False)
    report = export_run(tmp_path / "run", tmp_path / "export", merge=True, int8=int8, measure=True, repeats=1)
    assert [t["name"] for t in report["export"]["tasks"]] == ["reviews", "topics"]
    assert report["exported"]["metrics"].keys() == report["reference"]["metrics"].keys() >= {"average", "topics/accuracy"}
    exported, built = load_exported(tmp_path / "export"), load_run(tmp_path / "run")
    batch = token_batch(batch=4)
    ids = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        got, want = exported(**batch, task_ids=ids).logits, built.model.eval()(**batch, task_ids=ids).logits
    assert got.shape == (4, 3)
    assert torch.allclose(got[:, :2], want[:, :2], atol=0.05 if int8 else 1e-5)
    assert (got[[0, 3], 2] == want[[0, 3], 2]).all()  # the 2-label task's padding column


def _methods():
    from slimtune.methods.base import all_methods

    return sorted(all_methods())


@pytest.mark.parametrize("method", _methods())
def test_every_method_trains_in_a_multitask_run(multitask_recipe, tmp_path, method):
    from slimtune.runner import evaluate_run, train_run
    from tests.test_composition import TINY_FIELDS

    multitask_recipe["method"] = {"name": method, **TINY_FIELDS.get(method, {})}
    multitask_recipe["train"].update(max_steps=2)
    multitask_recipe["measure"] = {"latency": False, "flops": True, "memory": False}
    report = train_run(validate_recipe(multitask_recipe), tmp_path / "run", progress=False)
    assert {"reviews/accuracy", "topics/accuracy"} <= set(report["metrics"])
    assert evaluate_run(tmp_path / "run")["metrics"] == pytest.approx(report["metrics"])


def test_what_a_multitask_run_cannot_do_yet_is_refused_in_one_line(multitask_recipe, tmp_path):
    from slimtune.measure.attacks import AttackConfig
    from slimtune.runner import evaluate_run, train_run
    from slimtune.search.intrinsic_dim import intrinsic_dim_search

    multitask_recipe["train"].update(max_steps=1)
    multitask_recipe["measure"] = {"latency": False, "flops": False, "memory": False}
    train_run(validate_recipe(multitask_recipe), tmp_path / "run", progress=False)
    with pytest.raises(SlimtuneError, match="cannot be attacked yet"):
        evaluate_run(tmp_path / "run", attack=AttackConfig(name="pgd", examples=2))
    with pytest.raises(SlimtuneError, match="not task.tasks"):
        intrinsic_dim_search(multitask_recipe)


def test_keep_best_ends_on_the_best_validation_epoch_and_names_each_tasks_best(multitask_recipe, tmp_path):
    from slimtune.runner import evaluate_run, train_run
    from tests.fixtures import crash_run

    multitask_recipe["train"].update(max_steps=None, epochs=3, keep="best", lr=5e-2)
    multitask_recipe["measure"] = {"latency": False, "flops": False, "memory": False}
    recipe = validate_recipe(multitask_recipe)
    report = train_run(recipe, tmp_path / "run", progress=False)
    history = report["train"]["history"]
    averages = [entry["validation"]["average"] for entry in history]
    kept = report["train"]["kept"]
    assert kept["restored"] and kept["metric"] == "average" and kept["value"] == max(averages)
    assert kept["epoch"] == history[averages.index(max(averages))]["epoch"]
    best = report["train"]["best_epoch_per_task"]
    assert set(best) == {"reviews", "topics"} and all(1 <= e <= 3 for e in best.values())
    # The saved delta is the kept epoch's: re-evaluated on validation it scores the kept value.
    from slimtune.runner import load_run
    from slimtune.measure.evaluate import evaluate_split

    assert evaluate_split(load_run(tmp_path / "run"), "validation")["average"] == pytest.approx(kept["value"])
    assert evaluate_run(tmp_path / "run")["metrics"] == pytest.approx(report["metrics"])
    # Resumed after the first epoch, it keeps the same epoch and weights.
    steps_per_epoch = history[0]["step"]
    crash_run(recipe, tmp_path / "resumed", step=steps_per_epoch + 1)
    train_run(recipe, tmp_path / "resumed", resume=True, progress=False)
    assert_same_delta(tmp_path / "run", tmp_path / "resumed")


def test_keep_best_is_refused_where_it_would_peek_at_private_data(multitask_recipe):
    multitask_recipe["train"]["keep"] = "best"
    multitask_recipe["privacy"] = {"epsilon": 8.0}
    with pytest.raises(SlimtuneError, match="train.keep: best chooses an epoch by the validation split of data that privacy keeps private"):
        validate_recipe(multitask_recipe)


@pytest.mark.parametrize("method", [{"name": "lora", "r": 2, "sharing": "per-task"}, {"name": "houlsby", "sharing": "half-shared"},
                                    {"name": "prompt", "num_tokens": 2, "sharing": "per-task"}, {"name": "hyperformer"},
                                    {"name": "compacter", "reduction_factor": 4, "sharing": "per-task"}])
def test_task_conditioned_deltas_train_under_dp_with_exact_per_sample_gradients(multitask_recipe, tmp_path, method):
    """Poisson batches mix tasks: every example's gradient comes from its own task's weights
    (the engine checks each rule against autograd; a rule that disagrees is demoted, never wrong)."""
    from slimtune.runner import evaluate_run, train_run

    multitask_recipe["method"] = method
    multitask_recipe["privacy"] = {"epsilon": None, "noise_multiplier": 0.5, "max_grad_norm": 1.0}
    multitask_recipe["train"].update(max_steps=3)
    multitask_recipe["measure"] = {"latency": False, "flops": False, "memory": False}
    report = train_run(validate_recipe(multitask_recipe), tmp_path / "run", progress=False)
    assert report["privacy"]["steps"] == 3
    assert evaluate_run(tmp_path / "run")["metrics"] == pytest.approx(report["metrics"])
    if method["name"] != "prompt":  # the task ids reach the module as an input: the fast per-sample re-run holds
        assert not report["privacy"]["slow_path"], report["privacy"]["slow_path"]
