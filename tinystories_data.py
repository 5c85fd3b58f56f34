"""
Language-model data: TinyStories, any local text file, or an offline synthetic story corpus whose
stories each have a known topic. Writes into --data_dir: train.bin and val.bin (uint16 tokens, each
document after an <|endoftext|> token, read back with np.memmap as nanoGPT does), meta.json (the encoding,
vocab_size, eot id, topics and their regexes) and, for the synthetic corpus, labels.npz (per story of each
split: its topic id, -1 for none, and the offset of its first token).

    python tinystories_data.py                                    # TinyStoriesV2-GPT4 (internet), gpt2 tokens
    python tinystories_data.py --source=paper --data_dir=data/tinystories_paper   # the paper's stories
    python tinystories_data.py --synthetic --data_dir=data/stories    # offline: 7 topics + none, 20k stories
    python tinystories_data.py --input=FILE --data_dir=data/file --encoding=words
    python tinystories_data.py --input=FILE --encoding=PATH/gpt2.tiktoken   # gpt2 tokens, offline
    python tinystories_data.py --encoding=EleutherAI/pythia-70m --data_dir=data/tinystories_pythia  # its tokens
    python tinystories_data.py --input=DIR --encoding=words --passage_words=150   # real text, in passages

--source picks the stories files of the hub dataset roneneldan/TinyStories (at a pinned commit): v2 =
TinyStoriesV2-GPT4-{train,valid}.txt (GPT-4 stories only, 2.2 GB); paper = TinyStories-{train,valid}.txt
(the original GPT-3.5 and GPT-4 stories, 1.9 GB), the data the codebook paper finetuned on. They are
fetched by hub.py (plain HTTP, resumed, sha256-checked) into the hub cache (HF_HUB_CACHE / HF_HOME) and
streamed from there. --input documents are separated by <|endoftext|> if the file has any, else by
blank lines (an .html file: the text of its <p> elements; a directory: its .html files), with
--passage_words=N cut at sentence ends into passages of about N words, and every --val_every-th goes to
val.bin. Encodings (all tiktoken): gpt2 (tiktoken
downloads its BPE once; offline, a local copy of the r50k/gpt2 ranks, given as --encoding=PATH.tiktoken
or in the environment variable GPT2_TIKTOKEN, e.g. whisper/assets/gpt2.tiktoken from openai-whisper's
source archive; meta.json says gpt2 either way); bytes (256 byte tokens + EOT, offline); words (bytes +
the --words most frequent GPT-2 pre-tokenizer pieces of the training text as whole tokens, offline: a
piece in the vocabulary is one token, any other text falls back to bytes; the synthetic corpus uses it
with all its pieces); a model's own tokenizer.json (a byte-level BPE: Pythia's, GPT-2's), as
--encoding=HUB_ID (hub.py fetches it into the hub cache), --encoding=DIR holding one, or its path, read by
pretrained/tokenizer.py into a tiktoken encoding that gives the ids the tokenizers package gives.
meta.json holds what make_encoding() needs to rebuild it (for a tokenizer.json: its path, its source, to
fetch it again from, and its sha256, which it must match). Unlike the official code,
which concatenates the stories without separators, every document here follows an <|endoftext|> token.
"""

import collections
import hashlib
import html.parser
import itertools
import json
import os
import random
import re
import sys

import numpy as np
import tiktoken
import torch
from tqdm import tqdm

from helpers.common import parse_flags
from pretrained import hub, tokenizer

DATASET = "roneneldan/TinyStories"  # on the Hugging Face hub
DATASET_REVISION = "f54c09fd23315a6f9c86f9dc80f725de7d8f9c64"  # main since Aug 2024; it holds both sources
SOURCES = dict(v2=("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"),  # GPT-4 stories only
               paper=("TinyStories-train.txt", "TinyStories-valid.txt"))  # the original stories: the paper's
GPT2_TIKTOKEN = "GPT2_TIKTOKEN"  # environment variable: a local gpt2.tiktoken, used for the gpt2 encoding
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's, for r50k_base
EOT = "<|endoftext|>"
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# the paper's topic patterns for TinyStories (lowercased text, substring match)
TOPICS = dict(dragon="dragon", slide="slide", friend="friend", flower="flower", fire="fire", baby="baby",
              princess="prince|crown|king|castle")

