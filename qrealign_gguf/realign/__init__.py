"""Q-realign: safety probes on the aligned model, then format-exact dual-objective quantization of the
fine-tuned model (benign reconstruction + harmful prompts pushed to the probe's refusal side)."""
