"""
How much the KV cache speeds up generation: model.generate with use_cache=False (the whole context rerun
at every new token) and use_cache=True, side by side in one run, on two workloads, checking that both
sample the same tokens.

    python -m benchmarks.generate                             # untrained models of the two shapes, ~1 min on 2 cores
    python -m benchmarks.generate --threads=1 --out=bench_generate.json
    python -m benchmarks.generate --ckpt=out-stories-ft/ckpt.pt --fsm_ckpt=out-fsm/ckpt.pt   # trained ones
    python -m benchmarks.generate --quick --out=/tmp/bench_generate.json   # seconds: the smoke test (--config=quick)

Workloads:
  topics  topics.py's default protocol, one condition: 4 prompts (each after EOT) x 10 samples, 200 new
          tokens at temperature 1, 14 codes forced at every position (--at=all), at most 2 in one head.
          The model: --ckpt (a train.py checkpoint on token data, its tokenizer), else an untrained one of
          train.py's stories preset shape (2 layers, 4 heads, n_embd 128, block 256, attention codebooks
          C=512 k=8, vocabulary 560), the prompts as bytes.
  steer   steer.py generate's default: 4 samples of 32 new tokens after BOS, baseline and steered (one code
          forced at every position, as its docstring's --force=L3.mlp:5), each from the same seed; repeated
          --steer_runs times, it is short. The model: --fsm_ckpt, else an untrained one of the TokFSM preset
          shape (4 layers, 4 heads, n_embd 128, block 128, attention and MLP codebooks C=1024 k=1, vocab 11).
  fsm     helpers/evaluation.py's fsm_state_accuracy on the same model: --fsm_seqs walks from BOS up to block_size (127
          new tokens), no codes forced (train.py samples its state_seqs=200; fewer here, for time).
Prints per workload the seconds without and with the cache and the speed-up (without / with); --out also
writes them as JSON, with same_samples (the tokens of the two runs are equal). Exit status 1 if they
differ. Times are wall clock of one run each, after a short warm-up; on a shared machine they are noisy.
Every model, untrained or loaded, takes the tuned search (tuned.use_tuned_search), as the scripts' do.
"""

import helpers.cpu_threads  # noqa: F401  (first: OpenMP's threads wait as in the scripts timed: GOMP_SPINCOUNT=10000)

import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

from codebook import Intervention
from helpers.common import fail, parse_args, save_json
from model import GPT, GPTConfig
from helpers.readout import load_codebook_model, tokenizer
from tuned import use_tuned_search


@dataclass
class BenchGenerateConfig:
    ckpt: str = ""  # topics workload: a train.py checkpoint on token data ("": an untrained model)
    fsm_ckpt: str = ""  # steer and fsm workloads: a train.py TokFSM checkpoint ("": an untrained model)
    device: str = "cpu"  # cpu, cuda or mps
    threads: int = 0  # torch threads on a CPU (0: torch's default)
    seed: int = 0
    prompts: str = "|Once upon a time,|Once there was a|A long time ago,"  # topics.py's default
    samples: int = 10  # topics: samples per prompt
    max_new_tokens: int = 200  # topics
    n_codes: int = 14  # topics: codes forced (topics.py's max_codes)
    steer_n: int = 4  # steer: samples (steer.py's --n)
    steer_new_tokens: int = 32  # steer: new tokens (steer.py's --max_new_tokens)
    steer_runs: int = 5  # steer: times its workload runs, timed together
    fsm_seqs: int = 20  # fsm: walks sampled
    out: str = ""  # write the results as JSON here ("": no file)


PRESETS = {"default": {},  # --quick is --config=quick: tiny workloads, seconds, for the test
           "quick": dict(prompts="|Once", samples=2, max_new_tokens=16, steer_n=2, steer_new_tokens=8, steer_runs=1,
                         fsm_seqs=2)}


def untrained(seed, **shape):
    torch.manual_seed(seed)
    return use_tuned_search(GPT(GPTConfig(**shape))).eval()


def pick_codes(model, n, per_group):
    """n codes [(site, group, code)] spread over the model's sites and groups, at most per_group in one."""
    slots = [(site, g, cb.num_codes) for site, cb in model.codebooks().items() for g in range(cb.groups)]
    n = min(n, len(slots) * per_group)
    return [(site, g, (37 * i + 5) % C) for i, (site, g, C) in zip(range(n), slots * per_group)]


def topics_workload(model, prompts, codes, cfg, use_cache):
    """As topics.sample: per prompt j, `samples` rows from seed + j with the codes forced everywhere."""
    dev, out = next(model.parameters()).device, []
    ivs = [Intervention(site, g, c) for site, g, c in codes]
    for j, p in enumerate(prompts):
        gen = torch.Generator(device=dev).manual_seed(cfg.seed + j)
        idx = torch.tensor([p] * cfg.samples, device=dev)
        out.append(model.generate(idx, cfg.max_new_tokens, 1.0, None, ivs, gen, use_cache=use_cache).cpu())
    return out


def steer_workload(model, bos, codes, cfg, use_cache):
    """As steer.py's cmd_generate: baseline and steered from the same seed, steer_runs times."""
    dev, out = next(model.parameters()).device, []
    idx = torch.full((cfg.steer_n, 1), bos, dtype=torch.long, device=dev)
    ivs = [Intervention(site, g, c) for site, g, c in codes]
    for _ in range(cfg.steer_runs):
        for use in ([], ivs):
            gen = torch.Generator(device=dev).manual_seed(cfg.seed)
            out.append(model.generate(idx, cfg.steer_new_tokens, 1.0, None, use, gen, use_cache=use_cache).cpu())
    return out


