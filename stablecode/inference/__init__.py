"""Inference: the request object, sampling, the one decode engine, speculation and the prefix cache."""
