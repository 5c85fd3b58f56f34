"""
Files from the Hugging Face hub with the standard library only: the hub's `resolve` URLs, a local cache,
a tqdm bar, a partial download resumed with a Range request, and each file checked against the hash
the hub reports for it before it counts as downloaded.

    from pretrained import hub
    path = hub.model_dir("roneneldan/TinyStories-1Layer-21M")       # a folder: config.json + weights
    path = hub.model_dir("gpt2")                                      # = openai-community/gpt2
    path = hub.tokenizer_file("EleutherAI/pythia-70m")                # its tokenizer.json
    path = hub.hub_file("roneneldan/TinyStories", "TinyStories-valid.txt", repo_type="dataset")

Where things go:
- URL: {HF_ENDPOINT}/{repo}/resolve/{revision}/{file} (datasets: {HF_ENDPOINT}/datasets/{repo}/...),
  HF_ENDPOINT defaulting to https://huggingface.co, as huggingface_hub has it.
- cache: HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (the hub's conventions); inside
  it a layout of our own, not huggingface_hub's blobs/snapshots: {models|datasets}--{owner}--{name}/
  {revision}/{file}. A file there is complete and checked: it is written as {file}.incomplete and moved
  into place (os.replace) only then. A cached file is used without asking the hub again, even at a
  branch name such as main: pass a commit hash as the revision to pin one, or delete the folder to
  fetch anew. HF_HUB_OFFLINE=1 (huggingface_hub's switch): the cache only, no request at all.
- the check: for a file stored with git LFS (weights, big data files) the hub's own response carries
  X-Linked-Etag = the file's sha256 (its ETag, the CDN's, is not); a small file stored in git carries
  ETag = its git blob sha1 (sha1 of b"blob {size}\\0" + bytes), which is checked too. Any other ETag
  (weak, or from a server that sends none) cannot be checked: then only the size is, where it is known.

Errors are HubError (an OSError) with a one-line message, for a script to pass to common.fail;
HubUnreachable (a HubError) when the hub cannot be reached at all. Not handled: private or gated repositories (no token is sent), two processes
downloading the same file at once.
"""

import hashlib
import json
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

GPT2 = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # short names: openai-community/<name>
WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # in this order; the first one the repository has
TOKENIZER = "tokenizer.json"  # fetched with the weights where the repository has one (pretrained/tokenizer.py)
OFFLINE = "offline, pass a local directory holding config.json and model.safetensors or pytorch_model.bin"
TIMEOUT = 60  # seconds without a byte before a connection counts as dropped


class HubError(OSError):
    """A one-line reason a file could not be had: what was asked, what went wrong, what works instead."""
    status = None  # the HTTP status where the hub answered with an error (404: no such file)


class HubUnreachable(HubError):
    """No connection to the hub at all (no network, a wrong HF_ENDPOINT)."""


def endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def cache_dir():
    """HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join("~", ".cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


# -----------------------------------------------------------------------------
# one file


def hub_file(repo, filename, revision="main", repo_type="model"):
    """The local path of one file of a hub repository, downloaded into the cache unless it is there."""
    kind = {"model": "models", "dataset": "datasets"}[repo_type]
    url_repo = repo if repo_type == "model" else f"datasets/{repo}"
    url = f"{endpoint()}/{url_repo}/resolve/{urllib.parse.quote(revision, safe='')}/{filename}"
    folder = os.path.join(cache_dir(), f"{kind}--{repo.replace('/', '--')}", revision.replace("/", "--"))
    return download(url, os.path.join(folder, filename), what=f"{repo}@{revision}: {filename}")


def download(url, path, what="", attempts=3):
    """url -> path over plain HTTP(S). A path that exists is taken as it is (no request). Otherwise the
    bytes go to path + '.incomplete', a dropped connection is resumed with a Range request (up to
    `attempts` tries in this call, and again on the next call), the result is checked against the
    hash the hub sent and only then moved to path. A corrupt download is deleted."""
    if os.path.exists(path):
        return path
    what = what or url
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):  # the hub's switch: cache only
        raise HubUnreachable(f"{what}: not in the cache {cache_dir()} and HF_HUB_OFFLINE is set")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part = path + ".incomplete"
    for attempt in range(attempts):
        try:
            expected = _fetch(url, part, what)
            break
        except _Dropped as e:
            if attempt == attempts - 1:
                raise HubError(f"{what}: the connection dropped {attempts} times ({e}); the "
                               f"{os.path.getsize(part) if os.path.exists(part) else 0} bytes so far are kept "
                               f"in {part}: run again to resume") from None
    _check(part, expected, what)
    os.replace(part, path)
    return path


class _Dropped(Exception):
    """The connection ended before the whole file arrived: try again from where it stopped."""


class _KeepHeaders(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, keeping (url, headers) of each redirect response: an LFS file's
    sha256 is in the hub's redirect to the CDN, not in the CDN's answer."""

    def __init__(self):
        self.hops = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.hops.append((req.full_url, headers))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url, part, what):
    """One GET of url into part (appending from its current size). -> (kind, digest, size) expected."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Accept-Encoding": "identity", "User-Agent": "codebook-features/hub.py"}
    if have:
        headers["Range"] = f"bytes={have}-"
    hops = _KeepHeaders()
    try:
        resp = urllib.request.build_opener(hops).open(urllib.request.Request(url, headers=headers),
                                                      timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after `have`: the file is all there; check it
            return _expected(url, hops.hops + [(e.filename or url, e.headers)])
        raise _http_error(e, what) from None
    except urllib.error.URLError as e:
        raise HubUnreachable(f"{what}: cannot reach {urllib.parse.urlsplit(url).netloc} "
                             f"({getattr(e.reason, 'strerror', None) or e.reason})") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:  # e.g. RemoteDisconnected
        raise _Dropped(type(e).__name__) from None
    expected = _expected(url, hops.hops + [(resp.url, resp.headers)])
    resumed = resp.status == 206
    if not resumed:
        have = 0  # a 200 answer to a Range request: the server sends it all, start over
    length = int(resp.headers.get("Content-Length") or 0)
    total = expected[2] or (have + length if length else None)
    name = os.path.basename(part).removesuffix(".incomplete")
    try:
        with resp, open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=name, disable=None) as bar:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    except (OSError, ValueError, http.client.HTTPException) as e:  # IncompleteRead, a reset, a timeout
        raise _Dropped(type(e).__name__) from None
    if total and os.path.getsize(part) < total:
        raise _Dropped(f"{os.path.getsize(part)} of {total} bytes")
    return expected


def _expected(url, hops):
    """-> (kind, digest, size) from the hub's own responses (those on url's host): ('sha256', hex, size)
    from X-Linked-Etag, ('git-sha1', hex, size) from a 40-hex ETag, (None, None, size) otherwise."""
    host = urllib.parse.urlsplit(url).netloc
    ours = [h for u, h in hops if urllib.parse.urlsplit(u).netloc == host]
    size = next((int(h["X-Linked-Size"]) for h in ours if h.get("X-Linked-Size")), None)
    for h in ours:
        linked = (h.get("X-Linked-Etag") or "").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", linked):
            return "sha256", linked, size
    for h in ours:
        etag = h.get("ETag") or ""
        if not etag.startswith("W/") and re.fullmatch(r"[0-9a-f]{40}", etag.strip('"')):
            return "git-sha1", etag.strip('"'), size
        if not etag.startswith("W/") and re.fullmatch(r"[0-9a-f]{64}", etag.strip('"')):
            return "sha256", etag.strip('"'), size
    return None, None, size


def _check(part, expected, what):
    """Raise (and delete part) unless part matches the expected hash and size."""
    kind, digest, size = expected
    n = os.path.getsize(part)
    if size is not None and n != size:
        os.remove(part)
        raise HubError(f"{what}: got {n} bytes where the hub reports {size}: deleted, run again")
    if kind is None:
        return
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % n)
    with open(part, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != digest:
        os.remove(part)
        raise HubError(f"{what}: corrupt download ({kind} {h.hexdigest()[:12]}... where the hub reports "
                       f"{digest[:12]}...): deleted, run again")


def _http_error(e, what):
    """An HTTPError -> a HubError naming what the hub said."""
    code = e.headers.get("X-Error-Code", "") if e.headers else ""
    if code == "RepoNotFound" or (e.code in (401, 403) and not code):
        why = "no such repository (or it is private or gated: no token is sent)"
    elif code == "RevisionNotFound":
        why = "no such revision"
    elif code == "EntryNotFound" or e.code == 404:
        why = "no such file (404)"
    else:
        why = f"HTTP {e.code} {e.reason}"
    err = HubError(f"{what}: {why}")
    err.status = e.code
    return err


# -----------------------------------------------------------------------------
# a model: config.json and its weights


def parse_name(name, revision=None, holding="config.json and weights"):
    """'owner/name[@revision]' or a short GPT-2 name -> (repo, revision); the argument overrides '@'.
    holding: what the local directory the error message offers instead must hold."""
    repo, _, rev = name.partition("@")
    if repo in GPT2:
        repo = f"openai-community/{repo}"
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise HubError(f"{name!r}: expected a hub id owner/name[@revision], one of {', '.join(GPT2)}, or a "
                       f"local directory holding {holding}")
    return repo, revision or rev or "main"


def model_dir(name, revision=None):
    """A local directory holding config.json and model.safetensors or pytorch_model.bin (or the shards
    that one's .index.json lists).

    name: a local directory (returned as it is, once checked), 'owner/name', 'owner/name@revision', or
    gpt2 / gpt2-medium / gpt2-large / gpt2-xl (openai-community/...). From the hub: config.json first,
    then model.safetensors, or pytorch_model.bin where the repository has no .safetensors (a 404), or,
    where it has neither, an .index.json and every shard it lists; then tokenizer.json where the
    repository has one (none is no error). A cached folder is returned without a request. Raises HubError
    with a one-line message: a bad name, an unknown repository or revision (no config.json), no weights
    file, a corrupt download; and HubUnreachable, its message saying what works offline, when there is no
    connection."""
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")) or not has_weights(name):
            raise HubError(f"{name}: a local model directory needs config.json and one of {', '.join(WEIGHTS)} "
                           f"(or its .index.json and shards)")
        return name
    repo, revision = parse_name(name, revision)
    try:
        config = hub_file(repo, "config.json", revision)
        folder = os.path.dirname(config)
        if has_weights(folder):
            return folder
        for w in WEIGHTS:  # one file, else its index and the shards it lists (pythia-6.9b and -12b come so)
            try:
                hub_file(repo, w, revision)
                break
            except HubError as e:
                if e.status != 404:
                    raise
            try:
                index = hub_file(repo, w + ".index.json", revision)
            except HubError as e:
                if e.status != 404:
                    raise
                continue
            for shard in shards(index):
                hub_file(repo, shard, revision)
            break
        else:
            raise HubError(f"{repo}@{revision}: neither {' nor '.join(WEIGHTS)} (nor their .index.json) in "
                           f"the repository")
        try:
            hub_file(repo, TOKENIZER, revision)
        except HubError as e:
            if e.status != 404:
                raise
        return folder
    except HubUnreachable as e:
        raise HubUnreachable(f"{e}; {OFFLINE}") from None


def shards(index):
    """The shard files a weights .index.json lists (its weight_map's values), in order, each once."""
    try:
        with open(index) as f:
            names = json.load(f)["weight_map"].values()
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise HubError(f"{index}: not a weights index ({type(e).__name__})") from None
    bad = [n for n in names if not re.fullmatch(r"[\w.-]+", n)]
    if bad:
        raise HubError(f"{index}: a shard name {bad[0]!r} that is not a file name")
    return list(dict.fromkeys(names))


def has_weights(folder):
    """A weights file of WEIGHTS in folder, or an index of one with all its shards."""
    for w in WEIGHTS:
        index = os.path.join(folder, w + ".index.json")
        if os.path.exists(os.path.join(folder, w)) or (os.path.exists(index) and all(
                os.path.exists(os.path.join(folder, n)) for n in shards(index))):
            return True
    return False


def tokenizer_file(name, revision=None):
    """The path of a model's tokenizer.json: name a local directory holding one, or a hub id as for model_dir
    (fetched into the cache unless it is there; a folder model_dir fetched already has it)."""
    if os.path.isdir(name):
        path = os.path.join(name, TOKENIZER)
        if not os.path.isfile(path):
            raise HubError(f"{name}: a local directory without {TOKENIZER}")
        return path
    repo, revision = parse_name(name, revision, holding=TOKENIZER)
    try:
        return hub_file(repo, TOKENIZER, revision)
    except HubUnreachable as e:
        raise HubUnreachable(f"{e}; offline, pass a local directory holding {TOKENIZER}") from None
