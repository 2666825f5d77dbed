"""An offline long-document corpus: collection, document-disjoint split, BPE tokenizer, token arrays.

Nothing can be downloaded from the hub, so the built-in corpus is made of long texts that Debian and
Python ship: the King James Bible (Debian `bible-kjv`, one document per book), the Python
documentation's reStructuredText sources (Debian `python3.11-doc`) and the Python standard library's
source (the running interpreter's, tests included). A user's own corpus is a directory of text files
or a JSON-lines file with a "text" field. The split is decided per document by a hash of its name,
so it is deterministic and document-disjoint; it is then topped up so the held-out split holds long
documents (perplexity at long context needs them).

A richer long-document set is chosen by name with `sources` (an experiment's `corpus: {sources: [...]}`,
see SOURCES): besides the three above, `linux-docs` (the Linux kernel's Documentation/*.rst, from
Debian `linux-source-6.1`, concatenated per directory, translations left out), `linux-src` (its C sources of the core
directories, concatenated per directory) and `gcide` (Debian `dict-gcide`, the Collaborative
International Dictionary of English, cut into large documents at entry boundaries). With a given
tokenizer the long held-out documents are counted in tokens (`long_tokens`), documents can be cut
to at most `max_doc_tokens` tokens (pieces stay in their document's split) and the train split can be
capped (`max_train_tokens`, shared evenly by the sources; held-out untouched).

On disk (`prepare_corpus(out_dir)`): tokenizer.json, {train,heldout}.npy (uint16/uint32 tokens),
{train,heldout}_starts.npy (document start offsets), heldout_docs.json, stats.json.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..bench.progress import progress

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
DEBIAN_PACKAGES = ("bible-kjv", "bible-kjv-text", "python3.11-doc")
LINUX_PACKAGE = "linux-source-6.1"
# the directories of the kernel tree whose C sources `linux-src` reads (drivers/ and arch/ are left out)
LINUX_SRC_DIRS = ("kernel", "mm", "lib", "block", "ipc", "init", "security", "crypto")
MAX_DOC_CHARS = 800_000  # sources cut their documents at paragraph/entry boundaries below this


@dataclass
class Document:
    name: str  # unique, stable across machines (source/relative path)
    text: str


# ----------------------------------------------------------------------------------- collection
def _debian_packages(cache: Path, packages: tuple[str, ...] = DEBIAN_PACKAGES, root_name: str = "root") -> Path:
    """Download and unpack the Debian packages (once) into cache/root_name; needs apt and the network.
    The .deb files are downloaded into `cache` itself (the built-in set, as before) and unpacked from there."""
    root = cache / root_name
    if root.exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    if not all(any(cache.glob(f"{p}_*.deb")) for p in packages):
        if shutil.which("apt-get") is None:
            raise RuntimeError(
                "building this corpus needs apt-get (Debian) to fetch "
                f"{', '.join(packages)}; or pass a local text corpus (--source DIR)"
            )
        subprocess.run(["apt-get", "download", *packages], cwd=cache, check=True, capture_output=True)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    for p in packages:
        for deb in sorted(cache.glob(f"{p}_*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
    tmp.rename(root)
    return root


def _package_root(cache: Path, package: str) -> Path:
    """One package of a named source set, downloaded and unpacked into cache/sources/PACKAGE/root."""
    return _debian_packages(cache / "sources" / package, (package,))


def _kjv_books(root: Path) -> list[Document]:
    """The Bible, decoded with the package's own reader, one document per book."""
    out = subprocess.run(
        [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-d", "bible.data", "Gen1:1-Rev22:21"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    books: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        head = line.rsplit(" ", 1)
        if len(head) == 2 and head[1].isdigit() and not line.startswith(" ") and line.strip():
            current = head[0]  # "Genesis 1": a chapter heading
        if current is not None:
            books.setdefault(current, []).append(line)
    return [Document(f"kjv/{book}", "\n".join(lines).strip() + "\n") for book, lines in books.items()]


def _files(base: Path, pattern: str, prefix: str) -> list[Document]:
    docs = []
    for path in sorted(base.rglob(pattern)):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(f"{prefix}/{path.relative_to(base).as_posix()}", text))
    return docs


def _pydoc(root: Path) -> list[Document]:
    rst = next((root / "usr/share/doc").glob("python3*/html/_sources"), None)
    if rst is None:
        raise RuntimeError(f"python3.11-doc unpacked under {root} has no html/_sources")
    return _files(rst, "*.rst.txt", "pydoc")


def _pystdlib() -> list[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [
        d for d in _files(stdlib, "*.py", "pystdlib") if "site-packages" not in d.name and "dist-packages" not in d.name
    ]


def builtin_documents(cache: Path) -> list[Document]:
    root = _debian_packages(cache)
    return _kjv_books(root) + _pydoc(root) + _pystdlib()


def _chunks(parts: list[str], max_chars: int, sep: str = "\n\n") -> list[str]:
    """Join `parts` (paragraphs, entries, files) into texts of at most about `max_chars` characters,
    cutting only between parts (a single part longer than that is its own text)."""
    out, cur, size = [], [], 0
    for part in parts:
        if cur and size + len(part) > max_chars:
            out.append(sep.join(cur))
            cur, size = [], 0
        cur.append(part)
        size += len(part) + len(sep)
    if cur:
        out.append(sep.join(cur))
    return out


def _per_directory(files: dict[str, str], prefix: str, max_chars: int) -> list[Document]:
    """Files (relative path -> text) concatenated per directory, in path order, cut at file boundaries
    into documents of at most about `max_chars` characters (a longer file is a document of its own), so
    that every file is in one document and the split stays disjoint by file."""
    by_dir: dict[str, list[str]] = {}
    for rel in sorted(files):
        text = files[rel].strip()
        if text:
            by_dir.setdefault(rel.rsplit("/", 1)[0] if "/" in rel else ".", []).append(text)
    docs = []
    for d, texts in sorted(by_dir.items()):
        pieces = _chunks(texts, max_chars)
        for i, text in enumerate(pieces):
            name = f"{prefix}/{d}" + (f"#{i}" if len(pieces) > 1 else "")
            docs.append(Document(name, text + "\n"))
    return docs


def _linux_tree(cache: Path) -> Path:
    """The kernel tree's Documentation/*.rst and the C sources of LINUX_SRC_DIRS, extracted (once)
    from linux-source-6.1's tarball into cache/sources/linux-source-6.1/tree."""
    import tarfile

    root = _package_root(cache, LINUX_PACKAGE)
    tree = root.parent / "tree"
    if tree.exists():
        return tree
    tarball = next((root / "usr/src").glob("linux-source-*.tar.*"), None)
    if tarball is None:
        raise RuntimeError(f"{LINUX_PACKAGE} unpacked under {root} has no usr/src/linux-source-*.tar.*")
    tmp = Path(tempfile.mkdtemp(dir=root.parent))
    with tarfile.open(tarball, "r|*") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3:
                continue
            rel = "/".join(parts[1:])  # drop the tarball's top directory
            wanted = (parts[1] == "Documentation" and rel.endswith(".rst")) or (
                parts[1] in LINUX_SRC_DIRS and rel.endswith((".c", ".h"))
            )
            if wanted:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(member).read())
    tmp.rename(tree)
    return tree


def _read_tree(base: Path, suffixes: tuple[str, ...]) -> dict[str, str]:
    return {
        p.relative_to(base).as_posix(): p.read_text(encoding="utf-8", errors="replace")
        for p in sorted(base.rglob("*"))
        if p.is_file() and p.name.endswith(suffixes)
    }


def _linux_docs(cache: Path, max_chars: int = MAX_DOC_CHARS) -> list[Document]:
    """Kernel documentation (English; Documentation/translations left out), one document per directory."""
    tree = _linux_tree(cache)
    files = {
        rel: t
        for rel, t in _read_tree(tree / "Documentation", (".rst",)).items()
        if not rel.startswith("translations/")
    }
    return _per_directory(files, "linux-docs", max_chars)


def _linux_src(cache: Path, max_chars: int = MAX_DOC_CHARS) -> list[Document]:
    """Kernel C sources (*.c, *.h) of LINUX_SRC_DIRS, one document per directory."""
    tree = _linux_tree(cache)
    files = {}
    for d in LINUX_SRC_DIRS:
        if (tree / d).is_dir():
            files.update({f"{d}/{rel}": t for rel, t in _read_tree(tree / d, (".c", ".h")).items()})
    return _per_directory(files, "linux-src", max_chars)


_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(field: str) -> int:
    value = 0
    for c in field:
        value = value * 64 + _DICTD_B64.index(c)
    return value


def _dictd_entries(index: str, data: bytes) -> list[str]:
    """The entries of a dictd dictionary (index lines "headword<TAB>offset<TAB>length", base64
    numbers) in file order, each once; the 00-database-* header entries left out."""
    header, spans = set(), set()
    for line in index.splitlines():
        fields = line.split("\t")
        if len(fields) != 3:
            continue
        span = (_dictd_number(fields[1]), _dictd_number(fields[2]))
        (header if fields[0].startswith("00-") else spans).add(span)
    return [data[o : o + n].decode("utf-8", errors="replace").strip() for o, n in sorted(spans - header)]


def _gcide(cache: Path, max_chars: int = MAX_DOC_CHARS // 2) -> list[Document]:
    """The dictionary's entries in file order (alphabetical), grouped by the headword's first letter
    and cut at entry boundaries into documents of at most about `max_chars` characters."""
    import gzip

    root = _package_root(cache, "dict-gcide")
    base = root / "usr/share/dictd"
    if not (base / "gcide.dict.dz").exists() or not (base / "gcide.index").exists():
        raise RuntimeError(f"dict-gcide unpacked under {root} has no usr/share/dictd/gcide.{{dict.dz,index}}")
    entries = _dictd_entries(
        (base / "gcide.index").read_text(encoding="utf-8", errors="replace"),
        gzip.decompress((base / "gcide.dict.dz").read_bytes()),
    )
    by_letter: dict[str, list[str]] = {}
    for e in entries:
        if e:
            c = e[:1].upper()
            by_letter.setdefault(c if "A" <= c <= "Z" else "other", []).append(e)
    return [
        Document(f"gcide/{letter}#{i}", chunk + "\n")
        for letter, es in sorted(by_letter.items())
        for i, chunk in enumerate(_chunks(es, max_chars))
    ]


# name -> reader(cache) of the documents of one source; DEFAULT_SOURCES is the built-in corpus
SOURCES = {
    "kjv": lambda cache: _kjv_books(_debian_packages(cache)),
    "pydoc": lambda cache: _pydoc(_debian_packages(cache)),
    "pystdlib": lambda cache: _pystdlib(),
    "linux-docs": _linux_docs,
    "linux-src": _linux_src,
    "gcide": _gcide,
}
DEFAULT_SOURCES = ("kjv", "pydoc", "pystdlib")


def check_sources(sources) -> tuple[str, ...]:
    if isinstance(sources, str) or not sources:
        raise ValueError(f"corpus sources must be a non-empty list of names from {sorted(SOURCES)}, got {sources!r}")
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; known sources: {sorted(SOURCES)}")
    if len(set(sources)) != len(sources):
        raise ValueError(f"corpus sources listed twice: {list(sources)}")
    return tuple(sources)


def source_documents(cache: Path, sources) -> list[Document]:
    """The documents of the named sources (see SOURCES), each named SOURCE/..."""
    return [d for name in check_sources(sources) for d in SOURCES[name](Path(cache))]


def local_documents(source: Path) -> list[Document]:
    """A user's corpus: a directory of text files (*.txt, *.md, *.py, *.rst) or a .jsonl with "text"."""
    source = Path(source)
    if source.is_file() and source.suffix == ".jsonl":
        docs = []
        with source.open() as f:
            for i, line in enumerate(f):
                rec = json.loads(line)
                if "text" not in rec:
                    raise ValueError(f"{source}:{i + 1} has no 'text' field")
                docs.append(Document(str(rec.get("id", i)), rec["text"]))
        return docs
    if source.is_dir():
        docs = [d for ext in ("txt", "md", "py", "rst") for d in _files(source, f"*.{ext}", source.name)]
        if docs:
            return docs
    raise ValueError(f"{source}: expected a directory of .txt/.md/.py/.rst files or a .jsonl file with 'text'")


# ----------------------------------------------------------------------------------- split
def _unit(name: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    docs: list[Document],
    heldout_fraction: float = 0.05,
    seed: int = 0,
    min_long: int = 8,
    long_chars: int = 100_000,
    long_count=None,
    interleave_sources: bool = False,
) -> dict[str, list[Document]]:
    """Document-disjoint split by name hash; topped up so the held-out documents count at least
    `min_long` long ones. By default a document is long with `long_chars`+ characters; `long_count`
    (document -> how many long documents it gives, e.g. its pieces of 32K+ tokens) replaces that. The
    top-up takes long documents in hash order, or with `interleave_sources` one per source in turn
    (source = the name's first component), so the long held-out documents are spread over the sources."""
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise ValueError("document names must be unique")
    count = long_count or (lambda d: int(len(d.text) >= long_chars))
    held = {d.name for d in docs if _unit(d.name, seed) < heldout_fraction}
    long_docs = sorted((d for d in docs if count(d) > 0), key=lambda d: _unit(d.name, seed))
    if interleave_sources:
        queues: dict[str, list[Document]] = {}
        for d in long_docs:
            queues.setdefault(d.name.split("/")[0], []).append(d)
        order = sorted(queues)  # every source's first, then every source's second, ...
        long_docs = [
            q[k]
            for k in range(max((len(q) for q in queues.values()), default=0))
            for q in (queues[o] for o in order)
            if k < len(q)
        ]
    missing = min_long - sum(count(d) for d in long_docs if d.name in held)
    for d in long_docs:
        if missing <= 0:
            break
        if d.name not in held:
            held.add(d.name)
            missing -= count(d)
    return {"train": [d for d in docs if d.name not in held], "heldout": [d for d in docs if d.name in held]}


# ----------------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[Document], vocab_size: int):
    """Byte-level BPE trained on the given documents (the train split only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    return tok


EOS = "<|endoftext|>"
EOS_CANDIDATES = (EOS, "</s>", "<|end_of_text|>", "<eos>")


def eos_id(tok) -> int:
    for name in EOS_CANDIDATES:
        if tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
    raise ValueError(f"the tokenizer has none of the end-of-text tokens {EOS_CANDIDATES}")


def encode_documents(tok, docs: list[Document]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated tokens (each document followed by EOS) and the document start offsets."""
    return _pack(_encode_texts(tok, [d.text for d in docs]), eos_id(tok), _token_dtype(tok))


def _token_dtype(tok):
    return np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32


def _encode_texts(tok, texts: list[str], batch_chars: int = 16_000_000) -> list[np.ndarray]:
    """Each text's token ids (no EOS), encoded in batches of about `batch_chars` characters."""
    out, batch, size = [], [], 0
    bar = progress(total=sum(len(t) for t in texts), desc="encode", unit="char", unit_scale=True, leave=False)

    def flush():
        out.extend(np.asarray(e.ids, dtype=np.int64) for e in tok.encode_batch(batch))
        bar.update(sum(len(t) for t in batch))
        batch.clear()

    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= batch_chars:
            flush()
            size = 0
    if batch:
        flush()
    bar.close()
    return out


def _pack(ids: list[np.ndarray], eos: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    for s, x in zip(starts, ids):
        flat[s : s + len(x)] = x
        flat[s + len(x)] = eos
    return flat, starts


def _pieces(n: int, max_tokens: int | None) -> list[int]:
    """Lengths of the pieces a document of n tokens is cut into: as few as keep each at most
    `max_tokens`, of (nearly) equal length."""
    if not max_tokens or n <= max_tokens:
        return [n]
    k = -(-n // max_tokens)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _cut(names: list[str], ids: list[np.ndarray], max_tokens: int | None):
    out_names, out_ids = [], []
    for name, x in zip(names, ids):
        lens = _pieces(len(x), max_tokens)
        if len(lens) == 1:
            out_names.append(name)
            out_ids.append(x)
            continue
        offsets = np.concatenate([[0], np.cumsum(lens)])
        for k in range(len(lens)):
            out_names.append(f"{name}@{k}")
            out_ids.append(x[offsets[k] : offsets[k + 1]])
    return out_names, out_ids


def _source(name: str) -> str:
    return name.split("/")[0]


def _cap_train(names: list[str], ids: list[np.ndarray], max_tokens: int, seed: int):
    """At most `max_tokens` train tokens (EOS included), shared evenly by the sources: a source with
    less than its share keeps everything and leaves the rest to the others. Within a source, documents
    are taken in hash order; the last one taken is cut short. Corpus order is kept."""
    totals: dict[str, int] = {}
    for n, x in zip(names, ids):
        totals[_source(n)] = totals.get(_source(n), 0) + len(x) + 1
    budget, left, share = max_tokens, len(totals), {}
    for src in sorted(totals, key=lambda s: (totals[s], s)):
        share[src] = min(totals[src], budget // left)
        budget -= share[src]
        left -= 1
    keep: dict[int, int] = {}
    for src in totals:
        room = share[src]
        for i in sorted((i for i, n in enumerate(names) if _source(n) == src), key=lambda i: _unit(names[i], seed)):
            if room < 2:  # a document needs one token and its EOS
                break
            keep[i] = min(len(ids[i]), room - 1)
            room -= keep[i] + 1
    order = sorted(keep)
    return [names[i] for i in order], [ids[i][: keep[i]] for i in order]


def prepare_corpus(
    out_dir: Path,
    source: Path | None = None,
    cache: Path | None = None,
    vocab_size: int = 8192,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    min_long: int = 8,
    tokenizer: Path | None = None,
    sources: list[str] | None = None,
    long_tokens: int | None = None,
    max_doc_tokens: int | None = None,
    max_train_tokens: int | None = None,
) -> dict:
    """Collect, split, tokenize both splits; returns the stats written. The tokenizer is a BPE trained
    on the train split, or `tokenizer` (a checkpoint's tokenizer.json) when fine-tuning a real model.

    `sources` names the document sources (SOURCES; default the built-in three). With `long_tokens`
    (needs `tokenizer`) the held-out split is topped up to `min_long` documents of at least that many
    tokens (EOS excluded), counted after cutting, spread over the sources. `max_doc_tokens` cuts longer
    documents into nearly equal pieces (in their document's split); `max_train_tokens` caps the train
    split (see _cap_train); the held-out split is never capped."""
    out_dir = Path(out_dir)
    if source and sources:
        raise ValueError("pass either a local corpus (--source) or named corpus sources, not both")
    if long_tokens and tokenizer is None:
        raise ValueError("long_tokens counts tokens of a given tokenizer: pass --tokenizer")
    if max_doc_tokens is not None and long_tokens and max_doc_tokens < 2 * long_tokens:
        raise ValueError(
            f"max_doc_tokens={max_doc_tokens} must be at least 2 x long_tokens={long_tokens} so "
            "the pieces of a cut document stay long"
        )
    if sources is not None:
        sources = check_sources(sources)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cache or out_dir / "debian")
    if source:
        docs = local_documents(source)
    elif sources is not None:
        docs = source_documents(cache, sources)
    else:
        docs = builtin_documents(cache)
    log.info("%d documents, %d characters", len(docs), sum(len(d.text) for d in docs))
    encoded: dict[str, np.ndarray] = {}
    if tokenizer is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
        encoded = dict(zip((d.name for d in docs), _encode_texts(tok, [d.text for d in docs])))
    long_count = None
    if long_tokens:

        def long_count(d):
            return sum(n >= long_tokens for n in _pieces(len(encoded[d.name]), max_doc_tokens))

    splits = split_documents(
        docs, heldout_fraction, seed, min_long=min_long, long_count=long_count, interleave_sources=sources is not None
    )
    if tokenizer is None:
        log.info("training a %d-token BPE on %d train documents", vocab_size, len(splits["train"]))
        tok = train_tokenizer(splits["train"], vocab_size)
        for split in SPLITS:
            encoded.update(zip((d.name for d in splits[split]), _encode_texts(tok, [d.text for d in splits[split]])))
    tok.save(str(out_dir / "tokenizer.json"))
    if source:
        described = str(source)
    elif sources is not None:
        described = "sources:" + "+".join(sources)
    else:
        described = "builtin:" + "+".join(DEBIAN_PACKAGES) + "+python-stdlib"
    stats = {
        "source": described,
        "tokenizer": str(tokenizer) if tokenizer else f"bpe-{vocab_size} trained on train",
        "vocab_size": tok.get_vocab_size(),
        "seed": seed,
        "heldout_fraction": heldout_fraction,
    }
    for key, value in (
        ("long_tokens", long_tokens),
        ("min_long", min_long if long_tokens else None),
        ("max_doc_tokens", max_doc_tokens),
        ("max_train_tokens", max_train_tokens),
    ):
        if value is not None:
            stats[key] = value
    eos = eos_id(tok)
    heldout_names: list[str] = []
    for split in SPLITS:
        names, ids = _cut([d.name for d in splits[split]], [encoded[d.name] for d in splits[split]], max_doc_tokens)
        before = sum(len(x) + 1 for x in ids)
        before_by_source: dict[str, int] = {}
        for n, x in zip(names, ids):
            before_by_source[_source(n)] = before_by_source.get(_source(n), 0) + len(x) + 1
        if split == "train" and max_train_tokens is not None:
            names, ids = _cap_train(names, ids, max_train_tokens, seed)
        if split == "heldout":
            heldout_names = names
        tokens, starts = _pack(ids, eos, _token_dtype(tok))
        np.save(out_dir / f"{split}.npy", tokens)
        np.save(out_dir / f"{split}_starts.npy", starts)
        lengths = np.diff(np.append(starts, len(tokens)))
        stats[split] = {
            "documents": len(ids),
            "tokens": int(len(tokens)),
            "docs_ge_8k": int((lengths >= 8192).sum()),
            "docs_ge_16k": int((lengths >= 16384).sum()),
            "docs_ge_32k": int((lengths - 1 >= 32768).sum()),
            "longest": int(lengths.max()) if len(lengths) else 0,
            "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
        }
        if long_tokens:
            stats[split][f"docs_ge_{long_tokens}_tokens"] = int(sum(len(x) >= long_tokens for x in ids))
        if before != len(tokens):
            stats[split]["tokens_before_cap"] = int(before)
        by_source: dict[str, int] = {}
        for n in names:
            by_source[_source(n)] = by_source.get(_source(n), 0) + 1
        stats[split]["documents_by_source"] = by_source
        if sources is not None or tokenizer is not None:
            per: dict[str, dict] = {}
            for n, x in zip(names, ids):
                r = per.setdefault(_source(n), {"documents": 0, "tokens": 0, "docs_ge_32k": 0})
                r["documents"] += 1
                r["tokens"] += len(x) + 1
                r["docs_ge_32k"] += int(len(x) >= 32768)
            if before != len(tokens):
                for src, r in per.items():
                    r["tokens_before_cap"] = before_by_source[src]
            stats[split]["by_source"] = per
    (out_dir / "heldout_docs.json").write_text(json.dumps(heldout_names, indent=0))
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    _load_split.cache_clear()  # splits opened before this rewrite are stale
    return stats


# ----------------------------------------------------------------------------------- reading
@dataclass
class TokenSplit:
    tokens: np.ndarray
    starts: np.ndarray

    def documents(self) -> list[np.ndarray]:
        ends = np.append(self.starts[1:], len(self.tokens))
        return [self.tokens[s:e] for s, e in zip(self.starts, ends)]


def load_split(corpus_dir: Path, split: str) -> TokenSplit:
    """A split's tokens (memory-mapped) and document starts, opened once per process: training reads
    a batch of windows from it every step."""
    return _load_split(str(Path(corpus_dir).resolve()), split)


@functools.lru_cache(maxsize=8)
def _load_split(corpus_dir: str, split: str) -> TokenSplit:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    corpus_dir = Path(corpus_dir)
    path = corpus_dir / f"{split}.npy"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `lemo corpus --out {corpus_dir}` first")
    return TokenSplit(np.load(path, mmap_mode="r"), np.load(corpus_dir / f"{split}_starts.npy"))


def sample_windows(corpus_dir: Path, split: str, length: int, count: int, seed: int) -> torch.LongTensor:
    """`count` windows of `length` tokens at seeded random offsets of the concatenated split (documents
    are separated by EOS, as in pretraining on packed text)."""
    data = load_split(corpus_dir, split).tokens
    if len(data) <= length:
        raise ValueError(f"the {split} split has {len(data)} tokens, fewer than one window of {length}")
    gen = np.random.default_rng(seed)
    offsets = gen.integers(0, len(data) - length, size=count)
    return torch.from_numpy(np.stack([np.asarray(data[o : o + length], dtype=np.int64) for o in offsets]))


def batches(corpus_dir: Path, split: str, length: int, batch_size: int, steps: int, seed: int):
    """The same data order for every method given the same seed: one window batch per step."""
    for step in range(steps):
        yield sample_windows(corpus_dir, split, length, batch_size, seed * 1_000_003 + step)


def long_documents(corpus_dir: Path, split: str, min_tokens: int) -> list[np.ndarray]:
    """Documents of at least `min_tokens` tokens (EOS excluded), in corpus order."""
    return [
        np.asarray(d[:-1], dtype=np.int64)
        for d in load_split(corpus_dir, split).documents()
        if len(d) - 1 >= min_tokens
    ]
