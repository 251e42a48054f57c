"""ONNX export and the ONNX engine (installed as `hydra_edge.exporters`).

`hydra-edge export` builds an export folder (onnx_export.py); `OnnxChat` serves one through the
core's engine interface (hydra_edge/engines.py). Imports hydra_edge, never ui.
"""
