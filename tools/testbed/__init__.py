"""The safety testbed (aligned model off its grid + a fine-tune with broken refusal) and the realignment experiment."""
