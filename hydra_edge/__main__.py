"""`python -m hydra_edge` is the same as the `hydra-edge` console script."""

from hydra_edge.cli.app import main

if __name__ == "__main__":
    main()
