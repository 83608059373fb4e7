"""The composition matrix: every registered method x every feature combination (sparsity, DP,
QAT and their mixes) on tiny BERT, Llama and ViT models, the feature-side twin of the method
contract test (tests/methods/test_contract.py).

Each cell either trains a few steps — the trained delta changes the model's outputs, the report
card names every feature, the run loads back, and under DP no parameter takes the slow exact
per-sample path unless that method is listed in ``KNOWN_SLOW`` with why — or is refused before
training with one line. What each cell does is written in docs/composition.md; this test reads
that table and holds the code to it (``python -m tests.test_composition`` rewrites it).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.methods.base import all_methods

DOC = Path(__file__).resolve().parents[1] / "docs" / "composition.md"

# Fields that fit hidden-32 models (as in the contract test), and few steps of everything.
TINY_FIELDS = {"compacter": {"reduction_factor": 4}, "compacter++": {"reduction_factor": 4}, "prompt": {"num_tokens": 2},
               "dsee": {"r": 2, "num_sparse": 4}, "lora": {"r": 2}, "kadaptation": {"n": 8}, "lst": {"r": 2}}
# Gradual magnitude pruning (allowed with DP: it reads no training data), and one-shot at init
# (where LoRA's zero B cannot be ranked). Data criteria under DP: tests/sparsity/test_unrankable.py.
SPARSITY = {"target": "delta", "criterion": "magnitude", "scope": "local", "density": 0.5, "schedule": "gradual", "start_step": 1, "end_step": 2, "frequency": 1}
SPARSITY_AT_INIT = {"target": "delta", "criterion": "magnitude", "scope": "local", "density": 0.5, "at": "init"}
PRIVACY = {"epsilon": None, "noise_multiplier": 0.5, "max_grad_norm": 1.0, "physical_batch_size": 8}
QAT = {"qat": {}}
TICKETS = {"mode": "imp", "density": 0.5, "rounds": 1, "target": "base"}
ROBUSTNESS = {"attacks": ["pgd", "substitution"], "examples": 2}
#: The cell's own model as the teacher (no task head: hidden-state and attention distillation).
MODEL_DIR = "<the cell's model directory>"
DISTILL = {"teacher": MODEL_DIR, "alpha_kd": 0.0, "hidden": 1.0, "attention": 1.0}
FEATURES = {
    "none": {},
    "sparsity": {"sparsity": SPARSITY},
    "sparsity@init": {"sparsity": SPARSITY_AT_INIT},
    "privacy": {"privacy": PRIVACY},
    "qat": {"compress": QAT},
    "sparsity+privacy": {"sparsity": SPARSITY, "privacy": PRIVACY},
    "privacy+qat": {"privacy": PRIVACY, "compress": QAT},
    "sparsity+privacy+qat": {"sparsity": SPARSITY, "privacy": PRIVACY, "compress": QAT},
    "tickets": {"tickets": TICKETS},
    "tickets+privacy": {"tickets": TICKETS, "privacy": PRIVACY},
    "robustness": {"robustness": ROBUSTNESS},
    "distill": {"distill": DISTILL},
}
#: Cells run on BERT; Llama and ViT run these (each feature once, and all of them together).
OTHER_ARCH_FEATURES = ["privacy", "sparsity+privacy+qat"]
#: Methods with parameters no fast per-sample rule reaches, and why (the DP engine names them in
#: one line at the first step, and its report says so).
KNOWN_SLOW: dict[str, str] = {}
#: (arch, method) refused by the method itself on that architecture, whatever the features.
ARCH_REFUSALS = {("llama", "bitfit"): "has no bias parameters to train"}
STEPS = 3


def methods() -> list[str]:
    return sorted(all_methods())


# --------------------------------------------------------------------------------------------
# One cell.
# --------------------------------------------------------------------------------------------


def cell_recipe(model_dir: Path, task: dict, method: str, feature: str) -> dict:
    return {
        "model": {"name": str(model_dir)},
        "task": task,
        "method": {"name": method, **TINY_FIELDS.get(method, {})},
        "train": {"max_steps": STEPS, "batch_size": 8, "lr": 2e-2, "max_length": 16, "warmup_ratio": 0.0, "eval_each_epoch": False},
        "measure": {"latency": False, "memory": False, "flops": False},
        **json.loads(json.dumps(FEATURES[feature]).replace(MODEL_DIR, json.dumps(str(model_dir))[1:-1])),
    }


def run_cell(model_dir: Path, task: dict, method: str, feature: str, out: Path) -> dict:
    """{"outcome": "runs"} with what was checked, or {"outcome": "refused", "why": one line}."""
    from slimtune.measure.report import report_rows
    from slimtune.recipe import validate_recipe
    from slimtune.runner import build, load_run, train_run
    from tests.fixtures import model_inputs

    recipe = validate_recipe(cell_recipe(model_dir, task, method, feature))
    try:
        initial = build(recipe)
    except SlimtuneError as exc:
        assert "\n" not in str(exc), str(exc)
        return {"outcome": "refused", "why": str(exc)}
    report = train_run(recipe, out, progress=False)
    assert report["train"]["steps"] == STEPS
    wanted = [s for s in ("sparsity", "privacy", "compress", "tickets", "robustness", "distill") if s in FEATURES[feature]]
    rows = dict(report_rows(report))
    for section in wanted:
        key = {"compress": "qat"}.get(section, section)
        assert key in report, f"report.json has no '{key}' section"
        if section == "robustness":  # a row per attack, named by it
            assert sum(k.startswith("accuracy under ") for k in rows) == len(ROBUSTNESS["attacks"]), "the report card has no row per attack"
        else:
            assert any(k.lower() == key.lower() for k in rows), f"the report card has no '{key}' row"
    # The trained delta changes the outputs: the trained run against itself with the delta's own
    # tensors put back to their initial values (the trained head kept).
    trained = load_run(out)
    model = trained.model.eval()
    inputs = model_inputs(model) if "images" in task else _text_inputs(trained.tokenizer)
    with torch.no_grad():
        after = model(**inputs).logits
        head = set(trained.delta.head_names)
        init_state = {n: t for n, t in initial.delta.state_dict(initial.model).items() if n not in head}
        if init_state:
            trained.delta.load_state_dict(model, {**trained.delta.state_dict(model), **init_state})
            before = model(**inputs).logits
            assert (after - before).abs().max() > 1e-6, "the trained delta does not change the model's outputs"
    rules = report.get("privacy", {}).get("per_sample_rules", {})
    if rules and "batched-backward" in rules and method not in KNOWN_SLOW:
        pytest.fail(f"DP took the slow exact path: {report['privacy'].get('slow_path')}")
    return {"outcome": "runs", "rules": sorted(rules)}


def _text_inputs(tokenizer):
    from tests.fixtures import TEXTS

    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


# --------------------------------------------------------------------------------------------
# The table in docs/composition.md.
# --------------------------------------------------------------------------------------------


def read_table() -> dict[tuple[str, str], str]:
    """(method, feature) -> "✓" or "refused: <reason>" from the doc's matrix."""
    lines = [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        method = cells[0].strip("`")
        if method not in all_methods():
            break
        for feature, cell in zip(header[1:], cells[1:]):
            out[(method, feature)] = cell
    return out


def short_reason(why: str) -> str:
    """The refusal as the table shows it: the section and the method named, first clause."""
    return re.split(r"[;,]", why)[0].replace("|", "/")


def expected(method: str, feature: str) -> str:
    table = read_table()
    assert (method, feature) in table, f"docs/composition.md has no cell for {method} x {feature}; rerun python -m tests.test_composition"
    return table[(method, feature)]


def _check(result: dict, method: str, feature: str, arch: str = "bert") -> None:
    if (arch, method) in ARCH_REFUSALS:
        assert result["outcome"] == "refused" and ARCH_REFUSALS[(arch, method)] in result["why"], result
        return
    want = expected(method, feature)
    if result["outcome"] == "runs":
        assert want == "✓", f"{method} x {feature} runs, the docs say '{want}'"
    else:
        assert want.startswith("refused"), f"{method} x {feature} is refused ({result['why']}), the docs say it runs"
        assert short_reason(result["why"]) in want, f"the docs give another reason: {want} vs {result['why']}"


# --------------------------------------------------------------------------------------------
# The cells.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_cell(tiny_model_dir, tiny_data_file):
    return tiny_model_dir, {"file": str(tiny_data_file), "text": "text", "label": "label"}


@pytest.fixture(scope="module")
def llama_cell(tmp_path_factory, tiny_data_file):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimtune.zoo.models import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, {"file": str(tiny_data_file), "text": "text", "label": "label"}


@pytest.fixture(scope="module")
def vit_cell(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    from tests.fixtures import write_folder

    path = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 8, "width": 8}, "image_mean": [0.5], "image_std": [0.5]}))
    folder = write_folder(tmp_path_factory.mktemp("imgs") / "shapes", per_class=8)
    return path, {"images": str(folder)}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("method", methods())
