"""Training a pruned architecture (compress/structure.py; Liu et al. 2019): ``model.structure``
builds exactly the slim export's shapes, ``init: inherited`` its weights, ``init: scratch`` the
model's own initializer's draws; ``train.budget: scratch-b`` trains steps x FLOPs_dense /
FLOPs_pruned, checked against the closed-form FLOPs of a BERT layer; bad input is one line."""

import json
import shutil

import pytest
import torch

import slimtune
from slimtune.compress.structure import StructureHook, build_on_structure, reinitialise, scratch_b_steps
from slimtune.errors import SlimtuneError
from slimtune.io import read_json
from slimtune.measure.report import report_rows
from slimtune.recipe import validate_recipe
from slimtune.runner import build, export_run, load_run, train_run
from slimtune.sparsity.structured import shape_record
from slimtune.zoo.heads import configure_pooling

from tests.fixtures import text_logits, tiny_bert, train_tiny_lora

LABELS = ["neg", "pos"]
SEQ = 16


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_dir, tiny_data_file):
    """A tiny LoRA run (mean pooling), its slim export (half the heads and FFN neurons), and its
    merged (unslimmed) export."""
    root = tmp_path_factory.mktemp("structure")
    run = train_tiny_lora(root / "run", tiny_model_dir, tiny_data_file)
    export_run(run, root / "slim", slim="heads=0.5,ffn=0.5,multiple=1", measure=False)
    export_run(run, root / "merged", merge=True, measure=False)
    return {"run": run, "slim": root / "slim", "merged": root / "merged"}


def structured_recipe(tiny_model_dir, tiny_data_file, structure, **model):
    return {
        "model": {"name": str(tiny_model_dir), "structure": str(structure), **model},
        "task": {"file": str(tiny_data_file), "text": "text", "label": "label"},
        "method": "full",
        "train": {"max_steps": 6, "batch_size": 16, "lr": 1e-3, "max_length": SEQ, "warmup_ratio": 0.0},
        "measure": {"latency": False, "memory": False},
    }


def bert_flops(tokens: int, hidden: int, heads_width: list[int], ffn: list[int], labels: int = 2) -> int:
    """measure/flops.py's closed form, per layer 2T(4 d d_attn + 2 d f) + 4 T^2 d_attn (projections,
    Q K^T and A V), plus BERT's pooler on one token and the classifier."""
    layers = sum(2 * tokens * (4 * hidden * a + 2 * hidden * f) + 4 * tokens * tokens * a for a, f in zip(heads_width, ffn, strict=True))
    return layers + 2 * hidden * hidden + 2 * hidden * labels


def test_inherited_is_the_exports_architecture_and_weights(exports, tiny_model_dir):
    built = build_on_structure(str(tiny_model_dir), exports["slim"], "inherited", labels=LABELS, seq_len=SEQ)
    exported = slimtune.load_exported(exports["slim"])
    assert shape_record(built.model)["layers"] == read_json(exports["slim"] / "shapes.json")["layers"]
    assert built.head == "inherited"
    ours = dict(built.model.named_parameters())
    theirs = dict(exported.named_parameters())
    assert set(theirs) == set(ours) - {n for n in ours if ".pooler." in n}  # the export is mean-pooled: no [CLS] pooler
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    configure_pooling(built.model, "mean", "classification")
    tokenizer = slimtune.load_run(exports["run"]).tokenizer
    assert torch.equal(text_logits(built.model.eval(), tokenizer), text_logits(exported, tokenizer))


