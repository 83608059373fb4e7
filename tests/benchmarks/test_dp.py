"""benchmarks/dp.py renders every figure it measured (README part) and reuses finished runs."""

import copy

import pytest

from benchmarks import dp, readme

RESULT = {
    "benchmark": "dp", "date": "2026-11-29 08:00", "machine": {"cpus": 2, "torch_threads": 2, "torch": "2.13.0"},
    "speed": {
        "date": "2026-11-29 08:00",
        "settings": {"model": "minilm-l6", "physical_batch": 32, "seq_len": 64, "noise_multiplier": 1.0, "lora": {"r": 8}, "threads": 2, "repeats": 5, "load_average": 3.1},
        "step_seconds": {"lora non-private": 2.0, "lora DP ours": 2.04, "lora DP opacus": 2.3},
        "lora_dp_vs_non_private": 1.02, "lora_dp_vs_opacus": 0.887, "opacus_lora_vs_non_private": 1.15, "full_dp_vs_opacus": 0.55,
    },
    "accuracy": {
        "date": "2026-11-29 08:10",
        "runs": {
            "non-private": {"metrics": {"accuracy": 0.861, "macro_f1": 0.86}, "steps": 529, "train_seconds": 600.0, "n_train": 8452, "n_test": 1000},
            "dp-eps8": {"metrics": {"accuracy": 0.842, "macro_f1": 0.84}, "steps": 66, "train_seconds": 900.0, "n_train": 8452, "n_test": 1000,
                        "privacy": {"epsilon": 7.97, "noise_multiplier": 0.71, "linear_probe": {"noise_multiplier": 39.4, "epsilon_alone": 0.498}}},
            "dp-eps3": {"metrics": {"accuracy": 0.811, "macro_f1": 0.81}, "steps": 66, "train_seconds": 900.0, "privacy": {"epsilon": 2.99, "noise_multiplier": 1.1}},
            "dp-noise-free": {"metrics": {"accuracy": 0.853, "macro_f1": 0.85}, "steps": 66, "train_seconds": 800.0, "privacy": {"epsilon": None, "noise_multiplier": 0.0}},
        },
        "settings": {
            "non-private": {"train": {"epochs": 2, "batch_size": 32, "lr": 0.001, "warmup_ratio": 0.06, "max_length": 64}},
            "dp-eps8": {"train": {"epochs": 2, "batch_size": 256, "lr": 0.005, "head_lr": 0.0001, "max_length": 64},
                        "privacy": {"max_grad_norm": 0.1, "accountant": "prv", "physical_batch_size": 64,
                                    "linear_probe": {"steps": 30, "epsilon": 0.5, "max_grad_norm": 1.0, "lr": 3.0}}},
        },
        "gap_eps8_points": 1.9, "gap_eps3_points": 5.0, "gap_schedule_points": 0.8, "gap_noise_eps8_points": 1.1,
    },
    "probe": {"date": "2026-11-29 14:00", "steps": 30, "epsilon_alone": 0.498, "noise_multiplier": 39.4, "test_mean": 0.761, "validation_mean": 0.757,
              "rows": [{"seed": 0, "test": 0.762, "validation": 0.756}, {"seed": 1, "test": 0.765, "validation": 0.75}, {"seed": 2, "test": 0.756, "validation": 0.765}]},
    "lm": {"steps": 24, "n_test": 200, "perplexity_before": 41.5, "perplexity_after": 30.25, "privacy": {"epsilon": 7.9, "noise_multiplier": 0.9},
           "settings": {"train": {"batch_size": 32, "lr": 0.002}}},
}


def test_render_markdown_shows_every_figure():
    text = dp.render_markdown(RESULT)
    for figure in ("1.02x", "0.89x", "0.55x", "<= 1.05", "<= 0.95", "<= 0.6",  # step ratios and goals
                   "0.861", "0.842", "0.811", "7.97", "2.99", "1.9 points at ε=8",  # accuracy and ε
                   "| 0.853 | 0.850 | ∞ | 0.00 |", "0.8 points of it come with the DP schedule", "1.1 with the noise",  # the gap split by the σ=0 run
                   "logical batch 256", "lr 0.005", "clip 0.1", "PRV", "physical batches of 64", "2 epochs",  # DP settings
                   "head lr 0.0001", "30 full-batch DP gradient-descent steps", "σ=39.4", "ε 0.50 alone",  # the DP linear probe before fine-tuning
                   "0.762, 0.765, 0.756 (mean 0.761; validation mean 0.757)",  # the probe alone
                   "41.50 before -> 30.25 after"):  # causal LM perplexity
        assert figure in text, figure
    section = readme.render_section({"dp": RESULT})  # the README section uses the script's renderer
    assert "### DP-SGD vs Opacus" in section and "0.842" in section


