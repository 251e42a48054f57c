"""The Gradio web UI, a thin shell over the CLI and the library.

`hydra-edge ui` starts it; `hydra_edge.ui.app.create_ui()` builds it. Imports the core and the
exporters, never the other way round; gradio is imported only by the app and its tab modules.
"""

# The largest upload by default, in MB (`ui --max-upload-mb`, and create_ui's default).
DEFAULT_MAX_UPLOAD_MB = 50
# The folder the UI reads and writes by default (`ui --workspace`, and create_ui's default).
DEFAULT_WORKSPACE = "hydra-workspace"
