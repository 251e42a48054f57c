"""The Gradio web UI (installed as `hydra_edge.ui`), a thin shell over the CLI and library.

Not built yet: the UI is tracked as its own issue. May import hydra_edge and exporters.
"""
