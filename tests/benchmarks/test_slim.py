"""benchmarks/slim.py's arithmetic: which profiled ops count as not shrinking, the realisable
bound they imply, and the README rendering of the layout comparison."""

import pytest

from benchmarks.slim import fixed_ops, realisable_bound, render_markdown

SHAPE = "[[4096, 384]]"


def test_fixed_ops_are_same_op_same_shapes_as_often_and_never_matrix_products():
    dense = {("aten::add", SHAPE): (20.0, 12), ("aten::native_layer_norm", SHAPE): (10.0, 12),
             ("aten::gelu", "[[4096, 1536]]"): (30.0, 6), ("aten::addmm", "[[384], [4096, 384], [384, 384]]"): (140.0, 12),
             ("aten::copy_", SHAPE): (12.0, 24)}
    slim = {("aten::add", SHAPE): (20.0, 12), ("aten::native_layer_norm", SHAPE): (10.0, 12),
            ("aten::gelu", "[[4096, 384]]"): (8.0, 6),  # shrank: new shapes
            ("aten::addmm", "[[384], [4096, 384], [384, 384]]"): (100.0, 18),  # a product with a dense one's shapes
            ("aten::copy_", SHAPE): (18.0, 36)}  # 36 copies now, 24 of which the dense model also made
    fixed = fixed_ops(dense, slim)
    assert fixed["ops_ms"] == {"aten::add": 20.0, "aten::copy_": 12.0, "aten::native_layer_norm": 10.0}
    assert fixed["share"] == pytest.approx(42 / 156)
    assert fixed["dense_share"] == pytest.approx(42 / 212)


def test_realisable_bound():
    # dense 100 ms of which 20 fixed; slim at FLOP ratio 0.5 with the same 20 ms fixed:
    # ideal latency 20 + 80 * 0.5 = 60 -> saving 0.4 of the 0.5 FLOP saving = 0.8.
    fixed = {"share": 20 / 70, "dense_share": 0.2}
    assert realisable_bound(100.0, 70.0, 0.5, fixed) == pytest.approx(0.8)
    assert realisable_bound(100.0, 100.0, 1.0, fixed) is None


def test_render_shows_layouts_bounds_and_loads():
    row = {"latency_ms": 50.0, "latency_ratio": 0.55, "flop_ratio": 0.5, "flop_saving_realised": 0.9, "realisable_bound": 0.93}
    result = {
        "date": "2026-11-29 11:00", "settings": {"model": "minilm-l6", "batch_size": 32, "seq_len": 128, "threads": 2,
                                                  "repeats": 5, "criterion": "taylor", "layout": "local-r32", "recipe": "r"},
        "latency": {"fp32": {"latency_ms": 100.0, "latency_ratio": 1.0, "flop_ratio": 1.0}, "slim50": row},
        "layouts": {"global": {"slim50": {**row, "flop_saving_realised": 0.7, "latency_ratio": 0.65}},
                    "local-r32": {"slim50": row}},
        "best_layout": "local-r32",
        "fixed_ops": {"slim50": {"share": 0.2, "fixed_ms": 10.0, "realisable_bound": 0.93, "ops_ms": {"aten::add": 6.0}}},
        "load_before_timing": [2.5, 2.0, 2.0], "load_after_timing": [2.7, 2.1, 2.0],
        "timing_run": {"date": "2026-11-29 11:00", "layout": "local-r32"},
        "accuracy_run": {"started": "2026-11-29 10:00", "layout": "local-r32", "threads": 1},
    }
    text = render_markdown(result)
    assert "| slim50 | 50 | 0.55 | 0.50 | 0.90 | 0.93 |  |" in text
    assert "| global: ranked across all layers (uneven widths) | 0.70 (0.65) |" in text
    assert "| slim50 | 20% | 10 | 0.93 | 0.90 | add 6 |" in text
    assert "realisable bound 0.93..0.93" in text and "when timing began: 2.5, after: 2.7" in text
    assert "Note:" not in text
