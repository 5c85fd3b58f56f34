"""
Pretrained GPT-2, GPT-Neo and GPT-NeoX checkpoints, in the Hugging Face hub's format, as model.py's GPT:
read config.json and the weights (model.safetensors or pytorch_model.bin, or the shards an index.json
lists), map them to GPTConfig fields and to this project's parameter names. from_pretrained is the way in:

    from pretrained.load import from_pretrained
    model = from_pretrained("roneneldan/TinyStories-1Layer-21M")   # hub.py fetches it
    model = from_pretrained("gpt2")                                  # gpt2, gpt2-medium, -large, -xl
    model = from_pretrained("EleutherAI/pythia-70m@step3000")        # a GPT-NeoX, at a training step
    model = from_pretrained("path/to/dir")                           # config.json + weights: offline

What differs from this project's own models, and where it goes:
  GPT-2:   q . k / sqrt(head size), biases everywhere, the tanh GELU; its Linears are stored transposed
           (Conv1D), as nanoGPT's from_pretrained handles.
  GPT-Neo: q . k unscaled and in fp32, no q/k/v bias (out_proj has one), the tanh GELU, layers alternating
           global and local attention (a window of window_size positions, the token itself included).
  Both:    learned positions only (rope=False), the output head tied to the token embedding.
  GPT-NeoX (Pythia): no learned positions, rotary on the first rotary_pct of each head's dims (Pythia: 0.25,
           base rotary_emb_base; transformers 5 writes both into rope_parameters), the exact GELU, the
           parallel residual x + attn(ln_1(x)) + mlp(ln_2(x)) (use_parallel_residual), an output head of its
           own (embed_out), q, k, v fused per head: query_key_value's rows are (head, q/k/v, head size), ours
           (q/k/v, head, head size). Its vocab_size is config.json's, padded beyond the tokenizer's (Pythia:
           50304 or more, the tokenizer 50277 ids): the logits cover the padded ids, and generate samples over
           all of them; the padded ids were never a target, so their probability is tiny but not zero.
The TinyStories models (a GPT-Neo) were trained on 512 tokens though their config says 2048: their
block_size is capped at 512. Errors (no such directory, an unsupported architecture, a truncated or corrupt
weights file) are a ValueError with one line, which the scripts print through common.fail.
"""

import json
import math
import os
import struct

import torch

from model import GPT, GPTConfig

ARCHS = ("gpt2", "gpt_neo", "gpt_neox")  # config.json's model_type
TINYSTORIES_BLOCK = 512  # the TinyStories models' training length (their config says 2048)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def from_pretrained(name_or_dir, block_size=None, **overrides):
    """A pretrained GPT-2, GPT-Neo or GPT-NeoX as this GPT, without codebooks (insert them with init_codebooks
    on a copy built with cb_at set, as train.py --init_from does). name_or_dir: a local directory holding the
    hub's config.json and model.safetensors or pytorch_model.bin (used as it is, offline), a hub id
    "owner/name[@revision]", or gpt2, gpt2-medium, gpt2-large, gpt2-xl (fetched by hub.py).
    block_size: at most the model's positions (default: all of them; the TinyStories models: 512, the
    length they were trained at, though their config says 2048). overrides: more GPTConfig fields."""
    args, state = load(name_or_dir, block_size)
    model = GPT(GPTConfig(**{**args, **overrides}))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape than config.json says
        raise ValueError(f"{name_or_dir}: weights do not fit its config.json ({' '.join(str(e).split())[:200]})")
    missing = [k for k in missing if ".codebook." not in k and not (k == "lm_head.weight" and args["tie_head"])]
    if missing or unexpected:
        raise ValueError(f"{name_or_dir}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def load(name_or_dir, block_size=None):
    """-> (GPTConfig keyword arguments, state dict in this project's names, fp32). A local directory is
    read as it is; anything else is a hub name, fetched (or found in the cache) by hub.py."""
    path = name_or_dir
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") > 1:
            raise ValueError(f"{name_or_dir}: not a directory holding config.json and model.safetensors or "
                             f"pytorch_model.bin, nor a hub id (owner/name[@revision], gpt2..gpt2-xl)")
        from pretrained import hub  # the network only for a name that is not a local directory
        path = hub.model_dir(name_or_dir)  # hub.HubError (an OSError) with one line where that fails
    config = read_config(path)
    try:
        args = map_config(config, name_or_dir, block_size)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}/config.json: lacks or garbles {e}") from None
    state = read_weights(path)
    try:
        mapping = dict(gpt2=map_gpt2, gpt_neo=map_gpt_neo, gpt_neox=map_gpt_neox)[config["model_type"]]
        return args, mapping(state, args)
    except KeyError as e:
        raise ValueError(f"{path}: the weights lack {e.args[0]}") from None
    except RuntimeError as e:  # query_key_value of another shape than config.json says
        raise ValueError(f"{path}: weights do not fit its config.json ({' '.join(str(e).split())[:200]})") from None