def test_render_markdown_shows_the_public_data_comparison():
    result = copy.deepcopy(RESULT)
    acc = result["accuracy"]
    acc["runs"].update({
        "public-stage": {"metrics": {"accuracy": 0.84, "macro_f1": 0.83}, "steps": 300, "n_train": 2966, "n_test": 371},
        "non-private-public": {"metrics": {"accuracy": 0.866, "macro_f1": 0.86}, "steps": 529},
        "dp-eps8-public": {"metrics": {"accuracy": 0.831, "macro_f1": 0.83}, "steps": 54, "privacy": {"epsilon": 7.99, "noise_multiplier": 0.89}},
    })
    acc.update(public_stage_on_target={"accuracy": 0.781}, gap_public_eps8_points=3.5, gap_public_vs_plain_eps8_points=3.0)
    text = dp.render_markdown(result)
    for figure in ("| public stage: non-private LoRA on amazon-sentiment (tested on its own split) | 0.840 |",
                   "| DP-LoRA, ε=8, from the public stage | 0.831 |", "2966 product-review sentences", "alone reaches 0.781",
                   "DP-LoRA at ε=8 reaches 0.831 against 0.866 non-private: gap 3.5 points (goal <= 4)",
                   "and 3.0 points below the non-private LoRA that had no public data"):
        assert figure in text, figure
    assert "public stage" not in dp.render_markdown(RESULT)  # runs from before the public comparison still render


def test_render_markdown_with_parts_missing():
    assert dp.render_markdown({}) == "_no measurements_"
    only_speed = dp.render_markdown({"speed": RESULT["speed"]})
    assert "1.02x" in only_speed and "Test accuracy" not in only_speed


def test_a_finished_run_with_another_recipe_is_not_reused(tmp_path):
    from slimtune.errors import SlimtuneError
    from slimtune.recipe import load_recipe

    run = tmp_path / "dp-eps8"
    run.mkdir()
    (run / "recipe.yaml").write_text(load_recipe(dp.ROOT / "recipes/dp-lora.yaml", ["train.lr=0.1"]).to_yaml())
    (run / "report.json").write_text("{}")
    with pytest.raises(SlimtuneError, match="another recipe"):
        dp.run_or_reuse(tmp_path, "dp-eps8", "recipes/dp-lora.yaml", [], threads=1)
    # The measure section does not decide the trained model: such a run is reused.
    (run / "recipe.yaml").write_text(load_recipe(dp.ROOT / "recipes/dp-lora.yaml", ["measure.latency=true"]).to_yaml())
    assert dp.run_or_reuse(tmp_path, "dp-eps8", "recipes/dp-lora.yaml", [], threads=1) == {}


def test_an_unfinished_dp_run_is_taken_from_its_checkpoint_with_its_epsilon(tiny_recipe, tmp_path):
    import yaml

    from slimtune.recipe import validate_recipe
    from slimtune.runner import train_run

    tiny_recipe["train"].update(max_steps=None, epochs=1, batch_size=16, eval_each_epoch=False)
    tiny_recipe["measure"].update(memory=False, flops=False)
    tiny_recipe["privacy"] = {"epsilon": 8.0, "accountant": "rdp", "physical_batch_size": 8}
    recipe_file = tmp_path / "dp.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe))
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "runs/dp-eps8", progress=False)
    (tmp_path / "runs/dp-eps8/report.json").unlink()  # as if it had been stopped after its epoch-end checkpoint
    partial = dp.checkpoint_report(tmp_path / "runs", "dp-eps8", str(recipe_file), [], threads=1)
    assert partial["metrics"] == pytest.approx(report["metrics"])
    assert partial["privacy"]["epsilon"] == pytest.approx(report["privacy"]["epsilon"]) and partial["privacy"]["steps"] == report["privacy"]["steps"]
    assert partial["train"]["stop_reason"].startswith("partial")
    assert dp.checkpoint_report(tmp_path / "runs", "dp-eps8", str(recipe_file), [], threads=1) == partial  # cached


def test_schedule_part_renders_each_choice_against_the_recipe():
    rows = [{"batch": b, "epochs": e, "steps": int(e * 1000 / b), "noise_multiplier": 1.0, "signal_to_noise_scale": (e * 1000 / b) ** 0.5 * b}
            for b in (100, 400) for e in (2, 8)]
    text = dp.render_markdown({"schedule": {"n_train": 1000, "epsilon": 8.0, "delta": 1e-5, "accountant": "prv", "recipe": {"batch": 400, "epochs": 8}, "rows": rows}})
    assert "| 400 | 8 | 20 | 1.00 | 1789 (1.00x the recipe) |" in text
    assert "| 100 | 2 | 20 | 1.00 | 447 (0.25x the recipe) |" in text
