"""The Gradio web UI (installed as `hydra_edge.ui`), a thin shell over the CLI and library.

`hydra-edge ui` starts it; `hydra_edge.ui.app.create_ui()` builds it. Imports hydra_edge and
exporters, never the other way round; gradio is imported only by the app and its tab modules.
"""
