"""Whole-KB evaluation and leaderboard numbers (issue 4)."""