# -----------------------------------------------------------------------------
# encodings and token files


def make_encoding(spec, ranks_file=""):
    """{'kind': 'gpt2' | 'bytes' | 'words' | 'hf', ...} (meta.json's 'encoding') -> tiktoken.Encoding.
    gpt2 comes from ranks_file, else from the file named by $GPT2_TIKTOKEN, else from tiktoken's download;
    hf from a tokenizer.json (hf_spec)."""
    if spec["kind"] == "hf":
        path = spec["path"] if os.path.isfile(spec["path"]) else hub.tokenizer_file(spec["source"])
        return tokenizer.load(path, spec["sha256"])
    if spec["kind"] == "gpt2":
        if ranks_file or os.environ.get(GPT2_TIKTOKEN):
            return gpt2_from_file(ranks_file or os.environ[GPT2_TIKTOKEN])
        try:  # the first use downloads GPT-2's BPE files; offline that is a long HTTPSConnectionPool(...) error
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # requests' ConnectionError, a proxy's HTTP error, a bad cache: one line
            raise OSError(f"the gpt2 encoding could not be loaded: tiktoken downloads its BPE files on first use "
                          f"and that failed ({type(e).__name__}; no internet?); offline, set {GPT2_TIKTOKEN} to a "
                          f"local gpt2.tiktoken (or pass --encoding=PATH.tiktoken), or use --encoding=words or "
                          f"--encoding=bytes") from None
    ranks = {bytes([i]): i for i in range(256)}
    for w in spec.get("words", []):
        ranks.setdefault(w.encode("utf-8"), len(ranks))
    return tiktoken.Encoding(name=f"codebook-{spec['kind']}", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def hf_spec(name):
    """--encoding=HUB_ID, DIR or PATH/tokenizer.json -> meta.json's spec: kind hf, the file's absolute path
    (in the hub cache for a hub id), its source (a hub id at its revision, or the local path) and sha256."""
    if not os.path.exists(name) and not re.fullmatch(r"[\w.-]+/[\w.-]+(@.+)?", name):
        raise ValueError(f"--encoding={name}: valid: gpt2, bytes, words, a path to a gpt2.tiktoken, or a model's "
                         f"tokenizer.json (a hub id owner/name[@revision], a directory holding it, or its path)")
    if os.path.isfile(name):
        path, source = os.path.abspath(name), os.path.abspath(name)
    elif os.path.isdir(name):
        path, source = os.path.abspath(hub.tokenizer_file(name)), os.path.abspath(name)
    else:
        repo, revision = hub.parse_name(name)
        path, source = hub.tokenizer_file(repo, revision), f"{repo}@{revision}"
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return dict(kind="hf", source=source, path=path, sha256=digest)


def gpt2_from_file(path):
    """The gpt2 encoding from a local ranks file: gpt2 and r50k_base are one encoding (the same ranks,
    pattern and <|endoftext|> = 50256), so the r50k_base file, checked against tiktoken's hash, serves."""
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise OSError(f"{GPT2_TIKTOKEN} / --encoding: cannot read {path} ({e.strerror})") from None
    if digest != R50K_SHA256:
        raise ValueError(f"{path}: not the gpt2 (r50k_base) ranks: sha256 {digest[:12]}..., tiktoken expects "
                         f"{R50K_SHA256[:12]}... (e.g. whisper/assets/gpt2.tiktoken of openai-whisper's sdist)")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, special_tokens={EOT: 50256}, explicit_n_vocab=50257,
                             mergeable_ranks=load_tiktoken_bpe(path, expected_hash=R50K_SHA256))


