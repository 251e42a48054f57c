"""The HydraLoRA adapter: the layer, putting it into a model, its files, its switches and gates."""
