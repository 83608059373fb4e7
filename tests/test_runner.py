"""The runner (recipe -> run directory): resuming checks that the recipe is the run's."""

from tests.fixtures import one_line_error


def test_resume_with_a_changed_recipe_is_refused(trained_run, capsys):
    recipe = str(trained_run / "recipe.yaml")
    assert "recipe differs" in one_line_error(["train", recipe, "--resume", str(trained_run), "--set", "train.lr=0.5"], capsys)