def test_scratch_keeps_the_architecture_and_draws_every_weight_from_the_initializer(exports, tiny_model_dir):
    inherited = build_on_structure(str(tiny_model_dir), exports["slim"], "inherited", labels=LABELS, seq_len=SEQ).model
    scratch = build_on_structure(str(tiny_model_dir), exports["slim"], "scratch", labels=LABELS, seq_len=SEQ, seed=3).model
    assert shape_record(scratch)["layers"] == shape_record(inherited)["layers"]
    shapes = {n: p.shape for n, p in inherited.named_parameters()}
    assert {n: p.shape for n, p in scratch.named_parameters()} == shapes
    std = scratch.config.initializer_range
    random_weights = []
    for name, p in scratch.named_parameters():
        if name.endswith("LayerNorm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias") or "LayerNorm" in name:
            assert torch.equal(p, torch.zeros_like(p)), name
        else:  # Linear and embedding weights: N(0, initializer_range), none of the inherited values
            assert not torch.equal(p, dict(inherited.named_parameters())[name]), name
            values = p.detach().flatten()
            if name.endswith("word_embeddings.weight"):
                pad = scratch.config.pad_token_id
                assert torch.equal(p[pad], torch.zeros_like(p[pad]))  # transformers zeroes the padding row
                values = torch.cat([p[:pad].flatten(), p[pad + 1:].flatten()]).detach()
            assert abs(values.std().item() - std) < 0.25 * std, name
            random_weights.append(values)
    pooled = torch.cat(random_weights)
    assert abs(pooled.mean().item()) < 4 * std / pooled.numel() ** 0.5
    assert abs(pooled.std().item() - std) < 0.01 * std  # ~1M draws: the initializer's std to 1%
    # Seeded: the same seed draws the same model, another seed another one.
    again = build_on_structure(str(tiny_model_dir), exports["slim"], "scratch", labels=LABELS, seq_len=SEQ, seed=3).model
    other = build_on_structure(str(tiny_model_dir), exports["slim"], "scratch", labels=LABELS, seq_len=SEQ, seed=4).model
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(dict(again.named_parameters())[name], dict(scratch.named_parameters())[name])
    assert not torch.equal(dict(other.named_parameters())[name], dict(scratch.named_parameters())[name])


def test_reinitialise_draws_what_berts_initializer_draws_even_over_loaded_weights():
    """Loaded weights are flagged as initialised, which transformers' init skips; the flags are
    cleared, so every tensor is drawn again. Reference: BERT's rule (N(0, 0.02) Linear/Embedding
    weights, padding row and biases 0, LayerNorm 1/0) applied by hand in the same module order."""
    model = tiny_bert()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            p._is_hf_initialized = True
    for module in model.modules():
        module._is_hf_initialized = True
    reference = tiny_bert()
    std = reference.config.initializer_range

    def bert_rule(module):
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, 0.0, std)
            torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, 0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)

    reinitialise(model, seed=11)
    torch.manual_seed(11)
    with torch.no_grad():
        reference.apply(bert_rule)  # children first, then the module: transformers' order
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_scratch_b_trains_steps_times_the_flops_ratio(exports, tiny_model_dir, tiny_data_file, tmp_path):
    shapes = read_json(exports["slim"] / "shapes.json")["layers"]
    dense = bert_flops(SEQ, 32, [32, 32], [64, 64])
    pruned = bert_flops(SEQ, 32, [8 * len(layer["heads"]) for layer in shapes], [len(layer["neurons"]) for layer in shapes])
    built = build_on_structure(str(tiny_model_dir), exports["slim"], "scratch", labels=LABELS, seq_len=SEQ)
    assert (built.flops_dense, built.flops_pruned) == (dense, pruned)
    assert StructureHook(built, "scratch-b").budget_steps(6) == int(6 * dense / pruned)
    assert StructureHook(built, "scratch-b", cap=1.2).budget_steps(10) == 12 == scratch_b_steps(10, dense / pruned, 1.2)
    assert StructureHook(built, "steps").budget_steps(6) == 6

    recipe = structured_recipe(tiny_model_dir, tiny_data_file, exports["slim"], init="scratch")
    recipe["train"]["budget"] = "scratch-b"
    report = train_run(validate_recipe(recipe), tmp_path / "b", progress=False)
    section = report["structure"]
    assert report["train"]["steps"] == section["steps"] == int(6 * dense / pruned) > 6
    assert section["recipe_steps"] == 6 and section["init"] == "scratch" and section["budget"] == "scratch-b"
    assert section["flops_ratio"] == pytest.approx(dense / pruned) and section["flops_seq_len"] == SEQ
    assert section["kept_heads_per_layer"] == [len(layer["heads"]) for layer in shapes]
    rows = dict(report_rows(report))
    assert rows["init"].startswith("scratch: every weight re-initialised by BertForSequenceClassification.init_weights")
    assert rows["budget"] == f"scratch-b: 6 recipe steps x {dense / pruned:.3f} (FLOPs ratio) = {int(6 * dense / pruned)} steps"
    # The run rebuilds (structure + seeded re-init + its delta) for eval and export.
    assert slimtune.evaluate(tmp_path / "b") == report["metrics"]
    export_run(tmp_path / "b", tmp_path / "b-export", merge=True, measure=False)
    assert read_json(tmp_path / "b-export" / "shapes.json")["layers"] == read_json(exports["slim"] / "shapes.json")["layers"]