def read_config(path):
    """config.json of a hub-format directory, checked to be one of ARCHS."""
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    arch = config.get("model_type")
    if arch not in ARCHS:
        raise ValueError(f"{file}: model_type {arch!r} is not supported; supported: GPT-2 (gpt2), GPT-Neo "
                         f"(gpt_neo, the TinyStories models), GPT-NeoX (gpt_neox, Pythia)")
    return config


def read_weights(path):
    """The tensors of model.safetensors, or else pytorch_model.bin, on the CPU; a big model's shards, which
    {name}.index.json's weight_map lists (pythia-6.9b and -12b come so), read one after another."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        file, index = os.path.join(path, name), os.path.join(path, name + ".index.json")
        if os.path.exists(file):
            return read_file(file)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise ValueError(f"{index}: unreadable ({type(e).__name__}: {str(e)[:120]})") from None
            lost = [shard for shard in shards if not os.path.exists(os.path.join(path, shard))]
            if lost:
                raise ValueError(f"{index} lists {len(shards)} shards, {len(lost)} not in {path} ({lost[0]})")
            return {k: v for shard in shards for k, v in read_file(os.path.join(path, shard)).items()}
    raise ValueError(f"{path} holds neither model.safetensors nor pytorch_model.bin")


def read_file(file):
    """One weights file: safetensors, or a torch.save'd state dict (read without unpickling code)."""
    if file.endswith(".safetensors"):
        return read_safetensors(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: unreadable, truncated or corrupt ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]})") from None


