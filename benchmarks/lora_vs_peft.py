"""slimtune LoRA vs peft LoRA on minilm-l6, side by side in one run.

Measures (batch 32, seq 64, r=8, alpha 16 on query/value):
  - train-step time ratio (fwd + bwd + AdamW step), interleaved medians   goal <= 0.95
  - injection time ratio (wrapping the target layers)                     goal <= 0.5
  - max |logits ours - logits peft| with the same LoRA weights            goal ~ 0
  - merged-model latency / base-model latency                              goal 1.00
  - accuracy of both trained on the same budget (2,000 movie-sentiment sentences, 2 epochs,
    batch 32, max_length 64, lr 1e-3; 1,000 test): slimtune >= peft (anchor: peft 0.823).

    python -m benchmarks.lora_vs_peft [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from benchmarks.common import interleaved_medians, print_rows, train_peft, write_result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the accuracy runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    from slimtune.measure.latency import measure_latency
    from slimtune.core.arch import Arch
    from slimtune.methods.delta import Delta
    from slimtune.methods.lora import LoRALinear
    from slimtune.recipe import load_recipe
    from slimtune.zoo.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    recipe = load_recipe(None)  # the main job: LoRA r=8 alpha 16 on query/value
    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    base = load_model("minilm-l6", num_labels=2)
    ours_model, peft_base = copy.deepcopy(base), copy.deepcopy(base)

    # -- injection ---------------------------------------------------------------------------
    def inject_ours(model):
        delta = Delta.from_specs(recipe.methods, train_pooler=False)  # as peft: classifier + LoRA
        delta.attach(model, Arch.of(model))
        return delta

    def inject_peft(model):
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS")
        return get_peft_model(model, config)

    inject_times = {"ours": [], "peft": []}
    for _ in range(5):
        for name, fn in (("ours", inject_ours), ("peft", inject_peft)):
            fresh = copy.deepcopy(base)
            start = time.perf_counter()
            fn(fresh)
            inject_times[name].append(time.perf_counter() - start)
    delta = inject_ours(ours_model)
    peft_model = inject_peft(peft_base)

    # -- same weights -> same outputs -------------------------------------------------------------
    torch.manual_seed(1)
    with torch.no_grad():
        for name, module in ours_model.named_modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(std=0.02)
                peft_layer = peft_model.base_model.model.get_submodule(name)
                peft_layer.lora_A["default"].weight.copy_(module.lora_A)
                peft_layer.lora_B["default"].weight.copy_(module.lora_B)
        peft_model.base_model.model.classifier.modules_to_save["default"].load_state_dict(ours_model.classifier.state_dict())
    texts = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés"] * 16
    batch = tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    batch = {k: v for k, v in batch.items()}
    ours_model.eval(), peft_model.eval()
    with torch.no_grad():
        max_diff = float((ours_model(**batch).logits - peft_model(**batch).logits).abs().max())

    # -- train-step time -----------------------------------------------------------------------
    labels = torch.tensor([1, 0] * 16)
    def stepper(model):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        model.train()
        def step():
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    step_times = interleaved_medians({"ours": stepper(ours_model), "peft": stepper(peft_model)}, repeats=args.repeats)

    # -- merged latency vs base ------------------------------------------------------------------
    delta.merge(ours_model)
    plain = copy.deepcopy(base)
    lat = {"merged": [], "base": []}
    for _ in range(3):
        lat["merged"].append(measure_latency(ours_model, batch, threads=args.threads, repeats=10)["latency_ms_median"])
        lat["base"].append(measure_latency(plain, batch, threads=args.threads, repeats=10)["latency_ms_median"])
    delta.unmerge(ours_model)

    result = {
        "settings": {"model": "minilm-l6", "batch_size": 32, "seq_len": 64, "r": 8, "alpha": 16, "targets": ["query", "value"], "threads": args.threads},
        "step_seconds": step_times,
        "step_ratio": step_times["ours"] / step_times["peft"],
        "inject_seconds": {k: statistics.median(v) for k, v in inject_times.items()},
        "inject_ratio": statistics.median(inject_times["ours"]) / statistics.median(inject_times["peft"]),
        "max_abs_logit_diff": max_diff,
        "merged_latency_ms": statistics.median(lat["merged"]),
        "base_latency_ms": statistics.median(lat["base"]),
        "merged_latency_ratio": statistics.median(lat["merged"]) / statistics.median(lat["base"]),
    }
    if not args.quick:
        result["accuracy"] = train_both(args.threads)

    rows = [
        ("train step ours / peft (goal <= 0.95)", result["step_ratio"]),
        ("injection ours / peft (goal <= 0.5)", result["inject_ratio"]),
        ("max |logit diff| same weights", result["max_abs_logit_diff"]),
        ("merged latency / base (goal 1.00)", result["merged_latency_ratio"]),
    ]
    if "accuracy" in result:
        rows += [(f"test accuracy {k}", v) for k, v in result["accuracy"].items()]
    print_rows("slimtune LoRA vs peft LoRA (minilm-l6)", rows)
    write_result("lora_vs_peft", result)
    return result


def train_both(threads: int) -> dict[str, float]:
    """Train slimtune's LoRA through `slimtune train` and peft's LoRA through the same trainer on the
    very same tokenised batches (same data, order, schedule), then evaluate both on the same test set."""
    import tempfile

    import torch
    from peft import LoraConfig

    from slimtune.recipe import load_recipe
    from slimtune.runner import train_run

    torch.set_num_threads(threads)
    accuracy = {}
    # The head choice matters (ASSETS: a frozen CLS+pooler head learns slowly): measure each.
    heads = {
        "mean pooling (default)": ["head.pooling=mean"],
        "cls, pooler frozen (as peft)": ["head.pooling=cls", "head.train_pooler=false"],
    }
    for label, overrides in heads.items():
        recipe = load_recipe(None, [*overrides, "measure.latency=false", "measure.memory=false"])
        with tempfile.TemporaryDirectory() as out:
            report = train_run(recipe, f"{out}/run", progress=False)
        accuracy[f"slimtune lora, {label}"] = report["metrics"]["accuracy"]
        print(f"slimtune lora, {label}: test accuracy {report['metrics']['accuracy']:.4f}", flush=True)

    # peft: same data pipeline and schedule, peft's model and injection.
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS")
    accuracy["peft lora"] = train_peft(config, [])["metrics"]["accuracy"]
    return accuracy


if __name__ == "__main__":
    main()
