"""Moved into benchmarks/ (README, "What moved")."""
raise SystemExit("bench.py moved: run python -m benchmarks.search from the repository's root "
                 "(bench.py --finetune: python -m benchmarks.finetune)")
