"""Tests written as the party a guarantee holds against would attack it (issue: trust at the seams)."""
