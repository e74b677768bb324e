"""qrealign-gguf: convert fine-tuned Hugging Face models to GGUF, choosing block scales and rounding
so the file keeps the task behaviour and refuses harmful requests again (Q-realign, weight-only).

The Python API (README "Python API") is in api.py and exported here; it is loaded on first use, so
`import qrealign_gguf` stays cheap (no numpy, gguf or torch until a function is called)."""
from typing import Any

__version__ = "0.1.0"

__all__ = ["ConvertJob", "ConvertResult", "RealignOptions", "convert_model", "evaluate_models", "package_model",
           "plan_conversion", "probe_model"]


def __getattr__(name: str) -> Any:  # PEP 562: the API module is imported when one of its names is first asked for
    if name in __all__:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
