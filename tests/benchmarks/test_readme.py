"""`python -m benchmarks`: discovery of the scripts present, and the results section of
docs/benchmarks.md rendered from benchmarks/results/*.json between the markers (nothing else on the
page changes; the README only links to it)."""

import json

import benchmarks.__main__ as entry
from benchmarks import readme


LORA = {
    "benchmark": "lora_vs_peft", "date": "2026-11-29 04:00", "machine": {"cpus": 2, "torch_threads": 2, "torch": "2.13.0"},
    "settings": {"model": "minilm-l6", "batch_size": 32, "seq_len": 64, "r": 8, "alpha": 16, "targets": ["query", "value"]},
    "step_ratio": 0.91, "inject_ratio": 0.2, "max_abs_logit_diff": 1.2e-6, "merged_latency_ratio": 1.01,
    "accuracy": {"slimtune lora": 0.83, "peft lora": 0.823},
}


def test_render_known_and_generic_results():
    section = readme.render_section({"lora_vs_peft": LORA, "future_thing": {"speedup": 2.5, "nested": {"bytes": 1024}, "history": [{"a": 1}]}})
    assert "### slimtune LoRA vs peft LoRA" in section
    assert "| train step time, slimtune / peft | 0.91 | <= 0.95 |" in section
    assert "test accuracy: peft lora | 0.823" in section
    assert "### future thing" in section and "| nested.bytes | 1,024 |" in section and "history" not in section
    assert "2 CPUs" in section


def test_page_section_is_replaced_between_markers_only(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (results / "lora_vs_peft.json").write_text(json.dumps(LORA))
    monkeypatch.setattr(entry, "RESULTS", results)
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# title\n\nintro\n\n{readme.START}\nold table\n{readme.END}\n\nafter\n")
    assert entry.main(["--render-only", "--page", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# title\n\nintro\n\n") and text.endswith(f"{readme.END}\n\nafter\n")
    assert "old table" not in text and "0.91" in text
    # Idempotent, and a page without markers is left alone.
    assert entry.main(["--render-only", "--page", str(page)]) == 0 and page.read_text() == text
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert entry.main(["--render-only", "--page", str(plain)]) == 0 and plain.read_text() == "no markers\n"


def test_default_page_is_docs_benchmarks_not_the_readme(tmp_path, monkeypatch, capsys):
    """The renderer writes docs/benchmarks.md; the README has no markers (only a headline table)."""
    assert entry.PAGE == entry.ROOT / "docs" / "benchmarks.md"
    page = entry.PAGE.read_text(encoding="utf-8")
    assert page.count(readme.START) == 1 and page.count(readme.END) == 1
    assert readme.START not in (entry.ROOT / "README.md").read_text(encoding="utf-8")
    # --print leaves every file alone and prints the section.
    results = tmp_path / "results"
    results.mkdir()
    (results / "lora_vs_peft.json").write_text(json.dumps(LORA))
    monkeypatch.setattr(entry, "RESULTS", results)
    assert entry.main(["--render-only", "--print"]) == 0
    assert "### slimtune LoRA vs peft LoRA" in capsys.readouterr().out
    assert entry.PAGE.read_text(encoding="utf-8") == page


def test_committed_page_is_rendered_from_the_committed_results():
    """docs/benchmarks.md holds exactly what `python -m benchmarks --render-only` would write from
    benchmarks/results/*.json (a result committed without re-rendering fails here)."""
    section = readme.render_section(readme.load_results(entry.RESULTS, entry.KNOWN))
    text = entry.PAGE.read_text(encoding="utf-8")
    assert readme.replace_section(text, section) == text


def test_result_variants_are_rendered_by_their_script(tmp_path):
    """`memory-minilm-l6.json` comes from memory.py: its renderer, its title, its real source."""
    assert readme.script_of("memory-minilm-l6-accuracy") == "memory"
    assert readme.script_of("lora_vs_peft") == "lora_vs_peft"
    assert readme.script_of("hand-made") is None
    for name, data in {"memory-minilm-l6-accuracy": {"settings": {"model": "m"}, "accuracy": {"lora": 0.8}}, "lora_vs_peft": LORA, "hand-made": {"x": 1}}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    results = readme.load_results(tmp_path, entry.KNOWN)
    assert list(results) == ["lora_vs_peft", "memory-minilm-l6-accuracy", "hand-made"]
    section = readme.render_section(results)
    assert "### Training memory (minilm-l6-accuracy)" in section and "| lora | 0.800 |" in section
    assert "Source: `benchmarks/memory.py` -> `benchmarks/results/memory-minilm-l6-accuracy.json`." in section
    assert "Source: `benchmarks/results/hand-made.json`." in section
