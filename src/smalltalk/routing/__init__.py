"""Routing: router scoring, balanced assignment, EM router training, partition, baselines."""
