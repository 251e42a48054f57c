"""Base models: presets, local folders and GGUF files, 4-bit loading, and the LM head."""
