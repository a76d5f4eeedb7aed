"""Evaluations: prompt-following scores computed from generated videos."""
