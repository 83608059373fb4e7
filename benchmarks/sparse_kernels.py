"""Does sparse storage buy sparse *speed* on this CPU? One MiniLM-L6 FFN layer pair (384 -> 1536
-> 384) on a batch of 32 x 128 tokens, at 85% and 90% sparsity, side by side in one process:
dense float32 ``F.linear`` (= 1.00), torch's sparse CSR weight (``W.to_sparse_csr()`` in
``torch.sparse.mm``), sparse BSR weight (32 x 32 blocks, on block-sparse weights, where it can
skip whole blocks), and torch.ao's dynamic int8 Linear (dense int8 GEMM), the export's int8 path.
Issue 21 asks to use a sparse kernel in ``export --sparse`` only where it is faster than dense;
this measures it (``export --sparse`` today stores sparse and computes dense).

    python -m benchmarks.sparse_kernels              # writes benchmarks/results/sparse_kernels.json
    python -m benchmarks.sparse_kernels --render-only
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from benchmarks.common import interleaved_medians, print_saved, write_result

NAME = "sparse_kernels"


def pruned(weight, sparsity: float, block: int | None):
    """``weight`` with the smallest-magnitude ``sparsity`` share zeroed: per entry, or per
    ``block`` x ``block`` tile (by the tile's L2 norm)."""
    if block is None:
        k = int(weight.numel() * sparsity)
        threshold = weight.abs().flatten().kthvalue(k).values
        return weight * (weight.abs() > threshold)
    rows, cols = weight.shape[0] // block, weight.shape[1] // block
    tiles = weight.reshape(rows, block, cols, block).permute(0, 2, 1, 3)
    norms = tiles.pow(2).sum((2, 3)).flatten()
    k = int(norms.numel() * sparsity)
    keep = (norms > norms.kthvalue(k).values).reshape(rows, cols, 1, 1)
    return (tiles * keep).permute(0, 2, 1, 3).reshape(weight.shape)


def layer_pair(args, sparsity: float, block: int | None) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from slimtune.compress.quantize import quantize_int8

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch * args.tokens, args.hidden, generator=g)
    up = pruned(torch.randn(args.ffn, args.hidden, generator=g) * 0.02, sparsity, block)
    down = pruned(torch.randn(args.hidden, args.ffn, generator=g) * 0.02, sparsity, block)
    csr = (up.to_sparse_csr(), down.to_sparse_csr())
    contenders = {
        "dense fp32": lambda: F.linear(F.linear(x, up), down),
        "CSR fp32": lambda: torch.sparse.mm(csr[1], torch.sparse.mm(csr[0], x.t())).t(),
    }
    if block is not None:
        bsr = (up.to_sparse_bsr((block, block)), down.to_sparse_bsr((block, block)))

        def bsr_pair():
            return torch.sparse.mm(bsr[1], torch.sparse.mm(bsr[0], x.t())).t()

        try:
            bsr_pair()
            contenders["BSR fp32"] = bsr_pair
        except (RuntimeError, NotImplementedError) as error:
            unsupported = f"BSR fp32: {str(error).splitlines()[0][:160]}"
        else:
            unsupported = None
    else:
        unsupported = None
    pair = nn.Sequential(nn.Linear(args.hidden, args.ffn, bias=False), nn.Linear(args.ffn, args.hidden, bias=False))
    with torch.no_grad():
        pair[0].weight.copy_(up)
        pair[1].weight.copy_(down)
    int8 = quantize_int8(pair)
    contenders["int8 dense GEMM"] = lambda: int8(x)
    with torch.no_grad():
        reference = contenders["dense fp32"]()
        errors = {name: float((fn() - reference).abs().max()) for name, fn in contenders.items()}
        medians = interleaved_medians(contenders, repeats=args.repeats)
    dense = medians["dense fp32"]
    return {"sparsity": sparsity, "pattern": f"{block}x{block} blocks" if block else "unstructured",
            "seconds": medians, "ratio_to_dense": {k: v / dense for k, v in medians.items()},
            "max_abs_error": errors, "unsupported": unsupported}


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    names = sorted({n for r in rows for n in r["seconds"]}, key=lambda n: (n != "dense fp32", n))
    lines = [f"| sparsity | pattern | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{r['seconds'][n] * 1000:.1f} ms ({r['ratio_to_dense'][n]:.2f})" if n in r["seconds"] else "-" for n in names]
        lines.append(f"| {r['sparsity']:.0%} | {r['pattern']} | {' | '.join(cells)} |")
    lines.append(f"\n{result['shape']}; {result['threads']} threads, load average {result['load_average'][0][0]:.2f} at the start; "
                 "time per forward of the layer pair, (ratio to dense fp32).")
    for r in rows:
        if r.get("unsupported"):
            lines.append(f"- {r['pattern']}: {r['unsupported']}")
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--sparsities", default="0.85,0.9")
    parser.add_argument("--block", type=int, default=32, help="BSR block size (block-sparse weights)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args(argv)
    if args.render_only:
        return print_saved(NAME, render)
    import torch

    torch.set_num_threads(args.threads)
    start = os.getloadavg()
    rows = []
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        for block in (None, args.block):
            rows.append(layer_pair(args, sparsity, block))
            print(rows[-1], flush=True)
    result = {"shape": f"x {args.batch * args.tokens} x {args.hidden} through {args.hidden} -> {args.ffn} -> {args.hidden}",
              "threads": args.threads, "load_average": [start, os.getloadavg()], "rows": rows}
    write_result(NAME, result)
    print(render(result))
    return result


#: docs/benchmarks.md's section (benchmarks/readme.py).
render_markdown = render


if __name__ == "__main__":
    main()
