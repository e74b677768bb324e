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
    checkpoints: str | Path | None = None  # per-layer checkpoints; None: <output>.realign-ckpt, removed after the write
    offload_dir: str | Path | None = None  # activation streams spilled to files here (large prompt sets); None: memory

    def check_numbers(self) -> None:
        """The ranges, before any model is loaded (the rest needs the plan: pipeline.prepare_realign)."""
        from ..checks import check_numbers

        check_numbers(**{"--realign-samples": (self.samples, ">0"), "--realign-iters": (self.iters, ">=0"),
                         "--realign-lr": (self.lr, ">0"), "--harm-weight": (self.harm_weight, ">=0"),
                         "--margin": (self.margin, "finite"), "--margin-offset": (self.margin_offset, "finite"),
                         "--benign-last-weight": (self.last_weight, ">=0"),
                         "--benign-ceiling": (self.benign_ceiling, "finite")})

    def check_offload_dir(self) -> None:
        """--offload-dir exists or can be created, and takes a file: one clear error now, not hours later."""
        if self.offload_dir is None:
            return
        import tempfile

        from ..errors import InputError

        d = Path(self.offload_dir)
        if d.exists() and not d.is_dir():
            raise InputError(f"--offload-dir {d} is a file; give a directory for the activation files")
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError as e:
            raise InputError(f"--offload-dir {d} is not a writable directory ({e.strerror or e}); give another "
                             "one") from None
