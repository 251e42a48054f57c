"""The `hydra-edge` command line: the core commands, and the plug-in point for the others."""
