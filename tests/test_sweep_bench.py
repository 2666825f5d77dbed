import json

import pandas as pd
import pytest
import torch
import yaml

import lemo.bench.bench as bench
from lemo.bench.results import aggregate, ratios
from lemo.bench.sweep import expand, find_job, jobs, validate_sweep

SWEEP = {
    "name": "t",
    "device": "cpu",
    "dtype": "float32",
    "warmup": 1,
    "steps": 2,
    "lora": {"r": 8, "alpha": 16, "targets": "qkvo", "adapter_dtype": "model"},
    "methods": {
        "lora": {"method": "lora"},
        "lemo-token": {"method": "lemo", "lemo": {"mlp_mode": "token", "block_size": 64}},
    },
    "groups": [
        {
            "models": ["llama2-tiny"],
            "attention": ["sdpa-flash", "sdpa-cudnn"],
            "gradient_checkpointing": False,
            "contexts": [512, 256],
            "methods": ["lora", "lemo-token"],
        }
    ],
}


def test_jobs_group_by_model_backend_checkpointing_in_context_order():
    js = jobs(SWEEP)
    assert [j.id for j in js] == ["llama2-tiny__sdpa-flash__gc0", "llama2-tiny__sdpa-cudnn__gc0"]
    assert [(p.context, p.method) for p in js[0].points] == [
        (256, "lora"),
        (256, "lemo-token"),
        (512, "lora"),
        (512, "lemo-token"),
    ]
    assert js[0].points[0].options["lora"]["adapter_dtype"] == "model"


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: s["groups"][0].update(models=["gpt-9"]), "unknown model 'gpt-9'"),
        (lambda s: s["groups"][0].update(attention=["flash3"]), "unknown attention backend"),
        (lambda s: s["groups"][0].update(methods=["nope"]), "not defined under methods"),
        (lambda s: s["methods"].update(x={"method": "magic"}), "unknown method 'magic'"),
        (lambda s: s["methods"]["lora"].update(offload=True), r"unknown keys \['offload'\]"),
        (lambda s: s["methods"]["lora"].update(offload_activations="yes"), "offload_activations must be true or false"),
        (lambda s: s.update(context=[1024]), r"unknown keys \['context'\]"),
        (lambda s: s["groups"][0].update(step=2), r"group 0: unknown keys \['step'\]"),
        (lambda s: s["groups"][0].pop("contexts"), r"group 0: missing keys \['contexts'\]"),
        (lambda s: s["methods"]["lemo-token"]["lemo"].update(mlp_mode="tokn"), "'lemo-token': mlp_mode must be one of"),
        (lambda s: s["methods"]["lemo-token"]["lemo"].update(keep=0.3), r"lemo options: unknown fields \['keep'\]"),
        (lambda s: s["methods"]["lora"].update(lora={"target": "qv"}), r"lora options: unknown fields \['target'\]"),
        (lambda s: s["lora"].update(targets="qx"), "targets must be letters of 'qkvo'"),
        (lambda s: s["lora"].update(r="8"), "r must be an integer"),
        (lambda s: s["methods"]["lora"].update(lemo={}), r"method 'lora' takes no \['lemo'\] options"),
        (lambda s: s.update(steps=0), "steps must be an integer >= 1, got 0"),
        (lambda s: s["groups"][0].update(steps=0), "group 0: steps must be an integer >= 1"),
        (lambda s: s["groups"][0].update(contexts=["1024"]), "context '1024' must be an integer >= 2"),
        (lambda s: s["groups"][0].update(models="llama2-tiny"), "models must be a non-empty list"),
        (
            lambda s: s["groups"][0].update(gradient_checkpointing="false"),
            "gradient_checkpointing must be true or false",
        ),
        (lambda s: s.update(device="gpu"), "device must be 'cuda' or 'cpu'"),
        (lambda s: s.update(groups=[]), "`groups` must be a non-empty list"),
    ],
)
def test_bad_sweeps_fail_naming_the_problem(change, words):
    sweep = yaml.safe_load(yaml.safe_dump(SWEEP))
    change(sweep)
    with pytest.raises(ValueError, match=words):
        validate_sweep(sweep)


