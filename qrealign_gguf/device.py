"""--device auto | cpu | cuda, answered once for every kind of work: the block encoders (the CUDA codec must be able
to run) and realignment's torch work (torch must see a GPU). One error style: `--device cuda: <why>; use --device cpu`."""
from __future__ import annotations

from typing import Literal

from .errors import InputError

DEVICES = ("auto", "cpu", "cuda")


def _cuda_unavailable(work: Literal["encode", "torch"]) -> str | None:
    """Why `work` cannot run on CUDA here, or None if it can. Imports stay lazy: a CPU run never pays for torch."""
    if work == "encode":
        from .formats import cuda_codec
        try:
            cuda_codec.resolve_device("cuda")
        except cuda_codec.CudaUnavailable as e:
            return str(e)
        return None
    import torch

    return None if torch.cuda.is_available() else "no CUDA device is visible to torch"


def resolve_device(name: str, work: Literal["encode", "torch"]) -> str:
    """"cpu" or "cuda" for `work`: auto = CUDA where it can run, else CPU; cuda where it cannot is an InputError."""
    if name not in DEVICES:
        raise InputError(f"--device {name!r}: use auto, cpu or cuda")
    if name == "cpu":
        return "cpu"
    reason = _cuda_unavailable(work)
    if reason is None:
        return "cuda"
    if name == "cuda":
        hint = "" if "--device cpu" in reason else "; use --device cpu"
        raise InputError(f"--device cuda: {reason.rstrip('.')}{hint}")
    return "cpu"
