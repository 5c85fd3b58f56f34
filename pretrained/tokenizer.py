"""
A Hugging Face tokenizer.json of a byte-level BPE (Pythia's, GPT-NeoX's, GPT-2's) read with the standard
library and turned into a tiktoken.Encoding that gives the ids the tokenizers package gives:

    from pretrained import tokenizer
    enc = tokenizer.load("path/to/tokenizer.json")
    enc.encode_ordinary("Hello  world")                    # special tokens as plain text
    enc.encode("<|endoftext|>Hi", allowed_special="all")   # = Tokenizer.encode(text, add_special_tokens=False).ids
    enc.decode(ids)                                        # = Tokenizer.decode(ids, skip_special_tokens=False)

How the file becomes an Encoding:
- model.vocab: its strings are in GPT-2's byte-level alphabet (bytes_to_unicode: each byte one printable
  character), mapped back to bytes; a token's rank is its id in the file.
- model.merges: tokenizers merges the adjacent pair that comes first in merges, tiktoken the adjacent pair
  whose concatenation has the lowest rank. These agree when merge i makes the token of the i-th smallest
  id, as BPE training numbers them, which load checks: each merge's parts and result are in the vocabulary,
  the results' ids increase along merges, and every token of two or more bytes is some merge's result
  (or an added token). A file that breaks this is refused, since tiktoken would encode it otherwise.
  Every byte that UTF-8 text can hold must be a token (Pythia has no C0, C1, F5-FF: UTF-8 never has them).
- pre_tokenizer: ByteLevel (GPT-2's regex, add_prefix_space false), or Split by a regex (behavior
  Isolated) followed by ByteLevel without its regex, as Llama 3's and Qwen2's: that regex is tiktoken's
  pattern, checked to leave no character of a probe text unmatched (tiktoken drops what it does not match).
- added_tokens (Pythia: <|endoftext|> 0, <|padding|> 1, and runs of 2 to 24 spaces 50254-50276, which are
  not special): found before the BPE, the longest at the leftmost place, as tokenizers does; those with
  normalized false in the raw text, the others in the normalized text. Special ones only where allowed,
  as tiktoken's encode has it; the others always. They decode to their text.
- normalizer: none or one of NFC, NFD, NFKC, NFKD (Pythia: NFC), applied between the added tokens.
- the post_processor (a BOS, EOS template) is not applied: these are the ids of the text alone.
Anything else (WordPiece, Unigram, a Metaspace BPE, another normalizer or pre-tokenizer, lstrip/rstrip
added tokens) is a ValueError of one line saying what the file is and what is valid.
"""

import functools
import hashlib
import json
import re
import unicodedata

import tiktoken
from tiktoken.core import raise_disallowed_special_token

# GPT-2's pattern, as tokenizers' ByteLevel pre-tokenizer uses it (= tiktoken's r50k_base)
BYTE_LEVEL_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")
NOT_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}  # bytes that never occur in UTF-8 text
VALID = ("valid: a tokenizer.json of a byte-level BPE (model BPE, pre_tokenizer ByteLevel or Split + ByteLevel, "
         "decoder ByteLevel), as Pythia's and GPT-2's")
# a text the pre-tokenizer's regex must cover whole: letters, digits, marks, symbols, whitespace of each kind
PROBE = ("Hello, World! It's 2024: x=3.14; na\u00efve cafe\u0301 \u00a0\u2003\u3000 \t\t\n\n\r\n  \u200b "
         "\u6f22\u5b57\u304b\u306a \U0001f600\U0001f44d\U0001f3fd \u0627\u0644\u0639 "
         "\u0928\u092e\u0938\u094d\u0924\u0947 <|x|> \\ ~`^_|  \x00\x7f\u2028 end")


