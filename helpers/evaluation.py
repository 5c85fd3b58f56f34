"""
What a training run reports at its end (train.py): the validation loss and next-token accuracy, for a TokFSM
model the fraction of sampled state transitions that are edges of the machine, and the codes' usage,
printed and written to out_dir/metrics.json.
"""

import dataclasses
import os

import torch

from helpers.common import save_json


@torch.no_grad()
def evaluate(model, val, batch_size, device):
    """Mean loss and next-token accuracy over all predicted positions of val (S, L)."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for seq in val.split(batch_size):
        seq = seq.to(device)
        logits, loss, _, _ = model(seq[:, :-1], seq[:, 1:])
        loss_sum += loss.item() * seq[:, 1:].numel()
        correct += (logits.argmax(-1) == seq[:, 1:]).sum().item()
        n += seq[:, 1:].numel()
    model.train()
    return loss_sum / n, correct / n


@torch.no_grad()
def fsm_state_accuracy(model, fsm, n_seqs, block_size, device, seed=0):
    """Sample n_seqs sequences from BOS at temperature 1; fraction of state transitions that are edges."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.full((n_seqs, 1), fsm.bos, dtype=torch.long, device=device)
    out = model.generate(idx, block_size - 1, temperature=1.0, generator=gen)
    model.train()
    return fsm.state_accuracy(out.cpu())


def report(model, cfg, data, usage, run, amp, micro, device, final=None):
    """The final evaluation (FSM: also sampled walks), written to out_dir/metrics.json and printed.
    final: (val loss, val acc) of the last step, where the loop has just evaluated them."""
    with amp:
        vl, va = final or evaluate(model, data.val, micro, device)
        metrics = dict(val_loss=vl, val_acc=va)
        if data.fsm:
            sacc = fsm_state_accuracy(model, data.fsm, cfg.state_seqs, cfg.block_size, device, seed=cfg.seed)
            metrics.update(state_acc=sacc, bayes_loss=data.bayes[0], bayes_acc=data.bayes[1])
    metrics.update(alive={n: s["alive"] for n, s in usage.items()}, mse=usage.get("all", {}).get("mse"), **run,
                   config=dataclasses.asdict(cfg))
    save_json(os.path.join(cfg.out_dir, "metrics.json"), metrics)
    if data.fsm:
        print(f"val loss {vl:.4f} (Bayes {data.bayes[0]:.4f}, +{vl - data.bayes[0]:.4f}), acc {va:.4f}, "
              f"state acc {sacc:.4f}; wrote {cfg.out_dir}/metrics.json")
    else:
        print(f"val loss {vl:.4f}, acc {va:.4f}, {run['wall_s']:.0f} s; wrote {cfg.out_dir}/metrics.json")
    return metrics
