"""Moved into benchmarks/ (README, "What moved")."""
raise SystemExit("bench_jobs.py moved: run python -m benchmarks.jobs from the repository's root")
