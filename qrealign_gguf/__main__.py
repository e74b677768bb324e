"""`python -m qrealign_gguf ...` = the `qrealign-gguf` console script (also what torchrun and tests start)."""
from .cli import main

main()
