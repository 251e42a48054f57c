"""ONNX export and the ONNX chat engine (installed as `hydra_edge.exporters`).

Not built yet: the export pipeline is tracked as its own issue. Imports hydra_edge, never ui.
"""
