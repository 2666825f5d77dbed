"""Kernel report: speedups against the naive path and achieved rates against measured ceilings."""

import pandas as pd

from lemo.bench.kernel_report import kernel_report


def test_kernel_report_tables_and_figures(tmp_path):
    pd.DataFrame(
        [
            dict(ceiling="copy_d2d", value=4000.0, unit="GB/s", gpu="G", git_commit="abc"),
            dict(ceiling="matmul_bf16", value=800.0, unit="TFLOP/s", gpu="G", git_commit="abc"),
        ]
    ).to_csv(tmp_path / "ceilings.csv", index=False)
    rows = []
    for ctx in (8192, 16384):
        for impl, ms in (("naive", 4.0), ("torch", 3.0), ("triton", 1.0)):
            rows.append(
                dict(
                    kernel="movement",
                    impl=impl,
                    context=ctx,
                    ms=ms * ctx / 8192,
                    peak_extra_mib=10.0,
                    gbps=3000.0 if impl == "triton" else 900.0,
                    status="ok",
                )
            )
    rows.append(
        dict(kernel="movement", impl="naive", context=32768, ms=None, peak_extra_mib=None, gbps=None, status="oom")
    )
    pd.DataFrame(rows).to_csv(tmp_path / "movement.csv", index=False)
    out = tmp_path / "summary.md"
    paths = kernel_report([tmp_path / "ceilings.csv", tmp_path / "movement.csv"], out, tmp_path / "fig")
    text = out.read_text()
    assert "copy_d2d 4000 GB/s" in text
    line = next(s for s in text.splitlines() if s.startswith("| 8192"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:4] == ["4.00", "3.00", "1.00"] and cells[4:6] == ["4.0x", "3.0x"]
    assert cells[-1] == "3000 (75%)"  # the fast path's bandwidth against the measured copy ceiling
    assert "32768" not in text  # an OOM row is not a timing
    assert (tmp_path / "fig" / "movement.png").exists() and len(paths) == 2