def byte_alphabet():
    """GPT-2's bytes_to_unicode inverted: the character that stands for each byte -> the byte. Printable
    Latin-1 bytes stand for themselves, the other 68 for chr(256), chr(257), ... in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(rest)}}


class Encoding(tiktoken.Encoding):
    """tiktoken's Encoding with what tokenizers does around its BPE: added tokens found first (the longest
    at the leftmost place), the text between them normalized. encode, encode_ordinary and their _batch
    forms do this; the BPE itself is tiktoken's, and so is decoding."""

    def __init__(self, name, pat_str, mergeable_ranks, added, normalizer):
        # added: [(content, id, special, normalized)]
        super().__init__(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                         special_tokens={c: i for c, i, _, _ in added})
        self._added = added
        self._normalizer = normalizer
        self.special_only = frozenset(c for c, _, special, _ in added if special)
        self._matchers = {}  # (allowed special tokens, normalized stage) -> (regex or None, {text: id})
        self._ids = set(mergeable_ranks.values()) | {i for _, i, _, _ in added}

    @functools.cached_property
    def special_tokens_set(self):  # what tiktoken's allowed_special="all" means: the special added tokens
        return set(self.special_only)

    def _matcher(self, allowed, normalized):
        """A regex of the added tokens matched at one stage (raw or normalized text), longest first."""
        if (allowed, normalized) not in self._matchers:
            norm = self._normalize if normalized else (lambda s: s)
            texts = {norm(c): i for c, i, special, n in self._added
                     if n == normalized and (not special or c in allowed)}
            regex = re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))) if texts else None
            self._matchers[allowed, normalized] = regex, texts
        return self._matchers[allowed, normalized]

    def _normalize(self, text):
        return unicodedata.normalize(self._normalizer, text) if self._normalizer else text

    def _encode(self, text, allowed):
        ids = []
        for part in self._cut(text, allowed, False, ids):
            for piece in self._cut(self._normalize(part), allowed, True, ids):
                ids += super().encode_ordinary(piece)
        return ids

    def _cut(self, text, allowed, normalized, ids):
        """Yield the text between added tokens, appending each added token's id to ids in its turn."""
        regex, texts = self._matcher(allowed, normalized)
        start = 0
        for m in regex.finditer(text) if regex else ():
            if m.start() > start:
                yield text[start:m.start()]
            ids.append(texts[m.group()])
            start = m.end()
        if start < len(text):
            yield text[start:]

    def encode_ordinary(self, text):
        return self._encode(text, frozenset())

    def encode(self, text, *, allowed_special=frozenset(), disallowed_special="all"):
        if allowed_special == "all":
            allowed_special = self.special_only
        if disallowed_special == "all":
            disallowed_special = self.special_only - set(allowed_special)
        for t in disallowed_special:
            if t in text:
                raise_disallowed_special_token(t)
        return self._encode(text, frozenset(allowed_special))

    # an id the file has no token for (Pythia's model has 27 more rows than its tokenizer) decodes to
    # nothing, as in tokenizers
    def decode_bytes(self, tokens):
        return super().decode_bytes([t for t in tokens if t in self._ids])

    def decode(self, tokens, errors="replace"):
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)

    def decode_single_token_bytes(self, token):
        return super().decode_single_token_bytes(token) if token in self._ids else b""


