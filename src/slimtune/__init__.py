"""slimtune: adapt pre-trained transformers cheaply and ship them slim."""

__version__ = "0.1.0"


def load_exported(directory):
    """Load a `slimtune export` directory (merged, slimmed, int8 or bf16) ready for inference;
    see slimtune.compress.loader."""
    from slimtune.compress.loader import load_exported as _load

    return _load(directory)
