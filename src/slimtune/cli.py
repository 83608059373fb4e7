"""The ``slimtune`` command line: run | train | eval | report | export | bench | list.

Every user error prints one line (``error: ...``) and exits with code 2; nothing is overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

# Offline by construction: the zoo's models and data come from installed packages.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from slimtune.errors import SlimtuneError  # noqa: E402

EPILOG = """\
examples:
  slimtune run                                   the main job: LoRA on minilm-l6 + movie-sentiment
  slimtune train recipes/lora.yaml --set train.lr=5e-4 --out runs/lora
  slimtune train recipes/lora.yaml --set method.r=16 --set task.name=trec-6
  slimtune eval runs/lora                        reload base + delta, re-evaluate the test split
  slimtune eval runs/lora --attack pgd --attack-radius 0.1   accuracy under attack, merged into report.json
  slimtune report runs/lora                      print a run's report card again (from its report.json)
  slimtune export runs/lora --peft lora-peft     the LoRA delta as a peft adapter directory
  slimtune export runs/lora --out ship --slim heads=0.5,ffn=0.5 --int8   a slim int8 model for load_exported
  slimtune export runs/lora --out runs/lora-r4 --lora-rank 4   the LoRA delta truncated to rank 4 (a run dir)
  slimtune list methods                          every method's fields, defaults and meaning
  slimtune list methods --json                   the same as JSON, for scripts
  slimtune bench suites/quick.yaml --out runs/quick   methods x seeds -> tables + Pareto plots

two processes on CPU (gloo):
  torchrun --nproc_per_node 2 -m slimtune train recipes/lora.yaml --out runs/lora-2p
