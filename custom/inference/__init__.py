"""Segmenting cases: the flip-TTA inferer, the snapshot/flip ensemble, label writing and the per-case run with its
quality checks and summary."""
