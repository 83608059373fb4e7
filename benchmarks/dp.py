"""DP-SGD step time: slimtune vs non-private and vs Opacus, on minilm-l6 + movie-sentiment.

One physical batch of 32 real movie-sentiment sentences padded to 64 tokens; a step is forward,
backward, per-sample clipping, noise and the AdamW step (noise multiplier 1, clip 1). Timed as
interleaved medians in one run, so machine noise hits every contender alike.

  DP-LoRA (r=8, alpha 16 on query/value + classifier): ours / non-private LoRA    goal <= 1.05
                                                       ours / Opacus (peft LoRA + make_private, hooks mode)  goal <= 0.95
  DP full fine-tuning (every parameter private):       ours / Opacus hooks mode   goal <= 0.6

    python -m benchmarks.dp [--repeats 3] [--threads 2] [--skip-full]
"""

from __future__ import annotations

import argparse
import copy
import warnings

from benchmarks.common import interleaved_medians, print_rows, write_result

BATCH, SEQ, SIGMA, CLIP = 32, 64, 1.0, 1.0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-full", action="store_true", help="only the DP-LoRA comparison")
    parser.add_argument("--opacus-ghost", action="store_true", help="also time Opacus' ghost-clipping mode on DP-LoRA")
    args = parser.parse_args(argv)

    import torch

    from slimtune.zoo.models import load_model, load_tokenizer
    from slimtune.zoo.tasks import load_task

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer("minilm-l6")
    task = load_task("movie-sentiment", split_seed=0, train_size=BATCH, eval_size=10, seed=0)
    rows = task.splits["train"]
    batch = dict(tokenizer(list(rows["text"]), padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt"))
    # Explicit per-row position ids: Opacus cannot take per-sample gradients of an embedding whose
    # input (1, T) is shared by the batch (ours can); the same inputs for every contender.
    batch["position_ids"] = torch.arange(SEQ).expand(BATCH, SEQ).contiguous()
    labels = torch.tensor(list(rows["label"]))
    torch.manual_seed(0)
    base = load_model("minilm-l6", num_labels=2)
    base.train()

    contenders = {}
    contenders["lora non-private"] = plain_step(ours_lora(base), batch, labels)
    contenders["lora DP ours"] = ours_dp_step(ours_lora(base), batch, labels)
    contenders["lora DP opacus"] = opacus_step(peft_lora(base), batch, labels, "hooks")
    if args.opacus_ghost:
        contenders["lora DP opacus ghost"] = opacus_step(peft_lora(base), batch, labels, "ghost")
    if not args.skip_full:
        contenders["full non-private"] = plain_step(full(base), batch, labels)
        contenders["full DP ours"] = ours_dp_step(full(base), batch, labels)
        contenders["full DP opacus"] = opacus_step(full(base), batch, labels, "hooks")
    times = interleaved_medians(contenders, repeats=args.repeats, warmup=1)

    result = {
        "settings": {"model": "minilm-l6", "task": "movie-sentiment", "physical_batch": BATCH, "seq_len": SEQ, "noise_multiplier": SIGMA, "max_grad_norm": CLIP,
                     "lora": {"r": 8, "alpha": 16, "targets": ["query", "value"]}, "threads": args.threads, "repeats": args.repeats},
        "step_seconds": times,
        "lora_dp_vs_non_private": times["lora DP ours"] / times["lora non-private"],
        "lora_dp_vs_opacus": times["lora DP ours"] / times["lora DP opacus"],
        "opacus_lora_vs_non_private": times["lora DP opacus"] / times["lora non-private"],
    }
    rows_out = [
        ("DP-LoRA ours / non-private LoRA (goal <= 1.05)", result["lora_dp_vs_non_private"]),
        ("DP-LoRA ours / Opacus hooks (goal <= 0.95)", result["lora_dp_vs_opacus"]),
        ("DP-LoRA Opacus hooks / non-private", result["opacus_lora_vs_non_private"]),
    ]
    if args.opacus_ghost:
        result["opacus_ghost_lora_vs_non_private"] = times["lora DP opacus ghost"] / times["lora non-private"]
        rows_out.append(("DP-LoRA Opacus ghost / non-private", result["opacus_ghost_lora_vs_non_private"]))
    if not args.skip_full:
        result["full_dp_vs_opacus"] = times["full DP ours"] / times["full DP opacus"]
        result["full_dp_vs_non_private"] = times["full DP ours"] / times["full non-private"]
        result["opacus_full_vs_non_private"] = times["full DP opacus"] / times["full non-private"]
        rows_out += [
            ("DP full FT ours / Opacus hooks (goal <= 0.6)", result["full_dp_vs_opacus"]),
            ("DP full FT ours / non-private full FT", result["full_dp_vs_non_private"]),
            ("DP full FT Opacus hooks / non-private", result["opacus_full_vs_non_private"]),
        ]
    rows_out += [(f"step seconds: {k}", v) for k, v in times.items()]
    print_rows("DP-SGD step time (minilm-l6, batch 32 x 64 tokens)", rows_out)
    write_result("dp", result)
    return result


# -- models ---------------------------------------------------------------------------------------
def ours_lora(base):
    from slimtune.methods.base import Arch, get_method_class
    from slimtune.methods.delta import Delta
    from slimtune.recipe import MethodSpec

    model = copy.deepcopy(base)
    spec = MethodSpec(name="lora", config=get_method_class("lora").Config(r=8, alpha=16))
    Delta.from_specs([spec], train_pooler=False).attach(model, Arch.of(model))
    return model


def peft_lora(base):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS")
    return get_peft_model(copy.deepcopy(base), config)


def full(base):
    model = copy.deepcopy(base)
    model.requires_grad_(True)
    return model


# -- steps ----------------------------------------------------------------------------------------
def plain_step(model, batch, labels):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ours_dp_step(model, batch, labels):
    import torch

    from slimtune.privacy.per_sample import PerSampleClipper, per_sample_losses

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)
    clipper = PerSampleClipper(model, params)
    target = {**batch, "labels": labels}
    generator = torch.Generator().manual_seed(0)

    def forward():
        return per_sample_losses(model(**batch), target, "classification")

    def step():
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        clipper.clipped_sum(forward, BATCH, CLIP, sums)
        for name, p in params.items():
            p.grad = (sums[name] + torch.normal(0.0, SIGMA * CLIP, size=p.shape, generator=generator)) / BATCH
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def opacus_step(model, batch, labels, mode):
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model.train()  # before make_private, or Opacus finds no activations
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loader = DataLoader(TensorDataset(batch["input_ids"]), batch_size=BATCH)
    engine = PrivacyEngine(accountant="prv")
    criterion = torch.nn.CrossEntropyLoss()
    if mode == "ghost":
        module, optimizer, criterion, _ = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
                                                              noise_multiplier=SIGMA, max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode="ghost")
    else:
        module, optimizer, _ = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=SIGMA,
                                                   max_grad_norm=CLIP, poisson_sampling=False, grad_sample_mode=mode)

    def step():
        logits = module(**batch).logits
        loss = criterion(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


if __name__ == "__main__":
    main()
