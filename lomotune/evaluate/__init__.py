"""Evaluation: exact match by greedy generation now; SuperGLUE tasks (one file each)
slot in here next to it."""
