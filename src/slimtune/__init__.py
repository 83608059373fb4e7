"""slimtune: adapt pre-trained transformers cheaply and ship them slim (the Python API:
:mod:`slimtune.api`; the command line: ``slimtune --help``)."""

from slimtune.api import attach, evaluate, export, fit, load_exported, load_recipe, load_run, structure_variants

__version__ = "0.1.0"

__all__ = ["attach", "evaluate", "export", "fit", "load_exported", "load_recipe", "load_run", "structure_variants"]
