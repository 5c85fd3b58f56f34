"""
What the scripts share, which a learner may skip: common.py (flags, devices, progress bars, atomic
checkpoint and JSON files), cpu_threads.py (how OpenMP's threads wait: imported before torch),
distributed.py (torchrun and DDP), readout.py (a trained model's codes read out, for steer.py, topics.py
and browse.py). They import the method's files, never a script.
"""