def read_safetensors(file):
    """A .safetensors file: 8 bytes little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the raw little-endian tensor bytes, offsets counted from the header's end."""
    with open(file, "rb") as f:
        data = bytearray(f.read())  # writable: the tensors are views of it
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if 8 + n > len(data):
            raise ValueError(f"header of {n} bytes, file of {len(data)}")
        header = json.loads(data[8:8 + n])
        body = memoryview(data)[8 + n:]
        out = {}
        for name, t in header.items():
            if name == "__metadata__":
                continue
            if t["dtype"] not in _DTYPES:
                raise ValueError(f"dtype {t['dtype']} of {name} (known: {', '.join(_DTYPES)})")
            begin, end = t["data_offsets"]
            dtype = _DTYPES[t["dtype"]]
            if end > len(body) or end - begin != math.prod(t["shape"]) * dtype.itemsize:
                raise ValueError(f"{name}'s bytes {begin}..{end} do not fit (the body has {len(body)})")
            flat = torch.frombuffer(body[begin:end], dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
            out[name] = flat.reshape(t["shape"])
        return out
    except (ValueError, KeyError, TypeError, struct.error) as e:  # json's decode error is a ValueError
        raise ValueError(f"{file}: truncated or corrupt ({str(e).splitlines()[0][:160]})") from None


def map_config(c, name, block_size=None):
    """A hub config.json -> GPTConfig keyword arguments (no codebooks). Stops on settings this GPT does not
    compute the way the checkpoint was trained."""
    arch = c["model_type"]
    gpt2, neox = arch == "gpt2", arch == "gpt_neox"
    names = dict(gpt2=("n_embd", "n_layer", "n_head", "n_positions", "n_inner"),  # each architecture's own
                 gpt_neo=("hidden_size", "num_layers", "num_heads", "max_position_embeddings", "intermediate_size"),
                 gpt_neox=("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                           "intermediate_size"))[arch]
    n_embd, n_layer, n_head, positions = (c[k] for k in names[:4])
    inner = c.get(names[4])
    act = c.get("hidden_act", "gelu") if neox else c.get("activation_function", "gelu_new")
    unsupported = [f"{k}={c[k]}" for k, ok in (("scale_attn_by_inverse_layer_idx", False),
                                               ("reorder_and_upcast_attn", False), ("scale_attn_weights", True),
                                               ("attention_bias", True))
                   if k in c and c[k] != ok]
    if neox:  # rotary as transformers reads it: rope_parameters (or the older rope_scaling), else the 4.x names
        rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
        rope_pct = rope.get("partial_rotary_factor", c.get("rotary_pct", 0.25))
        rope_base = rope.get("rope_theta", c.get("rotary_emb_base", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            unsupported.append(f"rope_type={rope_type} (only the default rotary)")
        hs = n_embd // n_head
        if int(hs * rope_pct) < 2 or int(hs * rope_pct) % 2:
            unsupported.append(f"rotary_pct={rope_pct} ({int(hs * rope_pct)} of a head's {hs} dims; needs an even "
                               f"number, at least 2)")
    if inner is not None and inner != 4 * n_embd:
        unsupported.append(f"an MLP of {inner} (this GPT's is 4 x {n_embd})")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        unsupported.append(f"{'hidden_act' if neox else 'activation_function'}={act}")
    if unsupported:
        raise ValueError(f"{name}: unsupported {', '.join(unsupported)}")
    cap = TINYSTORIES_BLOCK if arch == "gpt_neo" and "tinystories" in str(name).lower() else positions
    if block_size is None:
        block_size = min(cap, positions)
        if block_size < positions:
            print(f"{name}: block_size {block_size}, the length the TinyStories models were trained at "
                  f"(config.json says {positions})")
    elif not 2 <= block_size <= positions:
        raise ValueError(f"block_size={block_size}: {name} has {positions} positions")
    args = dict(block_size=block_size, vocab_size=c["vocab_size"], n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                bias=True, rope=False, cb_at="none", gelu="exact" if act == "gelu" else "tanh",
                ln_eps=c.get("layer_norm_eps" if neox else "layer_norm_epsilon", 1e-5), tie_head=True)
    if neox:
        args.update(rope=True, learned_pos=False, rope_pct=float(rope_pct), rope_base=float(rope_base),
                    parallel=c.get("use_parallel_residual", True), tie_head=c.get("tie_word_embeddings", False))
    elif not gpt2:
        types = c.get("attention_types")  # what transformers builds attention_layers from, as here
        kinds = [k for ks, n in types for _ in range(n) for k in ks] if types else c.get("attention_layers", [])
        if len(kinds) != n_layer or set(kinds) - {"global", "local"}:
            raise ValueError(f"{name}: attention_layers {kinds} (expected global/local for {n_layer} layers)")
        args.update(qkv_bias=False, scale_attn=False, attn_fp32=True, local_window=c.get("window_size", 256),
                    local_layers=tuple(i for i, k in enumerate(kinds) if k == "local"))
    return args


def _strip(state):
    """The hub's names without the model class's prefix (GPT2Model's files have none, *LMHeadModel's
    'transformer.', GPTNeoXForCausalLM's 'gpt_neox.'), without the attention-mask and rotary buffers old
    files carry, as fp32 tensors."""
    out = {}
    for k, v in state.items():
        k = k.split(".", 1)[1] if k.startswith(("transformer.", "gpt_neox.")) else k
        if k.endswith((".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", ".inv_freq")):
            continue
        out[k] = v.float()
    return out


def _common(s, block):
    """The embeddings and final LayerNorm, the same in both architectures."""
    return {"transformer.wte.weight": s["wte.weight"], "transformer.wpe.weight": s["wpe.weight"][:block],
            "transformer.ln_f.weight": s["ln_f.weight"], "transformer.ln_f.bias": s["ln_f.bias"]}


def map_gpt2(state, args):
    """GPT-2's tensors -> ours: the same names as nanoGPT's, the Conv1D weights (in, out) transposed."""
    s = _strip(state)
    out = _common(s, args["block_size"])
    for i in range(args["n_layer"]):
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias",
                     "mlp.c_fc.bias", "mlp.c_proj.bias"):
            out[f"transformer.h.{i}.{name}"] = s[f"h.{i}.{name}"]
        for name in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
            out[f"transformer.h.{i}.{name}"] = s[f"h.{i}.{name}"].t().contiguous()
    return out


def map_gpt_neo(state, args):
    """GPT-Neo's tensors -> ours: q, k, v stacked into c_attn (q first, as our split reads it), out_proj
    as attn.c_proj; its MLP is nn.Linear already."""
    s = _strip(state)
    out = _common(s, args["block_size"])
    for i in range(args["n_layer"]):
        a = f"h.{i}.attn.attention."
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([s[a + f"{p}_proj.weight"] for p in "qkv"])
        out[f"transformer.h.{i}.attn.c_proj.weight"] = s[a + "out_proj.weight"]
        out[f"transformer.h.{i}.attn.c_proj.bias"] = s[a + "out_proj.bias"]
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                     "mlp.c_proj.weight", "mlp.c_proj.bias"):
            out[f"transformer.h.{i}.{name}"] = s[f"h.{i}.{name}"]
    return out


def map_gpt_neox(state, args):
    """GPT-NeoX's tensors -> ours: query_key_value's rows regrouped from (head, q/k/v, head size) to c_attn's
    (q/k/v, head, head size); the LayerNorms before attention and MLP are ln_1 and ln_2 (also in the parallel
    residual); embed_out (transformers 5: lm_head) is lm_head, unless config.json ties it to embed_in."""
    s = _strip(state)
    C, nh = args["n_embd"], args["n_head"]
    out = {"transformer.wte.weight": s["embed_in.weight"], "transformer.ln_f.weight": s["final_layer_norm.weight"],
           "transformer.ln_f.bias": s["final_layer_norm.bias"]}
    if not args["tie_head"]:
        out["lm_head.weight"] = s["embed_out.weight" if "embed_out.weight" in s else "lm_head.weight"]  # hub, ours
    names = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "attention.dense": "attn.c_proj",
             "mlp.dense_h_to_4h": "mlp.c_fc", "mlp.dense_4h_to_h": "mlp.c_proj"}
    for i in range(args["n_layer"]):
        for theirs, ours in names.items():
            for p in ("weight", "bias"):
                out[f"transformer.h.{i}.{ours}.{p}"] = s[f"layers.{i}.{theirs}.{p}"]
        for p in ("weight", "bias"):
            qkv = s[f"layers.{i}.attention.query_key_value.{p}"]  # (3 C, C) or (3 C,)
            out[f"transformer.h.{i}.attn.c_attn.{p}"] = qkv.view(nh, 3, C // nh, -1).transpose(0, 1).reshape(qkv.shape)
    return out
