"""An offline long-document corpus: collection, document-disjoint split, BPE tokenizer, token arrays.

Nothing can be downloaded from the hub, so the built-in corpus is made of long texts that Debian and
Python ship: the King James Bible (Debian `bible-kjv`, one document per book), the Python
documentation's reStructuredText sources (Debian `python3.11-doc`) and the Python standard library's
source (the running interpreter's, tests included). A user's own corpus is a directory of text files
or a JSON-lines file with a "text" field. The split is decided per document by a hash of its name,
so it is deterministic and document-disjoint; it is then topped up so the held-out split holds long
documents (perplexity at long context needs them).

On disk (`prepare_corpus(out_dir)`): tokenizer.json, {train,heldout}.npy (uint16/uint32 tokens),
{train,heldout}_starts.npy (document start offsets), heldout_docs.json, stats.json.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "heldout")
DEBIAN_PACKAGES = ("bible-kjv", "bible-kjv-text", "python3.11-doc")


@dataclass
class Document:
    name: str  # unique, stable across machines (source/relative path)
    text: str


# ----------------------------------------------------------------------------------- collection
def _debian_packages(cache: Path) -> Path:
    """Download and unpack the Debian packages (once) into cache/root; needs apt and the network."""
    root = cache / "root"
    if root.exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None:
        raise RuntimeError("building the built-in corpus needs apt-get (Debian) to fetch "
                           f"{', '.join(DEBIAN_PACKAGES)}; or pass a local text corpus (--source DIR)")
    subprocess.run(["apt-get", "download", *DEBIAN_PACKAGES], cwd=cache, check=True, capture_output=True)
    tmp = Path(tempfile.mkdtemp(dir=cache))
    for deb in sorted(cache.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
    tmp.rename(root)
    return root


def _kjv_books(root: Path) -> list[Document]:
    """The Bible, decoded with the package's own reader, one document per book."""
    out = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-d", "bible.data",
                          "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
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


def builtin_documents(cache: Path) -> list[Document]:
    root = _debian_packages(cache)
    docs = _kjv_books(root)
    rst = next((root / "usr/share/doc").glob("python3*/html/_sources"), None)
    if rst is None:
        raise RuntimeError(f"python3.11-doc unpacked under {root} has no html/_sources")
    docs += _files(rst, "*.rst.txt", "pydoc")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs += [d for d in _files(stdlib, "*.py", "pystdlib")
             if "site-packages" not in d.name and "dist-packages" not in d.name]
    return docs


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


def split_documents(docs: list[Document], heldout_fraction: float = 0.05, seed: int = 0,
                    min_long: int = 8, long_chars: int = 100_000) -> dict[str, list[Document]]:
    """Document-disjoint split by name hash; at least `min_long` documents of `long_chars`+ held out."""
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise ValueError("document names must be unique")
    held = {d.name for d in docs if _unit(d.name, seed) < heldout_fraction}
    long_docs = sorted((d for d in docs if len(d.text) >= long_chars), key=lambda d: _unit(d.name, seed))
    missing = min_long - sum(d.name in held for d in long_docs)
    for d in long_docs:
        if missing <= 0:
            break
        if d.name not in held:
            held.add(d.name)
            missing -= 1
    return {"train": [d for d in docs if d.name not in held], "heldout": [d for d in docs if d.name in held]}


# ----------------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[Document], vocab_size: int):
    """Byte-level BPE trained on the given documents (the train split only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
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
    eos = eos_id(tok)
    ids = [e.ids + [eos] for e in tok.encode_batch([d.text for d in docs])]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    flat = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(lengths.sum()))
    return flat, starts


def prepare_corpus(out_dir: Path, source: Path | None = None, cache: Path | None = None, vocab_size: int = 8192,
                   heldout_fraction: float = 0.05, seed: int = 0, min_long: int = 8,
                   tokenizer: Path | None = None) -> dict:
    """Collect, split, tokenize both splits; returns the stats written. The tokenizer is a BPE trained
    on the train split, or `tokenizer` (a checkpoint's tokenizer.json) when fine-tuning a real model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = local_documents(source) if source else builtin_documents(Path(cache or out_dir / "debian"))
    splits = split_documents(docs, heldout_fraction, seed, min_long=min_long)
    if tokenizer is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
    else:
        tok = train_tokenizer(splits["train"], vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    stats = {"source": str(source) if source else "builtin:" + "+".join(DEBIAN_PACKAGES) + "+python-stdlib",
             "tokenizer": str(tokenizer) if tokenizer else f"bpe-{vocab_size} trained on train",
             "vocab_size": tok.get_vocab_size(), "seed": seed, "heldout_fraction": heldout_fraction}
    for split in SPLITS:
        tokens, starts = encode_documents(tok, splits[split])
        np.save(out_dir / f"{split}.npy", tokens)
        np.save(out_dir / f"{split}_starts.npy", starts)
        lengths = np.diff(np.append(starts, len(tokens)))
        stats[split] = {"documents": len(splits[split]), "tokens": int(len(tokens)),
                        "docs_ge_8k": int((lengths >= 8192).sum()), "docs_ge_16k": int((lengths >= 16384).sum()),
                        "longest": int(lengths.max()) if len(lengths) else 0,
                        "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
        by_source: dict[str, int] = {}
        for d in splits[split]:
            by_source[d.name.split("/")[0]] = by_source.get(d.name.split("/")[0], 0) + 1
        stats[split]["documents_by_source"] = by_source
    (out_dir / "heldout_docs.json").write_text(json.dumps([d.name for d in splits["heldout"]], indent=0))
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
    return torch.from_numpy(np.stack([np.asarray(data[o:o + length], dtype=np.int64) for o in offsets]))


def batches(corpus_dir: Path, split: str, length: int, batch_size: int, steps: int, seed: int):
    """The same data order for every method given the same seed: one window batch per step."""
    for step in range(steps):
        yield sample_windows(corpus_dir, split, length, batch_size, seed * 1_000_003 + step)


def long_documents(corpus_dir: Path, split: str, min_tokens: int) -> list[np.ndarray]:
    """Documents of at least `min_tokens` tokens (EOS excluded), in corpus order."""
    return [np.asarray(d[:-1], dtype=np.int64) for d in load_split(corpus_dir, split).documents()
            if len(d) - 1 >= min_tokens]
