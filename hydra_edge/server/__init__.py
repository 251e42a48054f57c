"""`hydra-edge serve`: an OpenAI-compatible HTTP API that routes every request to its cluster.

Above the core and beside the UI: the core never imports it (the command is registered through
the `hydra_edge.commands` entry point), and it imports neither the UI nor the exporters.
"""
