"""chatforge eval: benchmark scores through lm-evaluation-harness, with chatforge's engine underneath."""
