"""Exports of a trained adapter, and the ONNX engine that serves one.

`hydra-edge export --format NAME` runs one of the formats registered in formats/ (onnx, peft,
vllm), each in an export folder built, signed and verified by folder.py; `OnnxChat` serves an ONNX
export through the core's engine interface (hydra_edge/inference/protocol.py). Above the core:
imports it, never ui or server, and the core never imports this package.
"""
