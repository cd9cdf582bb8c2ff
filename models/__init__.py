"""Gemma 3n in PyTorch: the single definition that every exporter lowers."""

from models.checkpoint import load_pretrained, load_text_decoder, save_pretrained
from models.config import PRESETS, TextConfig
from models.errors import CheckpointError, G3nError, InputError
from models.text import TextDecoder

__all__ = [
    "PRESETS",
    "CheckpointError",
    "G3nError",
    "InputError",
    "TextConfig",
    "TextDecoder",
    "load_pretrained",
    "load_text_decoder",
    "save_pretrained",
]
