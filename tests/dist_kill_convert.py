"""`qrealign-gguf convert` under torchrun whose rank 1 SIGKILLs itself as it starts calibrating decoder layer 1
(layer 0 is learned and checkpointed by then), for tests/test_distributed_convert.py:

    torchrun --standalone --nproc-per-node 2 tests/dist_kill_convert.py convert MODEL -o OUT ...
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script by torchrun: the repository root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qrealign_gguf.realign import pipeline  # noqa: E402

LAYER_ARG = 8  # realign_layer(layer, targets, benign, harmful, score, margin, ceiling, settings, layer_index, ...)


def main() -> None:
    real = pipeline.realign_layer

    def dying(*args: object, **kwargs: object):  # noqa: ANN202
        if args[LAYER_ARG] == 1 and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    pipeline.realign_layer = dying  # the name the per-layer loop calls
    from qrealign_gguf.cli import main as cli

    sys.argv = ["qrealign-gguf", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