def test_inherited_run_fine_tunes_the_export_and_reports_it(exports, tiny_model_dir, tiny_data_file, tmp_path):
    recipe = validate_recipe(structured_recipe(tiny_model_dir, tiny_data_file, exports["slim"]))
    built = build(recipe)
    start = {n: p.detach().clone() for n, p in built.model.named_parameters()}
    exported = dict(slimtune.load_exported(exports["slim"]).named_parameters())
    assert all(torch.equal(start[n], t) for n, t in exported.items())
    report = train_run(recipe, tmp_path / "e", progress=False)
    assert report["structure"]["init"] == "inherited" and report["structure"]["head"] == "inherited"
    assert report["structure"]["steps"] == report["train"]["steps"] == 6 and report["structure"]["steps_factor"] == 1.0
    assert dict(report_rows(report))["budget"] == "steps: the recipe's 6 steps"


def test_a_dsee_heads_run_exported_with_merge_is_a_structure(tiny_model_dir, tiny_data_file, tmp_path):
    run = {
        "model": {"name": str(tiny_model_dir)},
        "task": {"file": str(tiny_data_file), "text": "text", "label": "label"},
        "method": {"name": "dsee", "r": 2, "num_sparse": 4, "prune": "heads", "heads_per_layer": 1},
        "train": {"max_steps": 4, "batch_size": 16, "lr": 5e-3, "max_length": SEQ, "warmup_ratio": 0.0},
        "measure": {"latency": False, "memory": False},
    }
    report = train_run(validate_recipe(run), tmp_path / "dsee", progress=False)
    export_run(tmp_path / "dsee", tmp_path / "x", merge=True, measure=False)
    built = build_on_structure(str(tiny_model_dir), tmp_path / "x", "scratch", labels=LABELS, seq_len=SEQ)
    removed = {int(k): v for k, v in report["dsee"]["removed_heads"].items()}
    assert [layer["heads"] for layer in built.shapes["layers"]] == [[h for h in range(4) if h not in removed.get(i, [])] for i in range(2)]
    assert built.flops_ratio > 1


def test_a_plain_hugging_face_slim_export_is_a_structure_too(tiny_model_dir, tiny_data_file, tmp_path):
    """Uniform FFN widths and a [CLS] head export as plain transformers (no shapes.json)."""
    run = train_tiny_lora(tmp_path / "run", tiny_model_dir, tiny_data_file, head={"pooling": "cls"})
    export_run(run, tmp_path / "ffn", slim="ffn=0.5,scope=local,multiple=1,criterion=magnitude", measure=False)
    assert read_json(tmp_path / "ffn" / "slimtune_export.json")["layout"] == "hf"
    built = build_on_structure(str(tiny_model_dir), tmp_path / "ffn", "inherited", labels=LABELS, seq_len=SEQ)
    exported = slimtune.load_exported(tmp_path / "ffn")
    assert [len(layer["neurons"]) for layer in built.shapes["layers"]] == [32, 32]
    tokenizer = load_run(run).tokenizer
    assert torch.equal(text_logits(built.model.eval(), tokenizer), text_logits(exported, tokenizer))


def test_structure_variants_gives_the_three_recipes(exports, tiny_model_dir, tiny_data_file):
    base = structured_recipe(tiny_model_dir, tiny_data_file, exports["slim"])
    del base["model"]["structure"]
    variants = slimtune.structure_variants(exports["slim"], base)
    assert {k: (r.model.init, r.train.budget, r.model.structure) for k, r in variants.items()} == {
        "inherited": ("inherited", "steps", str(exports["slim"])),
        "scratch-e": ("scratch", "steps", str(exports["slim"])),
        "scratch-b": ("scratch", "scratch-b", str(exports["slim"])),
    }
    # Without a recipe: the one of the run the export came from (LoRA here).
    assert slimtune.structure_variants(exports["slim"], variants=("inherited",))["inherited"].method_label == "lora"
    with pytest.raises(SlimtuneError, match="unknown variant 'scratch-x'"):
        slimtune.structure_variants(exports["slim"], base, variants=("scratch-x",))


