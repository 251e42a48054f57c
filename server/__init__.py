"""`hydra-edge serve`: an OpenAI-compatible HTTP API that routes every request to its cluster.

Installed as hydra_edge.server; it sits beside ui/ above exporters/ and the core, and the core
never imports it (the command is registered through the hydra_edge.commands entry point).
"""
