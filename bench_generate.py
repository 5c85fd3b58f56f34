"""Moved into benchmarks/ (README, "What moved")."""
raise SystemExit("bench_generate.py moved: run python -m benchmarks.generate from the repository's root")
