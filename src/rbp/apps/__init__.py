"""Applications of rbp: the paper's experiments, registered with the runner."""
