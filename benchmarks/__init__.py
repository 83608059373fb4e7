"""Side-by-side benchmarks against the peers (peft, Opacus, dense baselines). Scripts, not tests:
each prints ratios measured in one run and writes benchmarks/results/<name>.json."""
