"""Model fetcher, prompt-set builder (data/*.jsonl) and keyword-judge validation."""
