"""qrealign-gguf: convert fine-tuned Hugging Face models to GGUF, choosing block scales and rounding
so the file keeps the task behaviour and refuses harmful requests again (Q-realign, weight-only)."""

__version__ = "0.1.0"
