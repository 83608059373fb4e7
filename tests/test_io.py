"""Safe reading and writing (slimtune.io): pickles refused everywhere and never unpickled, corrupt
JSON named in one line, staged directories that appear whole or not at all."""

import pickle
import re

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.io import read_json, read_safetensors
from slimtune.runner import evaluate_run
from tests.fixtures import Trap


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_a_pickle_planted_as_the_delta_is_refused_and_never_unpickled(trained_run, tmp_path, kind):
    marker = tmp_path / "pwned"
    delta = trained_run / "delta.safetensors"
    if kind == "torch.save":
        torch.save({"lora": Trap(marker)}, delta)
        expected = "not safetensors; refusing"
    else:
        delta.write_bytes(pickle.dumps(Trap(marker)))
        expected = "this is a Python pickle, not safetensors"
    with pytest.raises(SlimtuneError, match=expected):
        evaluate_run(trained_run)
    assert not marker.exists()


def test_a_delta_bin_instead_of_safetensors_is_refused(trained_run, tmp_path):
    marker = tmp_path / "pwned"
    (trained_run / "delta.safetensors").unlink()
    torch.save({"w": Trap(marker)}, trained_run / "delta.bin")
    with pytest.raises(SlimtuneError, match="delta.bin is there but slimtune refuses pickle-based files"):
        evaluate_run(trained_run)
    assert not marker.exists()
    with pytest.raises(SlimtuneError, match="refusing to load a pickle-based file"):
        read_safetensors(trained_run / "delta.bin")
    with pytest.raises(SlimtuneError, match="refusing to load a pickle-based file"):
        read_json(trained_run / "state.pt")


def test_pathologically_nested_json_is_a_one_line_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SlimtuneError, match=re.escape("corrupt JSON (nested too deeply)")):
        read_json(path)


def test_staged_directory_appears_whole_or_not_at_all(tmp_path):
    from slimtune.io import staged_directory

    out = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with staged_directory(out) as staging:
            (staging / "half.json").write_text("{}")
            raise RuntimeError("killed mid-export")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()  # an empty target is replaced
    with staged_directory(out) as staging:
        (staging / "done.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["done.json"] and len(list(tmp_path.iterdir())) == 1


def test_a_safetensors_file_whose_header_length_looks_like_a_pickle_marker_is_read(tmp_path):
    """A header of 1152 bytes (0x480) starts the file with 0x80 0x04, a pickle's protocol marker:
    the sniffer refused such a legitimate delta (found by the composition matrix)."""
    import torch
    from safetensors.torch import save_file

    from slimtune.io import read_safetensors

    path = tmp_path / "delta.safetensors"
    for pad in range(2000):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x04":
            break
    else:
        pytest.fail("no header length of the form 0x..480 was reached")
    assert read_safetensors(path)["w"].shape == (2,)
