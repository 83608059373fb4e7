"""`python -m benchmarks` (benchmarks/__main__.py): discovery of the scripts present."""

import pytest

import benchmarks.__main__ as entry


def test_discovery_and_only():
    assert "lora_vs_peft" in entry.available()
    assert set(entry.available()) <= set(entry.KNOWN)
    with pytest.raises(SystemExit):
        entry.main(["--only", "nope"])
