"""Local simulation: data sources, the in-process runner and the baselines."""
