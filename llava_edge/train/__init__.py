"""The two-stage LLaVA training recipe."""