def test_duplicate_points_are_an_error():
    sweep = yaml.safe_load(yaml.safe_dump(SWEEP))
    sweep["groups"].append(sweep["groups"][0])
    with pytest.raises(ValueError, match="appears twice"):
        expand(sweep)


def test_job_writes_records_skips_unavailable_backends_and_records_oom(tmp_path, monkeypatch):
    real = bench.time_steps

    def oom_at_512(model, batch, optimizer, warmup, steps, **kw):
        if batch["input_ids"].shape[1] == 512:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, batch, optimizer, warmup, steps, **kw)

    monkeypatch.setattr(bench, "time_steps", oom_at_512)
    sweep = yaml.safe_load(yaml.safe_dump(SWEEP))
    sweep["groups"][0]["contexts"] = [256, 512, 1024]
    for job_id in ["llama2-tiny__sdpa-flash__gc0", "llama2-tiny__sdpa-cudnn__gc0"]:
        bench.JobRunner(find_job(sweep, job_id), tmp_path / job_id, log=lambda *_: None).run()
    recs = {p.name: json.loads(p.read_text()) for p in tmp_path.rglob("*.json")}
    assert len(recs) == 12 and not list(tmp_path.rglob(".tmp-*"))
    ok = recs["sdpa-flash__lora__256__b1.json"]
    assert ok["status"] == "ok" and ok["metrics"]["saved_activation_gib"] > 0
    assert {"gpu", "torch", "transformers", "peft", "git_commit", "timestamp"} <= set(ok["provenance"])
    assert ok["point"]["options"]["lora"]["r"] == 8 and ok["attention_label"]
    assert recs["sdpa-flash__lemo-token__512__b1.json"]["status"] == "oom"
    assert recs["sdpa-flash__lemo-token__1024__b1.json"]["reason"] == "out of memory at 512 tokens"
    cudnn = recs["sdpa-cudnn__lora__256__b1.json"]
    assert cudnn["status"] == "skipped" and "cuDNN" in cudnn["reason"]
    frame = aggregate(list(tmp_path.rglob("*.json")), tmp_path / "sweep.csv")
    assert set(frame.status) == {"ok", "oom", "skipped"}
    r = ratios(frame, "saved_activation_gib")
    assert list(r.method) == ["lemo-token"] and r.ratio.iloc[0] > 1.2  # LeMo keeps fewer activations


def test_opt_contexts_beyond_positions_are_skipped_with_reason(tmp_path):
    sweep = yaml.safe_load(yaml.safe_dump(SWEEP))
    sweep["groups"] = [
        {
            "models": ["opt-tiny"],
            "attention": ["sdpa-flash"],
            "gradient_checkpointing": False,
            "contexts": [4096],
            "methods": ["lora"],
        }
    ]
    bench.JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None).run()
    (rec,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert rec["status"] == "skipped" and "learned positions for 2048" in rec["reason"]


def test_methods_that_train_base_weights_leave_the_shared_model_unchanged(tmp_path, monkeypatch):
    """LongLoRA trains embeddings and norms; later methods of the job must measure the same base model."""
    seen = {}
    real_measure = bench.JobRunner.measure

    def spy(self, base, spec, p):
        before = {n: t.detach().clone() for n, t in base.named_parameters()}
        rec = real_measure(self, base, spec, p)
        seen[p.method] = all(torch.equal(before[n], t) for n, t in base.named_parameters())
        return rec

    monkeypatch.setattr(bench.JobRunner, "measure", spy)
    sweep = yaml.safe_load(yaml.safe_dump(SWEEP))
    sweep["methods"]["longlora"] = {"method": "longlora"}
    sweep["groups"][0].update(attention=["sdpa-math"], contexts=[256], methods=["longlora", "lora"])
    bench.JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None).run()
    recs = {p.name: json.loads(p.read_text()) for p in tmp_path.rglob("*.json")}
    assert recs["sdpa-math__longlora__256__b1.json"]["status"] == "ok"
    assert (
        recs["sdpa-math__longlora__256__b1.json"]["metrics"]["trainable_params"]
        > recs["sdpa-math__lora__256__b1.json"]["metrics"]["trainable_params"]
    )
    assert seen == {"longlora": True, "lora": True}


