"""
Speed and memory, printed and written as JSON; run from the repository's root as python -m benchmarks.NAME:
search (the codebook layer against an official-style reference and the bare score matmul, and what
codebooks cost a training step), finetune (a step of a pretrained model's finetune, with and without
codebooks, projected to the paper's run), generate (sampling with and without the KV cache), jobs (training
jobs side by side), gpu_report (every GPU figure in one run). measure.py holds what search and finetune
share: timing, peak memory, each row in a subprocess, the number format.
"""