def test_bert(method, feature, bert_cell, tmp_path):
    _check(run_cell(*bert_cell, method, feature, tmp_path / "run"), method, feature)


@pytest.mark.parametrize("feature", OTHER_ARCH_FEATURES)
@pytest.mark.parametrize("method", methods())
def test_llama(method, feature, llama_cell, tmp_path):
    _check(run_cell(*llama_cell, method, feature, tmp_path / "run"), method, feature, "llama")


@pytest.mark.parametrize("feature", OTHER_ARCH_FEATURES)
@pytest.mark.parametrize("method", methods())
def test_vit(method, feature, vit_cell, tmp_path):
    _check(run_cell(*vit_cell, method, feature, tmp_path / "run"), method, feature, "vit")


def test_the_table_covers_every_registered_method_and_feature():
    table = read_table()
    assert {m for m, _ in table} == set(methods()) and {f for _, f in table} == set(FEATURES)


# --------------------------------------------------------------------------------------------
# python -m tests.test_composition: run the BERT cells and rewrite the table.
# --------------------------------------------------------------------------------------------

TABLE_START, TABLE_END = "<!-- composition table: python -m tests.test_composition -->", "<!-- end of table -->"


def render(results: dict[tuple[str, str], dict]) -> str:
    lines = ["| method | " + " | ".join(FEATURES) + " |", "|---" * (len(FEATURES) + 1) + "|"]
    for method in methods():
        cells = []
        for feature in FEATURES:
            result = results[(method, feature)]
            cells.append("✓" if result["outcome"] == "runs" else f"refused: {short_reason(result['why'])}")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Run every BERT cell and rewrite the table; ``python -m tests.test_composition FEATURE ...``
    runs only those features' columns and keeps the other cells as the table has them."""
    import tempfile

    from tests.fixtures import write_tiny_bert_dir, write_tiny_reviews

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = write_tiny_bert_dir(root / "tiny-bert")
        task = {"file": str(write_tiny_reviews(root / "reviews.csv")), "text": "text", "label": "label"}
        only = sys.argv[1:]
        unknown = [f for f in only if f not in FEATURES]
        if unknown:
            sys.exit(f"unknown feature '{unknown[0]}'; valid: {', '.join(FEATURES)}")
        results = {cell: ({"outcome": "runs"} if text == "✓" else {"outcome": "refused", "why": text.removeprefix("refused: ")})
                   for cell, text in read_table().items()} if only else {}
        for method in methods():
            for feature in only or FEATURES:
                try:
                    results[(method, feature)] = run_cell(model_dir, task, method, feature, root / f"{method}-{feature}")
                except BaseException as exc:  # a cell that neither runs nor is refused: no table
                    print(f"{method} x {feature}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    results[(method, feature)] = {"outcome": "failed"}
                print(f"{method:14s} {feature:22s} {results[(method, feature)]['outcome']}", file=sys.stderr, flush=True)
    failed = [cell for cell, result in results.items() if result["outcome"] == "failed"]
    if failed:
        sys.exit(f"{len(failed)} cells failed (see above); the table is not rewritten")
    text = DOC.read_text(encoding="utf-8")
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    DOC.write_text(text[:start] + "\n" + render(results) + "\n" + text[end:], encoding="utf-8")


if __name__ == "__main__":
    main()
