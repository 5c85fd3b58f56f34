"""
What the scripts share, which a learner may skip: common.py (flags, devices, progress bars, atomic
checkpoint and JSON files), cpu_threads.py (how OpenMP's threads wait: imported before torch),
distributed.py (torchrun and DDP), train_data.py, checkpoints.py and evaluation.py (a training run's data,
checkpoints, base models and final report, for train.py), readout.py (a trained model's codes read out,
for steer.py, topics.py and browse.py), topic_text.py (the text side of topic steering, for topics.py).
They import the method's files and each other, never a script.
"""
