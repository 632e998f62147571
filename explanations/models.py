"""Stored explanations arrive with the explanations issue."""
