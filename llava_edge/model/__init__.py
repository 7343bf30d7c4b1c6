"""The LLaVA model: presets, loading, tokenizer, image preprocessing, chat templates."""
