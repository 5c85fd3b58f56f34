"""
TokFSM: random walks on a finite state machine, written as digit tokens (the paper's TokFSM experiment:
Tamkin et al., "Codebook Features").

    python fsm_data.py            # the FSM's facts, its Bayes-optimal loss / accuracy, sampling speed

    from fsm_data import FSM
    fsm = FSM()                               # 100 states, 10 out-edges each, seed 42
    seq = fsm.sample(512, 128, generator)     # (512, 128) int64: BOS, then states as base-10 digits,
                                              # on the generator's device (torch.Generator(device="cuda"))

A state is written as `digits` base-`base` digits, most significant first ("08"); BOS = base.
A sequence is BOS + a uniformly random start state + a random walk, cut to block_size tokens.
"""

import math
import time

import numpy as np
import torch


class FSM:
    def __init__(self, num_states=100, num_edges=10, base=10, seed=42):
        if num_states < 2 or not 1 <= num_edges <= num_states or base < 2:
            raise ValueError(f"need num_states >= 2, 1 <= num_edges <= num_states, base >= 2; "
                             f"got {num_states}, {num_edges}, {base}")
        self.num_states, self.num_edges, self.base, self.seed = num_states, num_edges, base, seed
        rng = np.random.default_rng(seed=seed)
        T = np.zeros((num_states, num_states))
        for i in range(num_states):  # the official construction, row by row in order
            T[i, rng.choice(num_states, size=num_edges, replace=False)] = 1
        self.transitions = T / T.sum(axis=1, keepdims=True)  # (N, N) row-stochastic
        self.digits = max(1, math.ceil(math.log(num_states, base) - 1e-9))  # digits per state
        self.bos = base
        self.vocab_size = base + 1
        # (N, D) digits of every state, most significant first
        self.state_digits = np.stack([(np.arange(num_states) // base ** (self.digits - 1 - j)) % base
                                      for j in range(self.digits)], axis=1)
        self._tables = {}  # device -> (successors, digits) tensors

    def __repr__(self):
        return f"FSM(num_states={self.num_states}, num_edges={self.num_edges}, base={self.base}, seed={self.seed})"

    # --- sampling ---

    def tables(self, device):
        """(successors (N, E): the out-edges of each state, digits (N, D)) as int64 tensors on device."""
        key = str(device)
        if key not in self._tables:
            succ = np.stack([np.nonzero(row)[0] for row in self.transitions])  # every state has E edges
            digits = torch.as_tensor(self.state_digits, device=device)
            self._tables[key] = (torch.as_tensor(succ, device=device), digits)
        return self._tables[key]

    def sample_states(self, batch, n_states, generator=None):
        """(batch, n_states) int64 random walks from uniform start states, on the generator's device. Every
        out-edge is equally likely, so a step is a uniform edge number looked up in the successor table:
        all random numbers in two calls, then one gather per step (no per-step sampling kernels)."""
        device = generator.device if generator is not None else torch.device("cpu")
        succ = self.tables(device)[0].view(-1)
        walk = torch.empty(batch, n_states, dtype=torch.long, device=device)
        walk[:, 0] = torch.randint(self.num_states, (batch,), generator=generator, device=device)
        edge = torch.randint(self.num_edges, (n_states - 1, batch), generator=generator, device=device)
        for t in range(1, n_states):
            walk[:, t] = succ[walk[:, t - 1] * self.num_edges + edge[t - 1]]
        return walk

    def encode(self, states, block_size):
        """(B, S) states -> (B, block_size) tokens: BOS then the digits, cut to block_size."""
        digits = self.tables(states.device)[1][states].reshape(states.shape[0], -1)  # (B, S*D)
        bos = torch.full((states.shape[0], 1), self.bos, dtype=torch.long, device=states.device)
        return torch.cat([bos, digits], dim=1)[:, :block_size]

    def sample(self, batch, block_size, generator=None):
        """(batch, block_size) tokens, made on the generator's device (a CUDA generator: on the GPU)."""
        n_states = math.ceil((block_size - 1) / self.digits)
        return self.encode(self.sample_states(batch, n_states, generator), block_size)

    # --- labels and checks ---

    def decode_states(self, tokens):
        """(B, L) tokens starting with BOS -> (B, S) states of the complete states, -1 where a state's
        digits are not valid (a BOS or a number >= num_states)."""
        t = torch.as_tensor(tokens)[:, 1:]
        S = t.shape[1] // self.digits
        d = t[:, :S * self.digits].reshape(t.shape[0], S, self.digits)
        value = torch.zeros(d.shape[:2], dtype=torch.long)
        for j in range(self.digits):
            value = value * self.base + d[..., j]
        bad = (d >= self.base).any(-1) | (value >= self.num_states)
        return torch.where(bad, torch.full_like(value, -1), value)

    def state_labels(self, tokens):
        """Per position of (B, L) tokens: (state, digit) with state the FSM state that position's
        token belongs to (-1 for BOS and for an unfinished last state) and digit its index in the
        state (-1 for BOS). The position of the last digit of state s is where 'the current state is s'."""
        B, L = tokens.shape
        states = self.decode_states(tokens)  # (B, S)
        pos = torch.arange(L)
        which = (pos - 1) // self.digits  # index of the state each position belongs to
        digit = torch.where(pos >= 1, (pos - 1) % self.digits, torch.full_like(pos, -1))
        ok = (pos >= 1) & (which < states.shape[1])
        lab = torch.full((B, L), -1, dtype=torch.long)
        lab[:, ok] = states[:, which[ok]]
        return lab, digit.expand(B, L)

    def state_accuracy(self, tokens):
        """Fraction of consecutive state pairs in (B, L) sampled tokens that are edges of the FSM
        (an invalid state counts as a wrong transition)."""
        s = self.decode_states(tokens)
        a, b = s[:, :-1], s[:, 1:]
        ok = (a >= 0) & (b >= 0)
        edge = torch.zeros_like(ok)
        edge[ok] = torch.as_tensor(self.transitions > 0)[a[ok], b[ok]]
        return edge.float().mean().item()

    # --- the Bayes-optimal predictor ---

    def bayes(self, block_size=128):
        """Exact expected loss (nats) and accuracy of the best possible predictor over the
        block_size - 1 predicted positions of a sequence."""
        N, D, base = self.num_states, self.digits, self.base
        T = self.transitions
        start = np.full((1, N), 1.0 / N)  # the start state is uniform, with no previous state
        prev = None  # distribution of the previous state of the walk
        losses, accs = [], []
        while len(losses) < block_size - 1:
            rows, weights = (start, np.ones(1)) if prev is None else (T, prev)
            for j in range(D):  # digit j of the next state, given the previous state and digits < j
                key_hi = self.state_digits[:, :j + 1] @ base ** np.arange(j, -1, -1)  # prefix up to digit j
                p_hi = np.zeros((len(rows), base ** (j + 1)))
                np.add.at(p_hi.T, key_hi, rows.T)  # p(prefix <= j | previous state)
                p_lo = p_hi.reshape(len(rows), -1, base).sum(-1)  # p(prefix < j | previous state)
                with np.errstate(divide="ignore", invalid="ignore"):
                    cond = np.where(p_hi > 0, p_hi / np.repeat(p_lo, base, axis=1), 1.0)
                losses.append(float(weights @ -(p_hi * np.log(cond)).sum(1)))
                accs.append(float(weights @ p_hi.reshape(len(rows), -1, base).max(-1).sum(1)))
            prev = np.full(N, 1.0 / N) if prev is None else prev @ T
        losses, accs = losses[:block_size - 1], accs[:block_size - 1]
        return float(np.mean(losses)), float(np.mean(accs))


if __name__ == "__main__":
    fsm = FSM()
    pairs = {(s, int(fsm.state_digits[t, 0])) for s in range(fsm.num_states)
             for t in np.nonzero(fsm.transitions[s])[0]}
    loss, acc = fsm.bayes(128)
    print(f"{fsm}: {fsm.digits} digits per state, vocab {fsm.vocab_size}")
    print(f"self-loops: {int(np.trace(fsm.transitions > 0))}, (state, next first digit) pairs: {len(pairs)}")
    print(f"Bayes-optimal over 127 predictions: loss {loss:.4f}, accuracy {100 * acc:.2f}%")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        gen = torch.Generator(device=device).manual_seed(0)
        times = []
        for _ in range(11):  # the first call builds the tables
            t0 = time.perf_counter()
            fsm.sample(512, 128, gen)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(f"a 512 x 128 batch on {device}: {1e3 * min(times[1:]):.2f} ms (best of 10)")