def test_a_failed_point_skips_its_longer_contexts_naming_the_failure(tmp_path, monkeypatch):
    def broken(model, batch, optimizer, warmup, steps, **kw):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench, "time_steps", broken)
    sweep = yaml.safe_load(yaml.safe_dump(SWEEP))
    sweep["groups"][0].update(attention=["sdpa-math"], contexts=[256, 512], methods=["lora"])
    bench.JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None).run()
    recs = {p.name: json.loads(p.read_text()) for p in tmp_path.rglob("*.json")}
    assert recs["sdpa-math__lora__256__b1.json"]["status"] == "error"
    assert recs["sdpa-math__lora__512__b1.json"]["reason"] == "failed at 256 tokens"


def test_a_refused_lemo_setup_leaves_no_lora_in_the_model(tmp_path):
    from lemo.bench.methods import get_method
    from lemo.models.registry import build_model

    base = build_model("llama2-tiny", dtype=torch.float32)
    names = {n for n, _ in base.named_modules()}
    with pytest.raises(ValueError, match="train-predictors"):
        get_method("lemo").setup(base, {"lemo": {"scorer": "predictor", "predictor_path": str(tmp_path)}})
    assert {n for n, _ in base.named_modules()} == names  # no lora_A / lora_B left behind


def test_offloaded_method_runs_and_says_so(tmp_path, monkeypatch):
    seen = []
    real = bench.time_steps

    def spy(model, batch, optimizer, warmup, steps, offload=False):
        seen.append(offload)
        return real(model, batch, optimizer, warmup, steps, offload=offload)

    monkeypatch.setattr(bench, "time_steps", spy)
    sweep = yaml.safe_load(yaml.safe_dump(SWEEP))
    sweep["methods"]["lemo-offload"] = {**sweep["methods"]["lemo-token"], "offload_activations": True}
    sweep["groups"][0].update(
        attention=["sdpa-math"], contexts=[256], gradient_checkpointing=True, methods=["lemo-token", "lemo-offload"]
    )
    bench.JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None).run()
    recs = {p.name: json.loads(p.read_text()) for p in tmp_path.rglob("*.json")}
    off = recs["sdpa-math__lemo-offload__256__b1.json"]
    assert seen == [False, True] and off["status"] == "ok"
    assert "offloaded to host" in off["method_description"]
    assert "offloaded" not in recs["sdpa-math__lemo-token__256__b1.json"]["method_description"]


def test_sweep_files_fail_at_load_naming_the_file(tmp_path):
    from lemo.bench.sweep import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match=f"{path}: not valid YAML"):
        load_sweep(path)
    bad = yaml.safe_load(yaml.safe_dump(SWEEP))
    bad["methods"]["lemo-token"]["lemo"]["mlp_mode"] = "tokn"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=f"{path}: method 'lemo-token': mlp_mode must be one of"):
        load_sweep(path)


def test_a_key_given_twice_is_an_error_not_a_silent_override(tmp_path):
    from lemo.accuracy.experiment import load_experiment
    from lemo.bench.sweep import load_sweep

    path = tmp_path / "s.yaml"
    text = yaml.safe_dump(SWEEP).replace("mlp_mode: token", "mlp_mode: token\n      mlp_mode: channel", 1)
    assert "mlp_mode: channel" in text and yaml.safe_load(text)  # plain PyYAML takes the last silently
    path.write_text(text)
    with pytest.raises(ValueError, match="key 'mlp_mode' given twice"):
        load_sweep(path)
    path.write_text("methods: {lora: {method: lora, method: lemo}}\n")
    with pytest.raises(ValueError, match="key 'method' given twice"):
        load_experiment(path)


