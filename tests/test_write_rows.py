"""lemo.bench.results.write_rows (pandas) writes what csv.DictWriter wrote: the loss logs, kernel CSVs."""

import csv
import io
import random

from lemo.bench.results import write_rows


def test_write_rows_matches_csv_dictwriter(tmp_path):
    rng = random.Random(0)
    rows = [{"step": 1, "tokens": 8192, "lr": 1e-4, "train_loss": 4.231824874877930, "heldout_loss": None, "ok": True}]
    rows += [
        {"step": i, "loss": rng.random() * 10 ** rng.randint(-8, 8), "heldout_loss": None if i % 3 else rng.random()}
        for i in range(2, 50)
    ]
    rows.append({"step": 50, "status": "oom", "reason": "a, b"})  # fewer columns, a quoted field
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    write_rows(tmp_path / "rows.csv", rows)
    assert (tmp_path / "rows.csv").read_bytes() == buf.getvalue().encode()