def fsm_workload(model, bos, cfg, use_cache):
    """As helpers/evaluation.py's fsm_state_accuracy: walks from BOS at temperature 1 up to block_size."""
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    idx = torch.full((cfg.fsm_seqs, 1), bos, dtype=torch.long, device=dev)
    return [model.generate(idx, model.config.block_size - 1, 1.0, generator=gen, use_cache=use_cache).cpu()]


def compare(name, run):
    """Time run(use_cache) both ways (after a warm-up of each) -> a result row, printed."""
    times, samples = {}, {}
    for use_cache in (False, True):
        run(use_cache, warmup=True)
        t0 = time.perf_counter()
        samples[use_cache] = run(use_cache)
        times[use_cache] = time.perf_counter() - t0
    same = all(torch.equal(a, b) for a, b in zip(samples[False], samples[True]))
    row = dict(full_s=times[False], cached_s=times[True], speedup=times[False] / times[True], same_samples=same,
               tokens=sum(y.numel() for y in samples[True]))
    print(f"{name:7s} no cache {row['full_s']:8.2f} s   cache {row['cached_s']:7.2f} s   speed-up "
          f"{row['speedup']:5.1f}x   same samples: {same}", flush=True)
    return row


def main(cfg):
    print("config:", " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = cfg.device
    if cfg.ckpt:
        ckpt, lm = load_codebook_model(cfg.ckpt, dev)
        encode = tokenizer(ckpt)[0]
        if ckpt.get("kind") != "lm":
            fail(f"--ckpt={cfg.ckpt}: the topics workload needs a checkpoint on token data")
    else:
        lm = untrained(cfg.seed, n_layer=2, n_head=4, n_embd=128, block_size=256, vocab_size=560, cb_at="attn",
                       num_codes=512, k=8).to(dev)

        def encode(text):
            return [lm.config.vocab_size - 1] + list(text.encode())  # EOT (the last id), then bytes
    prompts = [encode(p) for p in cfg.prompts.split("|")]
    if max(map(len, prompts)) + cfg.max_new_tokens - 1 > lm.config.block_size:
        fail(f"a prompt + {cfg.max_new_tokens} new tokens exceed block_size {lm.config.block_size}")
    lm_codes = pick_codes(lm, cfg.n_codes, 2)
    if cfg.fsm_ckpt:
        fckpt, fsm_model = load_codebook_model(cfg.fsm_ckpt, dev)
        if fckpt.get("kind") != "fsm":
            fail(f"--fsm_ckpt={cfg.fsm_ckpt}: the steer workload needs a TokFSM checkpoint")
        bos = fsm_model.config.vocab_size - 1  # fsm_data.FSM: the digits, then BOS
    else:
        fsm_model = untrained(cfg.seed, n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=11,
                              cb_at="attn+mlp", num_codes=1024, k=1).to(dev)
        bos = 10
    sites = [s for s in fsm_model.codebooks() if s.endswith("mlp")] or list(fsm_model.codebooks())
    fsm_codes = [(sites[-1], 0, 5)]  # L3.mlp:5
    print(f"torch {torch.__version__}, {dev}, {torch.get_num_threads()} threads; topics: {len(prompts)} prompts x "
          f"{cfg.samples} samples x {cfg.max_new_tokens} new tokens, {len(lm_codes)} codes forced; steer: "
          f"{cfg.steer_runs} x 2 x {cfg.steer_n} samples x {cfg.steer_new_tokens} new tokens; fsm: {cfg.fsm_seqs} "
          f"walks x {fsm_model.config.block_size - 1} new tokens", flush=True)

    def topics_run(use_cache, warmup=False):
        if warmup:
            return lm.generate(torch.tensor([prompts[0]], device=dev), 4, use_cache=use_cache)
        return topics_workload(lm, prompts, lm_codes, cfg, use_cache)

    def steer_run(use_cache, warmup=False):
        if warmup:
            return fsm_model.generate(torch.full((1, 1), bos, device=dev), 4, use_cache=use_cache)
        return steer_workload(fsm_model, bos, fsm_codes, cfg, use_cache)

    def fsm_run(use_cache, warmup=False):
        return steer_run(use_cache, warmup) if warmup else fsm_workload(fsm_model, bos, cfg, use_cache)

    rows = dict(topics=compare("topics", topics_run), steer=compare("steer", steer_run), fsm=compare("fsm", fsm_run))
    result = dict(settings=asdict(cfg), torch=torch.__version__, device=dev, threads=torch.get_num_threads(),
                  machine=platform.processor() or platform.machine(), workloads=rows,
                  topics_codes=[list(c) for c in lm_codes], steer_codes=[list(c) for c in fsm_codes])
    if cfg.out:
        save_json(cfg.out, result)
        print(f"wrote {cfg.out}")
    if not all(r["same_samples"] for r in rows.values()):
        print("error: the cache changed the samples", file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == "__main__":
    argv = ["--config=quick" if a == "--quick" else a for a in sys.argv[1:]]
    main(parse_args(argv, BenchGenerateConfig, PRESETS)[0])
