"""Checkpoints: hook state and a method's non-trainable delta state continue across resume, and
checkpoint tensors are never unpickled, even with a matching hash."""

import hashlib
import json

import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.recipe import validate_recipe
from slimtune.train.checkpoint import list_checkpoints, read_checkpoint
from slimtune.core.hooks import Hook
from tests.fixtures import CrashAt, Trap, make_trainer


class StepAccountant(Hook):
    """A toy privacy accountant: counts steps (JSON state) and sums 'spent budget' (tensor state)."""

    name = "accountant"

    def __init__(self):
        self.steps = 0
        self.spent = torch.zeros(())

    def on_step_end(self, trainer):
        self.steps += 1
        self.spent += 0.5

    def state_dict(self):
        return {"steps": self.steps}

    def tensor_state(self):
        return {"spent": self.spent}

    def load_state_dict(self, state, tensors):
        self.steps = state["steps"]
        self.spent = tensors["spent"].clone()


def test_hook_state_continues_across_resume_and_never_restarts(tiny_recipe, tmp_path):
    tiny_recipe["train"].update(max_steps=10, checkpoint_every=3)
    recipe = validate_recipe(tiny_recipe)
    first = StepAccountant()
    with pytest.raises(KeyboardInterrupt):
        make_trainer(recipe, tmp_path, [first, CrashAt(7)]).fit()
    assert first.steps == 7  # steps 7 ran past the last checkpoint (6) and are lost with the crash

    resumed = StepAccountant()
    trainer = make_trainer(recipe, tmp_path, [resumed])
    trainer.fit(resume=True)
    assert trainer.step == 10
    assert resumed.steps == 10 and float(resumed.spent) == 5.0  # 6 restored + 4 new, not 4


def test_non_trainable_delta_state_such_as_masks_is_checkpointed(tiny_recipe, tmp_path):
    """A method may keep state outside its trainable parameters (a pruning mask, a buffer); the
    delta's state dict is what defines it, and a resumed run continues from its saved value."""
    tiny_recipe["train"].update(max_steps=10, checkpoint_every=3)
    recipe = validate_recipe(tiny_recipe)

    class GrowMask(Hook):
        name = "grow"

        def on_step_end(self, trainer):
            trainer.model.toy_mask += 1  # the method's own state; the hook keeps none

    def with_mask(trainer):
        trainer.model.register_buffer("toy_mask", torch.zeros(3))
        delta = trainer.delta
        plain_state, plain_load = delta.state_dict, delta.load_state_dict
        delta.state_dict = lambda m: {**plain_state(m), "toy_mask": m.toy_mask}
        delta.load_state_dict = lambda m, state: (plain_load(m, state), m.toy_mask.copy_(state["toy_mask"]))
        return trainer

    with pytest.raises(KeyboardInterrupt):
        with_mask(make_trainer(recipe, tmp_path, [GrowMask(), CrashAt(7)])).fit()
    trainer = with_mask(make_trainer(recipe, tmp_path, [GrowMask()]))
    trainer.fit(resume=True)
    assert trainer.model.toy_mask.tolist() == [10.0, 10.0, 10.0]  # 6 restored + 4, not 4


def test_a_pickle_planted_as_checkpoint_tensors_is_refused_even_with_a_matching_hash(trained_run, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = list_checkpoints(trained_run)[-1]
    tensors = checkpoint / "tensors.safetensors"
    torch.save({"param.x": Trap(marker)}, tensors)
    state = json.loads((checkpoint / "state.json").read_text())
    state["tensors_sha256"] = hashlib.sha256(tensors.read_bytes()).hexdigest()  # a crafted, consistent checkpoint
    (checkpoint / "state.json").write_text(json.dumps(state))
    with pytest.raises(SlimtuneError, match="zip archive .*refusing to load it"):
        read_checkpoint(checkpoint)
    assert not marker.exists()