# --------------------------------------------------------------------------------------------
# One-line errors.
# --------------------------------------------------------------------------------------------


def one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(SlimtuneError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_structures_are_one_line_errors(exports, tiny_model_dir, tmp_path):
    def build_(structure, init="inherited", model=tiny_model_dir):
        return build_on_structure(str(model), structure, init, labels=LABELS, seq_len=SEQ)

    assert "export directory does not exist" in one_line(build_, tmp_path / "nope")
    assert one_line(build_, tiny_model_dir).startswith("model.structure: ") and "not a slimtune export" in one_line(build_, tiny_model_dir)
    assert "without removed structure (kinds: merged)" in one_line(build_, exports["merged"])
    # Another base model: the same tiny BERT with 3 layers.
    other = tmp_path / "three-layers"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    message = one_line(build_, exports["slim"], model=other)
    assert "was exported from another base model (num_hidden_layers 2;" in message and "has 3)" in message
    assert "unknown init 'random'" in one_line(build_, exports["slim"], "random")


def test_bad_recipes_are_one_line_errors(exports, tiny_model_dir, tiny_data_file, tmp_path):
    recipe = structured_recipe(tiny_model_dir, tiny_data_file, exports["slim"])
    assert "model.init: Input should be 'inherited' or 'scratch'" in one_line(validate_recipe, {**recipe, "model": {**recipe["model"], "init": "random"}})
    no_structure = {**recipe, "model": {"name": str(tiny_model_dir)}, "train": {**recipe["train"], "budget": "scratch-b"}}
    assert "train.budget: scratch-b scales the steps" in one_line(validate_recipe, no_structure)
    assert "budget_cap caps the factor of budget: scratch-b" in one_line(validate_recipe, {**recipe, "train": {**recipe["train"], "budget_cap": 2}})
    assert "train.budget_cap: Input should be greater than or equal to 1" in one_line(
        validate_recipe, {**recipe, "train": {**recipe["train"], "budget": "scratch-b", "budget_cap": 0.5}})
    assert "train.budget: Input should be 'steps' or 'scratch-b'" in one_line(validate_recipe, {**recipe, "train": {**recipe["train"], "budget": "flops"}})
    # A frozen random backbone trains nothing useful.
    lora = validate_recipe({**recipe, "model": {**recipe["model"], "init": "scratch"}, "method": {"name": "lora", "r": 2}})
    assert "model.init: scratch re-initialises every weight, and method 'lora' leaves" in one_line(build, lora)
    # An inherited head reads the pooling it was trained on (mean here).
    cls = validate_recipe({**recipe, "head": {"pooling": "cls"}})
    assert "head.pooling: 'cls', but the head inherited from" in one_line(build, cls)
    assert not (tmp_path / "refused").exists()
    one_line(train_run, cls, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()  # a refused run leaves no directory behind


def test_a_llama_structure_in_the_plain_layout_loads_by_position(tmp_path):
    """GQA: a whole KV group removed in every layer, uniform FFN widths: plain transformers layout
    (no shapes.json); the structure names the first units kept and inherits the weights in place."""
    from slimtune.compress.export import save_exported
    from slimtune.sparsity.structured import remove_ffn_neurons, remove_heads

    from tests.fixtures import tiny_llama, token_batch

    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    remove_heads(model, {0: [0, 1], 1: [0, 1]})  # 4 query heads over 2 KV groups: group 0 goes
    remove_ffn_neurons(model, {0: list(range(16)), 1: list(range(16, 32))})
    save_exported(model, tmp_path / "x", pooling="cls", labels=["a", "b"])
    assert read_json(tmp_path / "x" / "slimtune_export.json")["layout"] == "hf"
    built = build_on_structure(str(tmp_path / "llama"), tmp_path / "x", "inherited", labels=["a", "b"], seq_len=8)
    assert [(len(layer["heads"]), len(layer["kv_heads"]), len(layer["neurons"])) for layer in built.shapes["layers"]] == [(2, 1, 48)] * 2
    assert built.head == "inherited" and built.flops_ratio > 1
    batch = token_batch()
    with torch.no_grad():
        assert torch.equal(built.model.eval()(**batch).logits, slimtune.load_exported(tmp_path / "x")(**batch).logits)
