"""lemo.accuracy.pretrain.warmup_cosine against transformers' get_cosine_with_min_lr_schedule_with_warmup, for
the schedules of workflows/accuracy/*.yaml (pretraining floors at 0.1 of the peak, fine-tuning at 0): they agree
after the warm-up, and differ by one step during it (transformers starts at lr 0), so the hand-written one stays."""

from pathlib import Path

import pytest
import torch
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from lemo.accuracy.experiment import load_experiment
from lemo.accuracy.pretrain import lr_at, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]


def _schedules():
    for path in sorted((ROOT / "workflows" / "accuracy").glob("*.yaml")):
        exp = load_experiment(path)
        if exp.model is None:  # pretrained here
            yield pytest.param("pretrain", exp.pretrain, 0.1, id=f"{path.stem}-pretrain")
        yield pytest.param("finetune", exp.finetune, 0.0, id=f"{path.stem}-finetune")


def _transformers_lrs(lr, warmup, steps, floor):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, steps, min_lr_rate=floor)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("stage, cfg, floor", list(_schedules()))
def test_warmup_cosine_vs_transformers(stage, cfg, floor):
    ours = [warmup_cosine(s, cfg.lr, cfg.warmup, cfg.steps, floor=floor) for s in range(cfg.steps)]
    if stage == "pretrain":
        assert ours == [lr_at(s, cfg) for s in range(cfg.steps)]
    theirs = _transformers_lrs(cfg.lr, cfg.warmup, cfg.steps, floor)
    after = range(cfg.warmup, cfg.steps)
    assert all(abs(ours[s] - theirs[s]) <= 1e-12 * abs(ours[s]) for s in after)
    # the warm-up: ours reaches lr/warmup at step 0, transformers lr 0; not the same schedule
    assert theirs[0] == 0.0 and ours[0] == pytest.approx(cfg.lr / cfg.warmup)
    assert all(theirs[s] == pytest.approx(ours[s - 1]) for s in range(1, cfg.warmup))
