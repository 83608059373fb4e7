"""slimtune: adapt pre-trained transformers cheaply and ship them slim."""

__version__ = "0.1.0"
