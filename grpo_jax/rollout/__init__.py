"""Rollouts: single-turn generation and the multi-turn Search-R1 search rollout."""
