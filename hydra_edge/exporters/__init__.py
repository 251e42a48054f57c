"""Exports of a trained adapter, and the ONNX engine that serves one.

`hydra-edge export` builds an export folder (onnx_export.py); `OnnxChat` serves one through the
core's engine interface (hydra_edge/inference/protocol.py). Above the core: imports it, never ui
or server, and the core never imports this package.
"""
