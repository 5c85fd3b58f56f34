"""
The data a training run draws (train.py): random walks on the finite state machine, made where they are
used, or random windows of token data prepared by tinystories_data.py, through pinned memory on a GPU;
each process its own stream, and held-out sequences for evaluation.
"""

import os
from dataclasses import dataclass

import torch

import tinystories_data
from fsm_data import FSM
from helpers import distributed
from helpers.common import fail


@dataclass
class Data:
    sample: object  # sample() -> (micro, block_size + 1) int64 sequences on the device, from gen
    gen: torch.Generator  # this rank's data stream, stored in the checkpoint
    val: torch.Tensor  # (eval_seqs, block_size + 1) held-out sequences
    vocab_size: int
    summary: str  # one line for the log
    checkpoint_fields: dict  # what the checkpoint says about the data (kind: fsm or lm), for steer.py and topics.py
    fsm: FSM = None  # None: token data
    bayes: tuple = (0.0, 0.0)  # the FSM's Bayes-optimal loss and accuracy


def load_data(cfg, micro, world):
    """The data of this rank: micro sequences per sample() from its own stream (distributed.data_seed).
    cfg: train.py's TrainConfig (data_dir, or the FSM's num_states, num_edges, fsm_seed; block_size,
    eval_seqs, seed); world: distributed.World."""
    cuda = world.device.startswith("cuda")  # "cuda:1" under torchrun
    if cfg.data_dir:  # token data: windows of block_size + 1 tokens, all predicted
        try:
            train_data, val_data, meta = tinystories_data.load_tokens(cfg.data_dir)
            val = tinystories_data.fixed_windows(val_data, cfg.eval_seqs, cfg.block_size + 1)
        except (OSError, ValueError) as e:
            fail(f"--data_dir={cfg.data_dir}: {e}")
        if len(train_data) <= cfg.block_size + 1:  # get_batch draws offsets below len - (block_size + 1)
            fail(f"{os.path.join(cfg.data_dir, 'train.bin')} has {len(train_data)} tokens: windows of "
                 f"block_size + 1 = {cfg.block_size + 1} at random offsets need at least {cfg.block_size + 2}")
        gen = torch.Generator()  # token windows are drawn on the host

        def sample():  # on a GPU through pinned memory, copied while the last step still runs (nanoGPT)
            batch = tinystories_data.get_batch(train_data, micro, cfg.block_size + 1, gen)
            return batch.pin_memory().to(world.device, non_blocking=True) if cuda else batch.to(world.device)
        summary = f"vocab {meta['vocab_size']}, {len(train_data)} train / {len(val_data)} val tokens"
        fields = dict(kind="lm", data=dict(data_dir=os.path.abspath(cfg.data_dir), meta=meta))
        data = Data(sample, gen, val, meta["vocab_size"], summary, fields)
    else:
        fsm = FSM(cfg.num_states, cfg.num_edges, seed=cfg.fsm_seed)
        val = fsm.sample(cfg.eval_seqs, cfg.block_size, torch.Generator().manual_seed(cfg.seed + 1))
        gen = torch.Generator(device=world.device if cuda else "cpu")  # the walks are drawn where they are used

        def sample():  # made where gen lives: on a GPU, no host work and no copy
            return fsm.sample(micro, cfg.block_size, gen).to(world.device)
        bayes = fsm.bayes(cfg.block_size)
        summary = f"Bayes-optimal loss {bayes[0]:.4f} acc {bayes[1]:.4f}"
        fields = dict(kind="fsm", fsm=dict(num_states=cfg.num_states, num_edges=cfg.num_edges, seed=cfg.fsm_seed))
        data = Data(sample, gen, val, fsm.vocab_size, summary, fields, fsm, bayes)
    gen.manual_seed(distributed.data_seed(cfg.seed, world.rank))
    return data
