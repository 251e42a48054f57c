"""hydra-edge: HydraLoRA fine-tuning on a 4-bit base, exported to ONNX Runtime.

Importing this package stays cheap: torch, transformers and friends load inside the modules
that need them.
"""

__version__ = "0.1.0"
