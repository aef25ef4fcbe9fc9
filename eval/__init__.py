"""Whole-KB evaluation, leaderboard numbers and single-query linking."""
