"""GGUF block formats: type table (types.py), native C codec (codec.py), torch simulator (simulate.py)."""