# GPT2_PAT in the standard library's re: \p{L} becomes [^\W\d_], \p{N} becomes \d. It only picks which
# whole words get a token; a word it splits differently from tiktoken just goes unused.
_WORD_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def fit_words(texts, n):
    """The n most frequent multi-byte pieces of the GPT-2 pre-tokenizer over texts (ties by text)."""
    count = collections.Counter(p for t in texts for p in _WORD_RE.findall(t) if len(p.encode()) > 1)
    return [w for w, _ in sorted(count.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def encode_docs(enc, docs):
    """docs -> (uint16 tokens: EOT, doc, EOT, doc, ...; int64 offset of each doc's first token)."""
    ids = enc.encode_ordinary_batch(list(docs)) if docs else []
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths + 1
    tokens = np.fromiter((t for x in ids for t in (enc.eot_token, *x)), dtype=np.uint16, count=int(lengths.sum()))
    return tokens, offsets


def write_split(path, enc, docs, chunk=4096):
    """Tokenise docs chunk by chunk and append to path (uint16). -> offsets of the docs' first tokens."""
    if enc.n_vocab > 65536:
        raise ValueError(f"vocab {enc.n_vocab} does not fit uint16")
    offsets, n = [], 0
    with open(path + ".tmp", "wb") as f:
        batch = []
        for doc in tqdm(docs, desc=os.path.basename(path), unit="doc", disable=None):
            batch.append(doc)
            if len(batch) == chunk:
                tokens, offs = encode_docs(enc, batch)
                f.write(tokens.tobytes())
                offsets.append(offs + n)
                n += len(tokens)
                batch = []
        tokens, offs = encode_docs(enc, batch)
        f.write(tokens.tobytes())
        offsets.append(offs + n)
    os.replace(path + ".tmp", path)
    return np.concatenate(offsets)


def write_meta(data_dir, enc, spec, **extra):
    meta = dict(encoding=spec, vocab_size=enc.n_vocab, eot=enc.eot_token, **extra)
    path = os.path.join(data_dir, "meta.json")
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(path + ".tmp", path)  # atomic: a crash leaves the old meta.json whole
    return meta


def load_tokens(data_dir):
    """-> (train memmap, val memmap, meta dict) of a prepared data_dir."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: prepare the data first (python tinystories_data.py --help)")
    meta = json.load(open(path))
    mm = [np.memmap(os.path.join(data_dir, f"{s}.bin"), dtype=np.uint16, mode="r") for s in ("train", "val")]
    return mm[0], mm[1], meta


def get_batch(data, batch_size, length, generator):
    """(batch_size, length) int64 windows at random offsets of a token array (nanoGPT's get_batch)."""
    ix = torch.randint(len(data) - length, (batch_size,), generator=generator)
    return torch.from_numpy(np.stack([data[i:i + length].astype(np.int64) for i in ix.tolist()]))


def fixed_windows(data, n, length):
    """n windows of length tokens at evenly spaced offsets: the same held-out set every time."""
    if len(data) < length:
        raise ValueError(f"{len(data)} tokens cannot fill one window of {length}")
    starts = np.linspace(0, len(data) - length, n).astype(np.int64)
    return torch.from_numpy(np.stack([data[i:i + length].astype(np.int64) for i in starts]))


# -----------------------------------------------------------------------------
# documents: a local file, a big file streamed


def read_docs(path):
    """Documents of a text file: separated by <|endoftext|> if it has any, else by blank lines. An .html
    file is one document, the text of its <p> elements (paragraphs); a directory, its .html files in order."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".html"))
        if not files:
            raise ValueError(f"{path}: a directory without .html files (--input: a text file, an .html file or a "
                             f"directory of them)")
        return [d for f in files for d in read_docs(os.path.join(path, f))]
    text = open(path, encoding="utf-8", errors="replace").read()
    if path.endswith(".html"):
        reader = _Paragraphs()
        reader.feed(text)
        return [" ".join(reader.paragraphs)] if reader.paragraphs else []
    parts = text.split(EOT) if EOT in text else re.split(r"\n\s*\n", text)
    return [p.strip() for p in parts if p.strip()]


class _Paragraphs(html.parser.HTMLParser):
    """The text of an HTML page's paragraphs (<p> elements, or elements of class "para" as DocBook writes
    them), whitespace collapsed, one string per outermost paragraph."""
    VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr", "source"}

    def __init__(self):
        super().__init__()
        self.paragraphs, self.stack, self.parts = [], [], []  # stack: (tag, is a paragraph) of open elements

    def handle_starttag(self, tag, attrs):
        if tag == "p" and any(t == "p" for t, _ in self.stack):  # HTML: a <p> ends the open one
            self.handle_endtag("p")
        if tag not in self.VOID:
            self.stack.append((tag, tag == "p" or "para" in (dict(attrs).get("class") or "").split()))

    def handle_endtag(self, tag):
        while any(t == tag for t, _ in self.stack):  # close it and whatever was left open inside it
            t, para = self.stack.pop()
            if para and not any(p for _, p in self.stack):
                text = " ".join("".join(self.parts).split())
                self.parts = []
                if text:
                    self.paragraphs.append(text)
            if t == tag:
                break

    def handle_data(self, data):
        if any(p for _, p in self.stack):
            self.parts.append(data)


def passages(docs, words):
    """Cut each document at sentence ends into passages of at least `words` words (its rest joins the last
    one); a document shorter than that stays whole. words=0: the documents as they are."""
    if words <= 0:
        return list(docs)
    out = []
    for doc in docs:
        cur, n, start = [], 0, len(out)
        for sent in re.split(r"(?<=[.!?:;])\s+", doc):
            cur.append(sent)
            n += len(sent.split())
            if n >= words:
                out.append(" ".join(cur))
                cur, n = [], 0
        if cur:
            if len(out) > start and n < words // 2:
                out[-1] += " " + " ".join(cur)
            else:
                out.append(" ".join(cur))
    return out


# -----------------------------------------------------------------------------
# the synthetic corpus: simple stories, each about one topic (or none), from a small grammar

NAMES = dict(girl="Lily Mia Anna Lucy Sue Emma Zoe Kim Amy Rose Ella Nora".split(),
             boy="Tom Ben Sam Max Tim Jack Leo Bob Dan Joe Finn Ray".split())
SLOTS = dict(
    place="park yard house street school shop river hill room forest lake farm".split(),
    toy="ball car kite doll block truck drum boat".split(),
    pet="dog cat bird fish bunny duck".split(),
    food="apple cake cookie sandwich soup pie banana carrot".split(),
    feel="happy glad tired proud sad excited calm silly".split(),
    color="red blue green yellow pink purple orange brown".split(),
    thing="rock box hat shell leaf stick key cup".split(),
    adj="little small happy curious kind brave shy".split(),
)
OPENINGS = ["Once upon a time, there was a {adj} {kid} named {name}.", "Once there was a {adj} {kid} named {name}.",
            "A long time ago, there lived a {adj} {kid} named {name}.",
            "One day, a {adj} {kid} named {name} went out to play."]
GENERIC = [
    "{name} liked to play in the {place}.", "The sun was warm and the sky was {color}.", "{He} had a {color} {toy}.",
    "{name} ran to the {place} with {his} {pet}.", "{He} ate a {food} and felt {feel}.",
    'Mom said, "{name}, it is time to go home."', '{He} smiled and said, "I am so {feel}!"',
    "They went home and had {food} for dinner.", "{name} found a {color} {thing} near the {place}.",
    "{His} {pet} jumped and ran around.", "{He} put the {thing} in {his} pocket.", "{name} felt {feel} all day.",
    "The {pet} was hungry, so {name} gave it a {food}.", "{He} looked at the {color} {toy} for a long time.",
    "It started to rain, so {name} went inside.", "{name} sat down under a tall tree.",
]
ENDINGS = ["{name} went to bed {feel}.", "It was a good day.", "{name} smiled. The end."]
# topic: (intro, sentences, ending); every topic word appears only in its own topic's stories
TOPIC_STORY = dict(
    dragon=("One day, {name} met a {color} dragon who lived in a cave.",
            ["{name} saw the dragon near the cave.", "The dragon had {color} scales and big wings.",
             "The dragon gave a loud roar.", "{name} was not scared of the dragon.",
             "The dragon flew over the {place}.",
             "{He} gave the dragon a {food}.", "The dragon and {name} played near the cave."],
            "From that day on, {name} visited the dragon every day."),
    slide=("At the playground, there was a big {color} slide.",
           ["{name} went down the slide.", "The slide was very tall.", "{He} climbed up the ladder of the slide.",
            '"Wheee!" said {name} on the slide.', "{He} went down the slide again and again.",
            "The slide was shiny and fast.", "{name} waited in line for the slide."],
           "{name} loved the slide more than any {toy}."),
    friend=("{name} had a friend named {name2}.",
            ["{name} and {his} friend played together.", "{name2} was a good friend.",
             "The two friends shared a {toy}.", "{He} gave {his} friend a big hug.",
             '"Friends help each other," said Mom.', "{name} and {name2} were best friends."],
            "{name} was glad to have a friend like {name2}."),
    flower=("{name} saw a pretty {color} flower in the garden.",
            ["The flower had soft petals.", "{He} gave the flower some water.", "The flower began to bloom.",
             "{He} planted a seed next to the flower.", "The garden was full of flowers.",
             "{name} smelled the {color} flower."],
            "Every day, {name} smiled at the flower."),
    fire=("One night, {name} saw a big fire near the {place}.",
          ["The fire was big and hot.", "{name} saw smoke and flames.", "A firefighter came to put out the fire.",
           "The firefighters sprayed water on the fire.", "{He} stayed far away from the fire.",
           "The fire made the sky orange."],
          "{name} learned that fire is not a toy."),
    baby=("{name} had a new baby {sib}.",
          ["The baby was crying in the crib.", "{He} gave the baby a bottle.", "The baby shook a rattle and laughed.",
           "{name} sang a song to the baby.", "Mom held the baby and smiled.", "The baby fell asleep in the crib."],
          "{name} loved the baby very much."),
    princess=("{name} dreamed of a princess who lived in a castle.",
              ["The princess wore a shiny crown.", "The king and the queen were kind.", "A prince came to the castle.",
               "The princess danced in the castle.", "{name} wanted to be a princess.",
               "The king gave the princess a crown."],
              "The princess and the king lived happily in the castle."),
)
SYNTHETIC_TOPICS = {t: r"\b(" + p + ")" for t, p in TOPICS.items()}  # word starts: 'king' is not in 'looking'


def make_story(rng, topic=None):
    """One story (a string) about topic (a key of TOPIC_STORY) or about nothing in particular."""
    kid = rng.choice(["girl", "boy"])
    name, name2 = rng.choice(NAMES[kid]), rng.choice(NAMES["girl"] + NAMES["boy"])
    fill = dict(kid=kid, name=name, name2=name2 if name2 != name else "Max" if name != "Max" else "Lily",
                he="she" if kid == "girl" else "he", his="her" if kid == "girl" else "his",
                sib=rng.choice(["brother", "sister"]), **{k: rng.choice(v) for k, v in SLOTS.items()})
    fill.update(He=fill["he"].capitalize(), His=fill["his"].capitalize())
    parts = [rng.choice(OPENINGS)]
    intro, sents, ending = TOPIC_STORY[topic] if topic else (None, [], rng.choice(ENDINGS))
    if intro:
        parts.append(intro)
    for _ in range(rng.randint(14, 20)):  # about 175 tokens: 200 new tokens are about one story
        parts.append(rng.choice(sents if sents and rng.random() < 0.5 else GENERIC))
    parts.append(ending)
    out = []
    for p in parts:  # new slot values per sentence, the characters kept
        fill.update({k: rng.choice(v) for k, v in SLOTS.items() if k != "adj"})
        out.append(p.format(**fill))
    return " ".join(out)


def synthetic_corpus(n, seed=0, p_none=0.3):
    """n stories and their topic ids (-1: no topic; else an index into list(TOPIC_STORY))."""
    rng = random.Random(seed)
    names = list(TOPIC_STORY)
    topics = [-1 if rng.random() < p_none else rng.randrange(len(names)) for _ in range(n)]
    return [make_story(rng, names[t] if t >= 0 else None) for t in topics], np.array(topics)


# -----------------------------------------------------------------------------
# the command line


def prepare(data_dir, input="", synthetic=False, encoding="gpt2", words=4096, val_every=20,
            num_stories=20000, seed=0, source="v2", passage_words=0):
    """Write train.bin, val.bin, meta.json (and labels.npz for the synthetic corpus) into data_dir.
    encoding: gpt2, bytes, words, a path to a gpt2.tiktoken (then the gpt2 encoding, from that file), or a
    model's tokenizer.json: a hub id, a directory holding it, or its path (hf_spec)."""
    ranks_file, spec, builtin = "", None, encoding in ("gpt2", "bytes", "words")
    if not builtin and (encoding.endswith(".tiktoken") or os.path.isfile(encoding)) and not encoding.endswith(".json"):
        ranks_file, encoding = encoding, "gpt2"
    elif not builtin:  # a model's tokenizer.json: fetched and checked before the data is read
        spec = hf_spec(encoding)
        if EOT not in make_encoding(spec).special_tokens_set:
            raise ValueError(f"--encoding={encoding}: its tokenizer has no special token {EOT}, which separates "
                             f"the documents here")
    if source not in SOURCES:
        raise ValueError(f"--source={source}: valid: {', '.join(SOURCES)}")
    os.makedirs(data_dir, exist_ok=True)
    extra, labels = {}, None
    if synthetic:
        docs, topics = synthetic_corpus(num_stories, seed)
        n_val = max(1, num_stories // val_every)
        splits = dict(train=docs[n_val:], val=docs[:n_val])
        labels = dict(train_topic=topics[n_val:], val_topic=topics[:n_val])
        extra = dict(source="synthetic", seed=seed, topics=list(TOPIC_STORY), patterns=SYNTHETIC_TOPICS)
        encoding, spec = "words", None
    elif input:
        if not os.path.exists(input):
            raise ValueError(f"--input={input}: no such file or directory")
        docs = passages(read_docs(input), passage_words)
        if len(docs) < 2:
            raise ValueError(f"{input}: fewer than two documents (separate them by blank lines or {EOT})")
        splits = dict(train=[d for i, d in enumerate(docs) if i % val_every != val_every - 1],
                      val=[d for i, d in enumerate(docs) if i % val_every == val_every - 1])
        extra = dict(source=os.path.abspath(input), patterns=TOPICS, passage_words=passage_words)
    else:  # TinyStories: one story per <|endoftext|>, the files are big, so documents stream from disk
        try:
            paths = {s: hub.hub_file(DATASET, f, DATASET_REVISION, repo_type="dataset")
                     for s, f in zip(("train", "val"), SOURCES[source])}
        except hub.HubUnreachable as e:
            raise hub.HubUnreachable(f"{e}; offline, use --input=FILE (a local copy of the stories) or --synthetic")
        splits = {s: iter_docs(p) for s, p in paths.items()}
        extra = dict(source=f"{DATASET}@{DATASET_REVISION}: {', '.join(SOURCES[source])}", topics=list(TOPICS),
                     patterns=TOPICS)
    spec = spec or dict(kind=encoding)
    if encoding == "words":  # fitted on (the first 100k documents of) the training split
        sample = splits["train"]
        if not isinstance(sample, list):
            sample = itertools.islice(iter_docs(paths["train"]), 100000)
        spec["words"] = fit_words(sample, words)
    enc = make_encoding(spec, ranks_file)
    offsets = {s: write_split(os.path.join(data_dir, f"{s}.bin"), enc, docs) for s, docs in splits.items()}
    if labels is not None:
        np.savez(os.path.join(data_dir, "labels.npz"), train_offsets=offsets["train"], val_offsets=offsets["val"],
                 **labels)
    sizes = {s: os.path.getsize(os.path.join(data_dir, f"{s}.bin")) // 2 for s in splits}
    meta = write_meta(data_dir, enc, spec, **extra, tokens=sizes)
    print(f"wrote {data_dir}: vocab {meta['vocab_size']}, tokens {meta['tokens']}")
    return meta


def iter_docs(path, chunk=1 << 22):
    """Stream the <|endoftext|>-separated documents of a big file."""
    rest = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while block := f.read(chunk):
            parts = (rest + block).split(EOT)
            rest = parts.pop()
            yield from (p.strip() for p in parts if p.strip())
    if rest.strip():
        yield rest.strip()


if __name__ == "__main__":
    args = dict(data_dir="data/tinystories", source="v2", input="", synthetic=False, encoding="gpt2", words=4096,
                val_every=20, num_stories=20000, seed=0, passage_words=0)
    given, _ = parse_flags(sys.argv[1:], args, __doc__)  # a bare --synthetic is true; --help prints the flags
    args.update(given)
    try:
        prepare(**args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