"""


BENCH_DESCRIPTION = """\
Run every cell of a suite (one run directory each, under DIR/runs/<cell-id>), then compare them:
DIR/results.jsonl (one line per cell: id, status, overrides, report.json), DIR/report.md and
DIR/report.html (per task and method: mean ± std over seeds of the task metric, trainable
parameters, stored bytes, inference FLOPs, training peak memory, step time, ε when private) and
DIR/plots/*.png (the metric against each cost, Pareto front highlighted).

A suite is either a base recipe plus a grid of --set paths (their cartesian product):

  recipe: recipes/lora.yaml          # a path, or an inline recipe mapping
  grid:
    method: [lora, bitfit, linear-probe]   # 'method' replaces the whole method section
    task.name: [movie-sentiment, trec-6]
    train.seed: [0, 1, 2]
  set: {model.name: minilm-l2, train.epochs: 1}   # every cell
  per_method: {full: {train.lr: 5.0e-5}}          # cells of that method only

or a list of recipes, each with optional overrides (and optionally crossed with a grid):

  runs:
    - recipes/lora.yaml
    - {recipe: recipes/lora.yaml, set: {method.r: 16}, id: lora-r16}

Cell ids are readable and stable (e.g. lora__movie-sentiment__seed0). Rerunning with the same
--out resumes: finished cells (report.json present) are skipped; an interrupted cell resumes from
its last intact checkpoint, or starts over if it has none; failed cells are retried. A failing
cell is recorded with its error and the others go on."""

BENCH_EPILOG = """\
examples:
  slimtune bench suites/quick.yaml --out runs/quick        4 methods x 2 seeds, minilm-l2
  slimtune bench suites/quick.yaml --out runs/quick --dry-run
  slimtune bench suites/paper.yaml --out runs/paper --only 'lora__*'
  slimtune bench suites/quick.yaml --out runs/quick --report-only
"""


def _add_attack_args(parser: argparse.ArgumentParser, what: str) -> None:
    """The --attack flags (eval, bench); their defaults are :class:`slimtune.measure.attacks.AttackConfig`'s."""
    parser.add_argument("--attack", metavar="pgd|substitution", help=f"{what}: pgd (L2 PGD on the word embeddings) or "
                        "substitution (greedy nearest-neighbour word swaps); see docs/robustness.md")
    parser.add_argument("--attack-radius", type=float, default=1.0, help="pgd: L2 budget per example (default 1.0)")
    parser.add_argument("--attack-steps", type=int, default=5, help="pgd: steps (default 5)")
    parser.add_argument("--attack-step-size", type=float, default=0.03, help="pgd: step size (default 0.03)")
    parser.add_argument("--attack-init-radius", type=float, default=0.05, help="pgd: scale of the random start (default 0.05)")
    parser.add_argument("--attack-max-change", type=float, default=0.2, help="substitution: fraction of words that may change (default 0.2)")
    parser.add_argument("--attack-candidates", type=int, default=20, help="substitution: neighbours tried per word (default 20)")
    parser.add_argument("--attack-examples", type=int, help="attack only the first N test examples (attacks are slow on CPU)")
    parser.add_argument("--attack-seed", type=int, default=0, help="seed of the pgd start (default 0)")


def _attack_config(args):
    """The checked :class:`AttackConfig` of the --attack flags, or None without --attack."""
    if args.attack is None:
        return None
    from slimtune.measure.attacks import AttackConfig

    return AttackConfig(args.attack, radius=args.attack_radius, steps=args.attack_steps, step_size=args.attack_step_size,
                        init_radius=args.attack_init_radius, max_change=args.attack_max_change, candidates=args.attack_candidates,
                        examples=args.attack_examples, seed=args.attack_seed).check()


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override a recipe field (repeatable), e.g. --set train.lr=5e-4 --set method.r=16; "
        "model=NAME, task=NAME and method=NAME replace the whole section (task.name=NAME keeps the other task fields)",
    )
    parser.add_argument("--out", type=Path, help="run directory to create (default: runs/<method>-<task>-<time>)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (the per-epoch loss/validation lines stay)")
    parser.add_argument("--json", action="store_true", help="print report.json instead of the table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimtune",
        description="Adapt pre-trained transformers cheaply and ship them slim. Every run writes a "
        "run directory (recipe.yaml, delta.safetensors + delta.json, report.json) and prints a report card.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="the main job: LoRA on minilm-l6 + movie-sentiment (a few minutes), with a report card",
        description="Train the embedded default recipe (LoRA r=8 on minilm-l6, movie-sentiment, 2,000 training "
        "sentences, 2 epochs) and print its report card. Any field can be changed with --set.",
    )
    _add_recipe_args(run)

    train = sub.add_parser(
        "train", help="train a recipe (YAML) and write a run directory",
        description="Train RECIPE (see recipes/ and `slimtune list recipes`), evaluate on the test split, "
        "measure the cost, and write the run directory.",
        epilog="examples:\n  slimtune train recipes/lora.yaml --set train.epochs=3 --out runs/lora3\n"
        "  slimtune train recipes/dp-lora.yaml --set privacy.epsilon=3 --out runs/dp3   DP-SGD after a DP linear probe of the head\n"
        "  slimtune train recipes/dp-lora.yaml --set privacy.linear_probe.steps=0 --out runs/dp-noprobe   DP-SGD from a random head\n"
        "  slimtune train recipes/distill.yaml --out runs/distill   MiniLM-L2 taught by the MiniLM-L6 run of recipes/full.yaml (runs/full)\n"
        "  slimtune train recipes/prune-ofa-pretrain.yaml --out runs/pretrain-85   a sparse pre-trained MiniLM-L6 (Prune Once for All), then\n"
        "  slimtune export runs/pretrain-85 --out models/minilm-l6-sparse-85 --merge   its model directory, for recipes/prune-ofa-transfer.yaml\n"
        "  slimtune train recipes/public-amazon-lora.yaml --out runs/public-amazon-lora   a non-private run on public data, then\n"
        "  slimtune train recipes/dp-lora-public.yaml   DP-SGD starting from it (train.init_from: runs/public-amazon-lora)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("recipe", type=Path, help="a recipe YAML file")
    _add_recipe_args(train)
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run in RUN_DIR from its last good checkpoint")

    ev = sub.add_parser(
        "eval", help="reload base + delta from a run directory and re-evaluate",
        description="Rebuild the base model, load the run's delta (refused if it was made for another base), "
        "evaluate on the test split and print the metrics next to the run's report card.",
    )
    ev.add_argument("run_dir", type=Path, help="a run directory written by `slimtune train`/`run`")
    ev.add_argument("--task", help="evaluate on another zoo task; refused unless it has the run's labels (same count and names)")
    ev.add_argument("--label-map", metavar="TASK=RUN,...", help="with --task: which of its labels is which of the run's, "
                    "e.g. --label-map ham=negative,spam=positive; labels with the same name need no entry")
    ev.add_argument("--force", action="store_true", help="load the delta even if its base fingerprint differs")
    ev.add_argument("--json", action="store_true", help="print JSON")
    _add_attack_args(ev, "also measure accuracy under attack on the test split and merge it into the run's report.json "
                     "(section robustness; not with --task, --label-map or --force)")

    rep = sub.add_parser(
        "report", help="print a run's report card (from its report.json)",
        description="Print the report card of a finished run from its report.json, with what was measured after "
        "training (e.g. `slimtune eval RUN --attack pgd`).",
    )
    rep.add_argument("run_dir", type=Path, help="a run directory written by `slimtune train`/`run`")
    rep.add_argument("--json", action="store_true", help="print report.json")

    export = sub.add_parser(
        "export", help="ship a run: merged / slimmed / int8 / bf16 model directory, or a peft adapter",
        description="Export a run directory. --out DIR writes the run's model with its delta merged "
        "(optionally --slim: least important heads/neurons physically removed, --int8 or --bf16), loadable with "
        "slimtune.load_exported(DIR) (also plain Hugging Face format where a transformers class computes the same: "
        "a [CLS]-pooled head, unslimmed or slimmed within what the config expresses; a mean-pooled head is not, and a bare "
        "from_pretrained then fails; slimtune_export.json says which), plus "
        "DIR/export_report.json (size, params, FLOPs, latency, task metrics vs the dense merged model). "
        "--peft OUT writes a LoRA run as a peft adapter directory that peft.PeftModel.from_pretrained(base, OUT) loads.",
    )
    export.add_argument("run_dir", type=Path, help="a run directory written by `slimtune train`/`run`")
    export.add_argument("--peft", type=Path, metavar="OUT", help="new directory for the peft adapter (LoRA runs only)")
    export.add_argument("--out", type=Path, metavar="DIR", help="new (or empty) directory for the exported model")
    export.add_argument("--merge", action="store_true", help="merge the delta into the base (implied by --slim/--int8/--bf16)")
    export.add_argument("--slim", metavar="SPEC", help="remove structure, e.g. heads=0.5,ffn=0.5 or "
                        "heads=0.5,ffn=0.5,scope=local,multiple=32 (fractions removed, chosen by importance on the task's "
                        "training data); keys: heads, ffn, criterion=magnitude|delta|taylor|fisher (default taylor), "
                        "scope=local|global (default local: the same share in every layer), multiple=N (kept FFN neurons "
                        "per layer rounded to a multiple of N; default 32, 1 = exact), batches=N (default 8)")
    export.add_argument("--lora-rank", metavar="K", help="truncate the LoRA update to its top K singular directions "
                        "(an integer rank, or a kept fraction of r such as 0.5); alone with --out: DIR is a run directory "
                        "with the smaller delta (slimtune eval DIR reads it); with --merge/--slim/--int8/--bf16: merged after")
    export.add_argument("--int8", action="store_true", help="dynamic int8 Linear layers (CPU inference)")
    export.add_argument("--bf16", action="store_true", help="bfloat16 weights")
    export.add_argument("--sparse", action="store_true", help="store Linear weights that have zeros as positions + values "
                        "(float32, or int8 with --int8); export_report.json gets the encoder compression (dense fp32 bytes / stored)")
    export.add_argument("--threads", type=int, default=2, help="torch threads for the latency measurement (default 2)")
    export.add_argument("--no-measure", dest="measure", action="store_false", help="skip the accuracy/latency report (faster)")
    export.add_argument("--force", action="store_true", help="load the delta even if its base fingerprint differs")

    bench = sub.add_parser(
        "bench", help="run a suite of recipes x a grid; write results.jsonl, report.md/html and Pareto plots",
        description=BENCH_DESCRIPTION, epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("suite", type=Path, help="a suite YAML file (see suites/quick.yaml)")
    bench.add_argument("--out", type=Path, metavar="DIR", help="bench directory (default: runs/bench-<suite name>); rerun with the same --out to resume")
    bench.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override a field in every cell, after the suite's own settings (repeatable)",
    )
    bench.add_argument("--only", action="append", metavar="GLOB", help="run only the cells whose id matches (repeatable), e.g. --only 'lora__*'")
    bench.add_argument("--dry-run", action="store_true", help="list the cells and their overrides; run nothing")
    bench.add_argument("--report-only", action="store_true", help="rebuild report.md/html and the plots from DIR/results.jsonl; run nothing")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar over the cells")
    _add_attack_args(bench, "also attack every finished cell not yet measured under this attack (no retraining; merged into its "
                     "report.json) and add its accuracy as a column")
    bench.add_argument("--plot-y", metavar="metric|ATTACK", help="y-axis of the Pareto plots: the task metric (default) or the accuracy "
                       "under an attack, named as its report.md column (e.g. pgd, pgd:radius=0.1)")

    ls = sub.add_parser(
        "list", help="list models, tasks, methods or recipes (--json for scripts)",
        description="List what slimtune has: a table on a terminal, plain untruncated lines in a pipe or file, "
        "or JSON with --json.",
        epilog="examples:\n  slimtune list methods | grep reduction_factor\n"
        "  slimtune list methods --json   name, description, paper, fields (name, type, default, required, description)\n"
        "  slimtune list tasks --json     name, kind, labels, metric, installed, source\n"
        "  slimtune list models --json    name, family, params, installed, dir (once there), package",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("what", choices=["models", "tasks", "methods", "recipes"], help="what to list")
    ls.add_argument("--json", action="store_true", help="print a JSON list (one object per entry) instead of a table")
    return parser


def _default_out(recipe) -> Path:
    task = recipe.task.name or Path(recipe.task.file or "data").stem
    return Path("runs") / f"{recipe.method_label}-{task}-{datetime.now():%Y%m%d-%H%M%S}"


def cmd_train(args, recipe_path: Path | None) -> int:
    import json

    from slimtune.recipe import blame, load_recipe

    if args.resume is not None:
        if args.out is not None and args.out.resolve() != args.resume.resolve():
            raise SlimtuneError(f"--out {args.out} with --resume {args.resume}: a resumed run continues in its own directory; drop --out")
        source = recipe_path or args.resume / "recipe.yaml"
        recipe = load_recipe(source, args.overrides)
        out = args.resume
    else:
        recipe = load_recipe(recipe_path, args.overrides)
        out = args.out or _default_out(recipe)
    from slimtune.zoo.tasks import check_task_name

    members = recipe.task.tasks or [recipe.task]
    for index, member in enumerate(members):
        where = "task.name" if recipe.task.tasks is None else f"task.tasks.{index}.name"
        try:
            check_task_name(member.loader_spec())
        except SlimtuneError as exc:
            raise SlimtuneError(blame(args.overrides, where, recipe.source, str(exc) if recipe.task.tasks is None else f"task.tasks.{index}: {exc}")) from None
    # The runner brings in transformers, accelerate and datasets: only once the input was checked.
    from slimtune.measure.report import print_report
    from slimtune.runner import train_run

    report = train_run(recipe, out, resume=args.resume is not None, progress=not args.no_progress)
    if report:
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            print_report(report)
            print(f"run directory: {out}")
    return 0


def cmd_bench(args) -> int:
    from slimtune.bench import describe_cells, expected_attack_keys, load_suite, read_results, run_suite

    attack = _attack_config(args)
    plot_y = _plot_y(args.plot_y)
    suite = load_suite(args.suite, args.overrides)
    out = args.out or Path("runs") / f"bench-{suite.name}"
    if args.dry_run:
        print(f"{len(suite.cells)} cells; run directories under {out / 'runs'}")
        for line in describe_cells(suite):
            print(f"  {line}")
        return 0
    if args.report_only and attack is not None:
        raise SlimtuneError("--attack with --report-only: --report-only runs nothing; drop one of them")
    if plot_y is not None:
        if args.report_only:
            from slimtune.measure.robustness import attacked_accuracies

            keys = {k for row in read_results(out) for k in attacked_accuracies(row.get("report") or {})}
        else:
            keys = expected_attack_keys(suite, out, attack)
        if plot_y not in keys:
            found = ", ".join(sorted(keys)) or "none (add --attack NAME, or a robustness section to the recipes)"
            raise SlimtuneError(f"--plot-y {plot_y}: no cell is measured under this attack; measured: {found}")
    if args.report_only:
        from slimtune.measure.compare import write_reports

        paths = write_reports(out, read_results(out), title=f"slimtune bench: {suite.name}", description=suite.description, plot_y=plot_y)
    else:
        rows = run_suite(suite, out, only=args.only, progress=not args.no_progress, attack=attack, plot_y=plot_y)
        failed = [r for r in rows if r["status"] == "failed"]
        attack_failed = [r for r in rows if r.get("attack_error")]
        done = sum(r["status"] == "ok" for r in rows)
        print(f"{done} of {len(rows)} cells finished" + (f", {len(failed)} failed (see report.md)" if failed else "")
              + (f", {len(attack_failed)} could not be attacked (see report.md)" if attack_failed else ""))
        paths = {"markdown": out / "report.md", "html": out / "report.html"}
    print(f"results: {out / 'results.jsonl'}\nreport:  {paths['markdown']}\n         {paths['html']}")
    return 0


def _plot_y(value: str | None) -> str | None:
    """``--plot-y``: None for the task metric, else an attack key (checked: its attack exists)."""
    if value is None or value == "metric":
        return None
    from slimtune.measure.attacks import ATTACKS

    if value.split(":")[0] not in ATTACKS:
        raise SlimtuneError(f"--plot-y {value}: give metric or an attack key, the name of a report.md column such as "
                            f"pgd or pgd:radius=0.1 (attacks: {', '.join(ATTACKS)})")
    return value


def _parse_label_map(text: str) -> dict[str, str]:
    """``ham=negative,spam=positive`` -> {"ham": "negative", "spam": "positive"}."""
    mapping: dict[str, str] = {}
    for pair in text.split(","):
        name, sep, target = (part.strip() for part in pair.partition("="))
        if not sep or not name or not target:
            raise SlimtuneError(f"--label-map: '{pair.strip()}' is not TASK_LABEL=RUN_LABEL; give e.g. --label-map ham=negative,spam=positive")
        if name in mapping:
            raise SlimtuneError(f"--label-map: '{name}' is mapped twice")
        mapping[name] = target
    return mapping


def cmd_eval(args) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    label_map = _parse_label_map(args.label_map) if args.label_map is not None else None
    _require_run_dir(args.run_dir)
    from slimtune.runner import evaluate_run

    attack = _attack_config(args)
    result = evaluate_run(args.run_dir, task=args.task, force=args.force, label_map=label_map, attack=attack)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    table = Table(title=f"slimtune eval {args.run_dir} ({result['task']}, {result['n_test']} test examples)", title_justify="left")
    table.add_column("metric")
    table.add_column("re-evaluated")
    table.add_column("report card")
    saved = result.get("report_metrics") or {}
    for key, value in result["metrics"].items():
        table.add_row(key, f"{value:.4f}", f"{saved[key]:.4f}" if key in saved else "-")
    Console().print(table)
    if attack is not None:
        found = result["attack"]
        shown = Table(title=f"--attack {found['key']} ({found['examples']} test examples)", title_justify="left")
        shown.add_column("metric")
        shown.add_column("value")
        for key, value in found.items():
            if key not in ("config", "key"):
                shown.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        Console().print(shown)
        print(result["saved"], file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    import json

    from slimtune.io import read_json

    _require_run_dir(args.run_dir)
    path = args.run_dir / "report.json"
    if not path.is_file():
        raise SlimtuneError(f"{args.run_dir}: no report.json there; the run has not finished (resume it with slimtune train RECIPE --resume {args.run_dir})")
    report = read_json(path)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    from slimtune.measure.report import print_report

    print_report(report, title=f"slimtune report card: {args.run_dir}")
    return 0


def cmd_export(args) -> int:
    model_flags = args.out or args.merge or args.slim or args.int8 or args.bf16 or args.sparse or args.lora_rank is not None
    if args.peft is not None:
        if model_flags:
            raise SlimtuneError("export: --peft OUT exports the delta alone; it does not combine with --out/--merge/--slim/--int8/--bf16/--lora-rank")
        _require_run_dir(args.run_dir)
        from slimtune.runner import export_peft

        config = export_peft(args.run_dir, args.peft)
        print(f"peft adapter ({config['task_type']}, r={config['r']}, {len(config['target_modules'])} LoRA modules) written to {args.peft}")
        return 0
    if args.out is None:
        raise SlimtuneError("export: give --out DIR (with --merge, --slim SPEC, --int8, --bf16 or --lora-rank K) or --peft OUT")
    if args.threads < 1:
        raise SlimtuneError(f"--threads {args.threads}: must be >= 1")
    from slimtune.compress.export import parse_slim_spec  # it checks --slim before the run directory
    from slimtune.runner import export_lora_rank, export_run

    spec = parse_slim_spec(args.slim) if args.slim is not None else None
    rank = None
    if args.lora_rank is not None:
        from slimtune.compress.lora_rank import parse_lora_rank, summary_lines

        rank = parse_lora_rank(args.lora_rank)
        if not (args.merge or spec or args.int8 or args.bf16 or args.sparse):
            report = export_lora_rank(args.run_dir, args.out, rank, measure=args.measure, force=args.force)
            print("\n".join(summary_lines(report, args.out)))
            return 0
    report = export_run(args.run_dir, args.out, merge=args.merge, slim=spec, int8=args.int8, bf16=args.bf16, sparse=args.sparse,
                        measure=args.measure, threads=args.threads, force=args.force, lora_rank=rank)
    print(f"exported ({'+'.join(report['export']['kinds'])}, {report['export']['layout']} layout) to {args.out}")
    if sparse := report["export"].get("sparse"):
        print(f"  encoder: {sparse['encoder_dense_fp32_bytes'] / 1e6:.2f} MB dense fp32 -> {sparse['encoder_stored_bytes'] / 1e6:.2f} MB stored "
              f"({sparse['encoder_compression']:.1f}x; Linear weights {sparse['linear_weight_sparsity']:.1%} zero)")
    if "exported" in report:
        ref, new = report["reference"], report["exported"]
        # A bare model (a pre-training stage, objective features) has no task metric.
        if metric := "accuracy" if "accuracy" in new["metrics"] else next(iter(new["metrics"]), None):
            print(f"  {metric}: {ref['metrics'][metric]:.4f} -> {new['metrics'][metric]:.4f}")
        for key, label in (("params", "params"), ("flops_per_example", "FLOPs/example"), ("latency_ms_median", "latency ms")):
            print(f"  {label}: {ref[key]:.4g} -> {new[key]:.4g} ({report['ratios'].get(key, float('nan')):.2f}x)")
        print(f"  size on disk: {report['size_bytes'] / 1e6:.1f} MB  (report: {args.out / 'export_report.json'})")
    return 0


def _require_run_dir(run_dir: Path) -> None:
    """Fail before torch is imported (the runner and the exporter check again, for API callers)."""
    if not run_dir.is_dir():
        raise SlimtuneError(f"{run_dir}: run directory does not exist")


def cmd_list(args) -> int:
    from slimtune.listing import print_listing

    print_listing(args.what, as_json=args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            args.resume = None
            return cmd_train(args, None)
        if args.command == "train":
            return cmd_train(args, args.recipe)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "list":
            return cmd_list(args)
        if args.command == "bench":
            return cmd_bench(args)
    except SlimtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `slimtune list methods | head`: the reader is gone; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail again
        return 141  # what a shell reports for a process ended by SIGPIPE
    except KeyboardInterrupt:
        if args.command == "bench":
            print("interrupted; rerun the same command to resume (finished cells are skipped)", file=sys.stderr)
        else:
            print("interrupted; resume with: slimtune train RECIPE --resume RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
