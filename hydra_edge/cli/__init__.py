"""The `hydra-edge` command line: the core commands, and the plug-in point for the others."""


def __getattr__(name: str):
    """`hydra_edge.cli.main` and `.app` (cli/app.py), for an install whose console script still
    names `hydra_edge.cli:main`; loaded on first use so `hydra_edge.cli.hosts` stays light."""
    if name in ("main", "app"):
        from hydra_edge.cli import app as module

        return getattr(module, name)
    raise AttributeError(name)
