"""The pinned llama.cpp (package named llamacpp, not to be confused with models/llama.py, the Llama family):
finding/building it (build.py) and running it in a child process (client.py -> child.py,
which drives libllama through binding.py). Everything that runs llama.cpp goes through this package."""
from .build import LlamaBuild, LlamaNotFound, build_for, custom_type_note, find_llama
from .client import LlamaCallError, call, logits, tokenize, tokenize_many

__all__ = ["LlamaBuild", "LlamaNotFound", "LlamaCallError", "build_for", "call", "custom_type_note", "find_llama",
           "logits", "tokenize", "tokenize_many"]