def test_an_error_inside_a_point_is_recorded_even_when_describing_the_method_fails(tmp_path):
    sweep = yaml.safe_load(yaml.safe_dump(SWEEP))  # built without validation, as a stale job file could be
    sweep["methods"]["lemo-token"]["lemo"]["mlp_mode"] = "tokn"
    sweep["groups"][0].update(attention=["sdpa-math"], contexts=[256], methods=["lemo-token", "lora"])
    bench.JobRunner(jobs(sweep)[0], tmp_path, log=lambda *_: None).run()
    recs = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    bad = recs["sdpa-math__lemo-token__256__b1.json"]
    assert bad["status"] == "error" and "mlp_mode must be one of" in bad["reason"]
    assert "unusable options" in bad["method_description"]
    assert recs["sdpa-math__lora__256__b1.json"]["status"] == "ok"  # the job went on


def test_records_are_written_world_readable(tmp_path):
    bench.write_record(tmp_path / "r.json", {"a": 1})
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_aggregate_skips_leftover_temporary_files_and_names_a_broken_record(tmp_path):
    from lemo.bench.cli import main

    sweep = yaml.safe_load(yaml.safe_dump(SWEEP))
    sweep["groups"][0].update(attention=["sdpa-math"], contexts=[256], methods=["lora"])
    bench.JobRunner(jobs(sweep)[0], tmp_path / "rec", log=lambda *_: None).run()
    (tmp_path / "rec" / ".tmp-abc123.json").write_text('{"point": ')  # a write cut short by a kill
    assert main(["aggregate", str(tmp_path / "rec"), "--out", str(tmp_path / "sweep.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "sweep.csv").method.unique()) == 1
    (tmp_path / "rec" / "broken.json").write_text("{")
    with pytest.raises(SystemExit, match=r"lemo aggregate: .*broken.json: not a sweep record"):
        main(["aggregate", str(tmp_path / "rec"), "--out", str(tmp_path / "sweep.csv")])


def test_a_cuda_sweep_on_a_machine_without_cuda_records_its_points_as_skipped(tmp_path):
    from lemo.bench.cli import main

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "device": "cuda"}))
    assert (
        main(["measure", "--sweep", str(path), "--job", "llama2-tiny__sdpa-flash__gc0", "--out", str(tmp_path / "r")])
        == 0
    )
    recs = [json.loads(p.read_text()) for p in (tmp_path / "r").glob("*.json")]
    assert len(recs) == 4 and all(r["status"] == "skipped" and "no CUDA device" in r["reason"] for r in recs)


def test_one_process_group_measures_several_backends_in_one_job(tmp_path, monkeypatch):
    sweep = yaml.safe_load(yaml.safe_dump(SWEEP))
    sweep["groups"][0].update(attention=["sdpa-math", "eager"], contexts=[128], one_process=True)
    (job,) = jobs(sweep)
    assert job.id == "llama2-tiny__sdpa-math+eager__gc0"
    assert [(p.attention, p.method) for p in job.points] == [
        ("sdpa-math", "lora"),
        ("sdpa-math", "lemo-token"),
        ("eager", "lora"),
        ("eager", "lemo-token"),
    ]
    built = []
    real_build = bench.build_model
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: built.append(k) or real_build(*a, **k))
    bench.JobRunner(job, tmp_path, log=lambda *_: None).run()
    recs = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert len(built) == 1 and sorted(recs) == sorted(
        f"{a}__{m}__128__b1.json" for a in ("sdpa-math", "eager") for m in ("lora", "lemo-token")
    )
    assert all(r["status"] == "ok" for r in recs.values())
    assert recs["eager__lora__128__b1.json"]["attention_label"].startswith("transformers eager")
    sweep["groups"][0]["one_process"] = "yes"
    with pytest.raises(ValueError, match="one_process must be true or false"):
        validate_sweep(sweep)
