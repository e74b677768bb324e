"""`eval`: measure a model where it is deployed -- greedy generation in the pinned llama.cpp (or transformers for
HF directories), refusal judges, refusal / over-refusal / helpfulness / perplexity / KL metrics, reports."""
