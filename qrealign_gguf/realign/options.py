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

    def check_numbers(self) -> None:
        """The ranges, before any model is loaded (the rest needs the plan: pipeline.prepare_realign)."""
        from ..checks import check_numbers

        check_numbers(**{"--realign-samples": (self.samples, ">0"), "--realign-iters": (self.iters, ">=0"),
                         "--realign-lr": (self.lr, ">0"), "--harm-weight": (self.harm_weight, ">=0"),
                         "--margin": (self.margin, "finite"), "--margin-offset": (self.margin_offset, "finite"),
                         "--benign-last-weight": (self.last_weight, ">=0"),
                         "--benign-ceiling": (self.benign_ceiling, "finite")})
