"""What a user chooses about realignment (`convert --aligned/--probes ...`, api.ConvertJob.realign), built by
keyword. No torch here: the CLI and `import qrealign_gguf` stay fast. The defaults equal calibrate.RealignSettings',
the one place the measured values are set (tests/test_realign.py checks they agree)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True)
class RealignOptions:
    aligned: str | Path | None = None  # the aligned model the fine-tune came from: probes are fit on it
    probes: str | Path | None = None  # or probes from `qrealign-gguf probe` / api.probe_model
    harmful: str | Path = "builtin:harmful"
    benign: str | Path = "builtin:benign"
    samples: int = 32  # prompts of each kind
    iters: int = 40
    lr: float = 5e-3
    harm_weight: float = 0.01
    margin: float | None = None  # None: per layer, the aligned model's median harmful score
    margin_offset: float = 1.5
    probe_layers: str | None = None  # e.g. "3-": probe term only there
    last_weight: float = 1.0
    benign_ceiling: float | None = None
    probe_kind: str = "content"  # with aligned: "contrast" fits refusal-state probes against the fine-tuned model
    equalize: bool = False
    distill_weight: float = 0.0  # harmful prompts' states pulled towards the aligned model's (needs aligned)
    checkpoints: str | Path | None = None  # per-layer checkpoints; None: <output>.realign-ckpt, removed after the write
    offload_dir: str | Path | None = None  # activation streams spilled to files here (large prompt sets); None: memory

    def check_numbers(self) -> None:
        """The ranges, before any model is loaded (the rest needs the plan: pipeline.prepare_realign)."""
        from ..checks import check_numbers

        check_numbers(**{"--realign-samples": (self.samples, ">0"), "--realign-iters": (self.iters, ">=0"),
                         "--realign-lr": (self.lr, ">0"), "--harm-weight": (self.harm_weight, ">=0"),
                         "--margin": (self.margin, "finite"), "--margin-offset": (self.margin_offset, "finite"),
                         "--benign-last-weight": (self.last_weight, ">=0"),
                         "--distill-weight": (self.distill_weight, ">=0"),
                         "--benign-ceiling": (self.benign_ceiling, "finite")})

    def check_offload_dir(self) -> None:
        check_offload_dir(self.offload_dir)


def check_offload_dir(offload_dir: str | Path | None) -> None:
    """--offload-dir is (or can become) a directory we may write into: one clear error now, not after hours of
    work. Nothing is created here (every check runs before the first byte of output): the directory that exists,
    or else its nearest existing parent, must take a temporary file."""
    if offload_dir is None:
        return
    import os
    import tempfile

    from ..errors import InputError

    d = Path(offload_dir)
    probe = d
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    why = None
    if not probe.is_dir():
        why = "a file is in the way" if probe == d else f"{probe} is a file"
    elif not os.access(probe, os.W_OK | os.X_OK):
        why = "permission denied"
    else:
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as e:
            why = e.strerror or str(e)
    if why is not None:
        raise InputError(f"--offload-dir {d} is not a writable directory ({why}); give another one")
