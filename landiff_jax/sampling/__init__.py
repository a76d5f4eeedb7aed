"""Samplers: semantic-token generation with the LM, and the diffusion sampler."""
