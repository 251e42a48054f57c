"""Running a trained adapter: engines behind one interface, generation and held-out scoring."""