def load(path, sha256=None):
    """tokenizer.json at path -> Encoding; with sha256, a file of another hash is refused (a ValueError)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise OSError(f"{path}: cannot read the tokenizer ({e.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 and digest != sha256:
        raise ValueError(f"{path}: not the tokenizer.json the data was made with (sha256 {digest[:12]}..., "
                         f"expected {sha256[:12]}...)")
    return from_json(data, f"hf-{digest[:12]}", path)


@functools.lru_cache(maxsize=4)
def from_json(data, name="hf", where="tokenizer.json"):
    """The bytes of a tokenizer.json -> Encoding, or a ValueError of one line (where: the file, for it)."""
    def refuse(why):
        raise ValueError(f"{where}: {why}; {VALID}")
    try:
        tok = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        refuse(f"not a tokenizer.json (not JSON: {type(e).__name__})")
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        refuse("not a tokenizer.json (no model.vocab)")
    kind = model.get("type") or ("BPE" if "merges" in model else "?")
    if kind != "BPE":
        refuse(f"a {kind} tokenizer, not a byte-level BPE")
    for key, ok in (("dropout", None), ("continuing_subword_prefix", ""), ("end_of_word_suffix", ""),
                    ("byte_fallback", False)):
        if model.get(key) not in (None, ok):
            refuse(f"a BPE with {key}={model[key]!r}")
    pat = pre_tokenizer_pattern(tok.get("pre_tokenizer"), refuse)
    dec = tok.get("decoder") or {}
    if dec.get("type") != "ByteLevel":
        refuse(f"its decoder is {dec.get('type')}, not ByteLevel")
    norm = (tok.get("normalizer") or {}).get("type")
    if norm not in (None, *NORMALIZERS):
        refuse(f"its normalizer is {norm} (valid: none, {', '.join(NORMALIZERS)})")

    alphabet = byte_alphabet()
    vocab = model["vocab"]
    added = []
    for a in tok.get("added_tokens") or []:
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            refuse(f"added token {a['content']!r} has lstrip, rstrip or single_word")
        added.append((a["content"], a["id"], bool(a.get("special")), bool(a.get("normalized"))))
    is_added = {c for c, *_ in added}
    ranks = {}
    for s, i in vocab.items():
        try:
            b = bytes(alphabet[c] for c in s)
        except KeyError as e:
            if s in is_added:
                continue
            refuse(f"token {s!r} ({i}) has {e.args[0]!r}, not in the byte-level alphabet: not a byte-level BPE")
        ranks[b] = i
    if len(set(ranks.values())) != len(ranks):
        refuse("two tokens share an id")
    missing = [b for b in range(256) if bytes([b]) not in ranks and b not in NOT_UTF8]
    if missing:
        refuse(f"byte {missing[0]:#04x} is not a token, so text holding it cannot be encoded")

    # tiktoken merges by the rank of the result: the results must be numbered in the order of the merges
    made, last = set(), -1
    for n, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ") if isinstance(m, str) else m
        if a not in vocab or b not in vocab or a + b not in vocab:
            refuse(f"merge {n} ({a!r}, {b!r}) has a part or a result that is not in the vocabulary")
        if vocab[a + b] <= last:
            refuse(f"merge {n} makes {a + b!r} of id {vocab[a + b]}, not above the previous merge's {last}: "
                   f"tiktoken merges in the order of the ids, so they must follow the merges")
        last = vocab[a + b]
        made.add(a + b)
    for s, i in vocab.items():
        if len(s) > 1 and s not in made and s not in is_added:
            refuse(f"token {s!r} ({i}) is made by no merge")
    # added tokens decode as themselves: the vocabulary's own entries for them are no BPE result
    added_ids = {i for _, i, _, _ in added}
    ranks = {b: r for b, r in ranks.items() if r not in added_ids or len(b) == 1}
    enc = Encoding(name, pat, ranks, added, norm)
    ids = enc.encode_ordinary(PROBE)
    if enc.decode(ids) != enc._normalize(PROBE):
        refuse("its pre-tokenizer's regex leaves characters unmatched, which tiktoken would drop")
    return enc


def pre_tokenizer_pattern(pre, refuse):
    """The tokenizer.json's pre_tokenizer -> the regex tiktoken splits text with."""
    pre = pre or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    if kinds[-1:] != ["ByteLevel"] or len(steps) > 2 or (len(steps) == 2 and kinds[0] != "Split"):
        refuse(f"its pre-tokenizer is {' + '.join(map(str, kinds)) or 'none'}")
    if last.get("add_prefix_space"):
        refuse("its ByteLevel pre-tokenizer has add_prefix_space true")
    if len(steps) == 1:
        if last.get("use_regex", True) is False:
            refuse("its ByteLevel pre-tokenizer has no regex (use_regex false) and no Split before it")
        return BYTE_LEVEL_PAT
    split = steps[0]
    if last.get("use_regex", True) or "Regex" not in (split.get("pattern") or {}) or split.get("invert") or \
            split.get("behavior") != "Isolated":
        refuse("its Split pre-tokenizer is not a regex of behavior Isolated followed by ByteLevel without its regex")
    return split["pattern"]["Regex"]
