"""Bulk catalogue jobs: plan, run, checkpoint, retries, dead letters (upcoming)."""
