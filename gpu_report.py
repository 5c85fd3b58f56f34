"""Moved into benchmarks/ (README, "What moved")."""
raise SystemExit("gpu_report.py moved: run python -m benchmarks.gpu_report from the repository's root")
