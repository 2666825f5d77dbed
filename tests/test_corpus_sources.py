"""The named corpus sources (linux-docs, linux-src, gcide) read from small synthetic package trees (no
apt, no network), and the long held-out guarantee, document cut and train cap of prepare_corpus."""

import gzip
import io
import json
import tarfile

import numpy as np
import pytest

from lemo.accuracy import corpus
from lemo.accuracy.cli import corpus_options
from lemo.accuracy.corpus import Document, check_sources, prepare_corpus, split_documents, train_tokenizer


@pytest.fixture
def no_apt(monkeypatch):
    """Any download attempt fails the test: the package trees must be found in the cache."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to run {args[0] if args else kwargs}")

    monkeypatch.setattr(corpus.subprocess, "run", refuse)
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)


def _root(cache, package):
    root = cache / "sources" / package / "root"
    root.mkdir(parents=True)
    return root


def _fake_linux(cache):
    files = {
        "Documentation/admin-guide/intro.rst": "Intro\n=====\n\n" + "The kernel boots. " * 40,
        "Documentation/admin-guide/params.rst": "Params\n======\n\n" + "A parameter line. " * 40,
        "Documentation/mm/zones.rst": "Zones\n\nMemory is split into zones.\n",
        "Documentation/translations/zh_CN/index.rst": "translated text\n",
        "Documentation/admin-guide/notes.txt": "not rst\n",
        "kernel/fork.c": "int fork(void)\n{\n\treturn 0;\n}\n",
        "kernel/sched/core.c": "void schedule(void) {}\n",
        "drivers/net/foo.c": "int foo;\n",
        "README": "Linux kernel\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"linux-source-6.1/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = _root(cache, "linux-source-6.1") / "usr/src"
    src.mkdir(parents=True)
    (src / "linux-source-6.1.tar.xz").write_bytes(buf.getvalue())
    return files


def test_linux_docs_and_src_per_directory(tmp_path, no_apt):
    files = _fake_linux(tmp_path)
    docs = {d.name: d.text for d in corpus._linux_docs(tmp_path)}
    assert set(docs) == {"linux-docs/admin-guide", "linux-docs/mm"}  # no translations, no .txt
    assert docs["linux-docs/admin-guide"].index("Intro") < docs["linux-docs/admin-guide"].index("Params")
    assert "Memory is split into zones." in docs["linux-docs/mm"]
    src = {d.name: d.text for d in corpus._linux_src(tmp_path)}
    assert set(src) == {"linux-src/kernel", "linux-src/kernel/sched"}  # drivers/ left out
    assert files["kernel/fork.c"].strip() in src["linux-src/kernel"]
    # a directory longer than max_chars is cut at file boundaries (each file in one document), nothing lost
    cut = [d for d in corpus._linux_docs(tmp_path, max_chars=400) if d.name.startswith("linux-docs/admin-guide")]
    assert [d.name for d in cut] == ["linux-docs/admin-guide#0", "linux-docs/admin-guide#1"]
    assert cut[0].text.startswith("Intro") and cut[1].text.startswith("Params")
    joined = "".join(d.text for d in cut)
    assert joined.count("The kernel boots.") == 40 and joined.count("A parameter line.") == 40


def _b64(n):
    digits = ""
    while True:
        digits = corpus._DICTD_B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def test_gcide_entries_grouped_by_letter_without_header(tmp_path, no_apt):
    entries = [
        "00-database-url\n   ftp://example\n",
        "00-database-info\n   This file was converted\n\nGCIDE is free software; licence text\n",
    ]
    entries += [f'Apple{i} \\Ap"ple\\, n.\n   A fruit number {i}.\n   [1913 Webster]\n' for i in range(30)]
    entries += [
        "Bear \\Bear\\, v. t.\n   To carry.\n\n         He bore it.   --Shak.\n   [1913 Webster]\n",
        'zygote \\zy"gote\\, n.\n   A cell.\n',
        "3-D \n   three-dimensional.\n",
    ]
    data, index, offset = b"", [], 0
    for e in entries:
        raw = e.encode()
        word = e.split("\n", 1)[0].split(" \\")[0].strip()
        index.append(f"{word}\t{_b64(offset)}\t{_b64(len(raw))}")
        data, offset = data + raw, offset + len(raw)
    index.append(f"00-gcide-info\t{_b64(len(entries[0].encode()))}\t{_b64(len(entries[1].encode()))}")  # an alias
    index.append(f"Ursine\t{_b64(0)}\t{_b64(0)}")  # an empty span
    base = _root(tmp_path, "dict-gcide") / "usr/share/dictd"
    base.mkdir(parents=True)
    (base / "gcide.dict.dz").write_bytes(gzip.compress(data))
    (base / "gcide.index").write_text("\n".join(sorted(index)) + "\n")
    docs = corpus._gcide(tmp_path, max_chars=500)
    text = "".join(d.text for d in docs)
    assert "licence" not in text and "ftp://example" not in text
    assert all(text.count(f"A fruit number {i}.") == 1 for i in range(30))
    names = [d.name for d in docs]
    assert names[0] == "gcide/A#0" and len([n for n in names if n.startswith("gcide/A#")]) >= 3
    assert {"gcide/B#0", "gcide/Z#0", "gcide/other#0"} <= set(names)
    assert "He bore it." in next(d.text for d in docs if d.name == "gcide/B#0")


def test_unknown_sources_are_rejected_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus source.*'bogus'.*known sources"):
        check_sources(["kjv", "bogus"])
    with pytest.raises(ValueError, match="non-empty list"):
        check_sources("kjv")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("corpus: {sources: [kjv, linux-doc]}\n")
    with pytest.raises(ValueError, match="c.yaml: unknown corpus source"):
        corpus_options(cfg)
    cfg.write_text("corpus: {sources: [kjv], max_train_token: 5}\n")
    with pytest.raises(ValueError, match="unknown corpus option.*max_train_token"):
        corpus_options(cfg)
    cfg.write_text("corpus: {sources: [kjv, gcide, linux-docs], max_train_tokens: 5}\n")
    assert corpus_options(cfg) == {"sources": ["kjv", "gcide", "linux-docs"], "max_train_tokens": 5}
    with pytest.raises(ValueError, match="either a local corpus"):
        prepare_corpus(tmp_path / "out", source=tmp_path, sources=["kjv"])
    with pytest.raises(ValueError, match="pass --tokenizer"):
        prepare_corpus(tmp_path / "out", sources=["kjv"], long_tokens=100)


def test_interleaved_top_up_spreads_long_documents_over_sources():
    docs = [Document(f"{src}/d{i}", "x" * (20_000 if i % 2 else 10)) for src in ("a", "b", "c") for i in range(40)]
    held = split_documents(docs, 0.0, seed=1, min_long=6, long_chars=10_000, interleave_sources=True)["heldout"]
    assert len(held) == 6 and {d.name.split("/")[0] for d in held} == {"a", "b", "c"}
    assert all(sum(d.name.startswith(s) for d in held) == 2 for s in "abc")


def _synthetic_sources(monkeypatch):
    words = "the of and to in that is was he for it with as his on be at by".split()

    def prose(cache):
        rng = np.random.default_rng(0)
        return [
            Document(f"prose/book{i}", " ".join(rng.choice(words, 40 + 900 * (i % 3 == 0))) + ".\n") for i in range(24)
        ]

    def dictionary(cache):
        return [
            Document(f"dict/{c}#0", "".join(f"{c}{k} \\{c}{k}\\, n.\n   A word.\n\n" for k in range(150)))
            for c in "ABCDEFGH"
        ]

    monkeypatch.setitem(corpus.SOURCES, "prose", prose)
    monkeypatch.setitem(corpus.SOURCES, "dict", dictionary)
    return prose(None) + dictionary(None)


def test_long_heldout_guarantee_cut_and_train_cap(tmp_path, monkeypatch, no_apt):
    docs = _synthetic_sources(monkeypatch)
    tok = train_tokenizer(docs, 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    long_tokens, min_long, max_doc = 300, 10, 700
    opts = dict(
        cache=tmp_path / "cache",
        tokenizer=tmp_path / "tokenizer.json",
        sources=["prose", "dict"],
        heldout_fraction=0.05,
        seed=0,
        min_long=min_long,
        long_tokens=long_tokens,
        max_doc_tokens=max_doc,
    )
    full = prepare_corpus(tmp_path / "full", **opts)
    capped = prepare_corpus(tmp_path / "capped", max_train_tokens=2000, **opts)
    for out, stats in ((tmp_path / "full", full), (tmp_path / "capped", capped)):
        held = corpus.load_split(out, "heldout").documents()
        lengths = np.array([len(d) - 1 for d in held])  # EOS excluded
        assert (lengths >= long_tokens).sum() >= min_long
        assert stats["heldout"][f"docs_ge_{long_tokens}_tokens"] == (lengths >= long_tokens).sum()
        assert lengths.max() <= max_doc  # cut into pieces no longer than max_doc_tokens
        assert set(stats["heldout"]["by_source"]) == {"prose", "dict"}  # long ones from both sources
        assert all(d[-1] == corpus.eos_id(tok) for d in held)
        # document-disjoint: no document (or piece of one) is on both sides
        heldout_docs = {n.split("@")[0] for n in json.loads((out / "heldout_docs.json").read_text())}
        assert len(corpus.long_documents(out, "heldout", long_tokens)) == (lengths >= long_tokens).sum()
        train_docs = {d.name for d in docs} - heldout_docs
        assert train_docs and heldout_docs and not train_docs & heldout_docs
    # the cap touches only the train split, which is shared by both sources
    assert capped["heldout"]["sha256"] == full["heldout"]["sha256"]
    assert capped["train"]["tokens"] <= 2000 < full["train"]["tokens"] == capped["train"]["tokens_before_cap"]
    assert capped["train"]["tokens"] > 1900
    per = capped["train"]["by_source"]
    assert set(per) == {"prose", "dict"} and abs(per["prose"]["tokens"] - per["dict"]["tokens"]) < 700
    assert sum(r["tokens_before_cap"] for r in per.values()) == full["train"]["tokens"]
    with pytest.raises(ValueError, match="at least 2 x long_tokens"):
        prepare_corpus(tmp_path / "bad", **{**opts, "max_doc_tokens": 500})


def test_train_cap_gives_small_sources_everything():
    names = [f"small/d{i}" for i in range(3)] + [f"big/d{i}" for i in range(10)]
    ids = [np.arange(10)] * 3 + [np.arange(100)] * 10
    kept_names, kept = corpus._cap_train(names, ids, 300, seed=0)
    total = {s: sum(len(x) + 1 for n, x in zip(kept_names, kept) if n.startswith(s)) for s in ("small", "big")}
    assert total["small"] == 33 and total["big"] == 300 - 33
    assert kept_names == sorted(kept_names, key=names.index)  # corpus order kept
