"""Run the side-by-side peer benchmarks and regenerate docs/benchmarks.md's results section.

    python -m benchmarks                 every benchmark script present, then docs/benchmarks.md
    python -m benchmarks --quick         each script's quick mode (skips the long accuracy runs)
    python -m benchmarks --only dp       one benchmark (repeatable)
    python -m benchmarks --render-only   only rewrite docs/benchmarks.md from benchmarks/results/

Each script ``benchmarks/<name>.py`` has ``main(argv) -> dict`` and writes
``benchmarks/results/<name>.json``. Scripts not written yet are skipped. The section of
docs/benchmarks.md between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is rendered from all
the JSON files present (see benchmarks/readme.py); the README links to that page. ``make bench``
runs this.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import traceback
from pathlib import Path

from benchmarks import readme
from benchmarks.common import RESULTS

#: The benchmark scripts, in the order of docs/benchmarks.md.
KNOWN = ["lora_vs_peft", "methods_table", "dp", "memory", "slim", "sparse_adapter", "dsee", "vision", "tickets", "sparse_kernels", "prune_ofa", "multitask"]
ROOT = Path(__file__).resolve().parent.parent
#: The page whose marked section is rendered from the results (the README links to it).
PAGE = ROOT / "docs" / "benchmarks.md"


def available() -> list[str]:
    return [name for name in KNOWN if importlib.util.find_spec(f"benchmarks.{name}") is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", metavar="NAME", help=f"run only this benchmark (repeatable); known: {', '.join(KNOWN)}")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script (shorter, no accuracy runs)")
    parser.add_argument("--render-only", action="store_true", help="run nothing; rewrite the results page's section from the JSON results")
    parser.add_argument("--page", type=Path, default=PAGE, help="the page to update (default: %(default)s)")
    parser.add_argument("--print", dest="print_only", action="store_true", help="do not touch the page; print the section instead")
    args = parser.parse_args(argv)

    present = available()
    if args.only:
        unknown = [n for n in args.only if n not in KNOWN]
        if unknown:
            parser.error(f"--only {unknown[0]}: unknown benchmark; known: {', '.join(KNOWN)}")
        missing = [n for n in args.only if n not in present]
        if missing:
            parser.error(f"--only {missing[0]}: benchmarks/{missing[0]}.py does not exist yet; present: {', '.join(present)}")
    selected = [] if args.render_only else [n for n in present if not args.only or n in args.only]

    failed: list[str] = []
    for name in selected:
        print(f"== benchmarks/{name}.py" + (" --quick" if args.quick else ""), flush=True)
        started = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            module.main(["--quick"] if args.quick else [])
        except SystemExit as exc:  # argparse inside a script
            if exc.code not in (0, None):
                failed.append(name)
        except Exception:  # one broken benchmark does not stop the others
            traceback.print_exc()
            failed.append(name)
        print(f"== {name}: {'FAILED' if name in failed else 'done'} in {time.perf_counter() - started:.0f} s", flush=True)

    section = readme.render_section(readme.load_results(RESULTS, KNOWN))
    if args.print_only:
        print(section)
    elif not args.page.is_file():
        print(f"{args.page}: not found; section not written", file=sys.stderr)
    elif readme.update_page(args.page, section):
        print(f"updated the results section of {args.page}")
    else:
        print(f"{args.page}: no {readme.START} ... {readme.END} markers; add them where the section belongs", file=sys.stderr)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
