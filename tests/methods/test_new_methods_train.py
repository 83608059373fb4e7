"""Each method trains a few steps through the whole pipeline (recipe -> run dir -> eval), and the
saved delta alone reproduces the metrics."""

import pytest

from slimtune.recipe import validate_recipe
from slimtune.runner import evaluate_run, train_run

METHODS = {
    "houlsby": {"name": "houlsby"},
    "pfeiffer": {"name": "pfeiffer"},
    "compacter": {"name": "compacter", "reduction_factor": 4},  # tiny hidden 32
    "compacter++": {"name": "compacter++", "reduction_factor": 4},
    "ia3": {"name": "ia3"},
    "prompt": {"name": "prompt", "num_tokens": 4},
    "prompt+pfeiffer": [{"name": "prompt", "num_tokens": 4}, {"name": "pfeiffer"}],
}


#: Re-evaluating from the run directory costs a second build; one adapter, the mergeable one and
#: the composed input-level one cover the three kinds of delta.
REEVALUATE = {"compacter", "ia3", "prompt+pfeiffer"}


@pytest.mark.parametrize("label", list(METHODS))
def test_trains_and_eval_reproduces(label, tiny_recipe, tmp_path):
    tiny_recipe["method"] = METHODS[label]
    tiny_recipe["train"]["max_steps"] = 3
    tiny_recipe["measure"]["memory"] = False
    report = train_run(validate_recipe(tiny_recipe), tmp_path / "run", progress=False)
    assert report["train"]["steps"] == 3
    assert report["params"]["trainable"] > report["params"]["head"]
    if label in REEVALUATE:
        evaluated = evaluate_run(tmp_path / "run")
        assert evaluated["metrics"] == evaluated["report_metrics"]
