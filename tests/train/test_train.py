"""The fine-tuning loop: config files and overrides, loss falls per method, exact resume, 2 processes."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clex
from clex.data.presets import build_model
from clex.train.loop import TrainConfig, main, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[2]


def tiny(tmp_path, text_dir, **kw):
    """A micro model, 32-token rows, cheap CLEX solves (rk4 at dt 0.1, max_factor 4)."""
    base = dict(
        model="micro-llama",
        data=str(text_dir),
        seq_len=32,
        batch_size=8,
        steps=30,
        lr=3e-3,
        factor=4.0,
        out_dir=str(tmp_path / "run"),
        save_every=0,
        log_every=1,
        eval_every=0,
        eval_batches=2,
    )
    if kw.get("method", "clex") == "clex":
        base["clex"] = {"time_dt": 0.1}
    return TrainConfig(**{**base, **kw})


def records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


# --- config ------------------------------------------------------------------------------------------


def test_config_files_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("method: yarn\nfactor: 8\nlr: 1e-3\nrope:\n  beta_fast: 16\n")
    cfg = TrainConfig.from_file(tmp_path / "a.yaml", ["steps=7", "rope.beta_slow=2", "pose=true", "data=null"])
    assert (cfg.method, cfg.factor, cfg.lr, cfg.steps, cfg.pose, cfg.data) == ("yarn", 8.0, 1e-3, 7, True, None)
    assert cfg.rope == {"beta_fast": 16, "beta_slow": 2}
    (tmp_path / "b.toml").write_text('method = "clex"\n[clex]\nmax_factor = 8\nact = "silu"\n')
    cfg = TrainConfig.from_file(tmp_path / "b.toml", ["clex.param_factor=2"])
    assert cfg.clex_config().max_factor == 8 and cfg.clex_config().act == "silu" and cfg.clex_config().param_factor == 2
    assert TrainConfig.from_file(None, ["seed=3"]).clex_config().seed == 3  # the CLEX draws follow the run's seed
    cfg.write_yaml(tmp_path / "r.yaml")
    assert TrainConfig.from_file(tmp_path / "r.yaml") == cfg  # the resolved config reads back to the same run


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(method="rope-magic"), ["method", "clex", "yarn", "none"]),
        (dict(train="clex", method="pi"), ["train", "clex", "pi"]),
        (dict(clex={"max_factor": 0}), ["max_factor", ">= 1"]),
        (dict(clex={"maxfactor": 8}), ["TrainConfig.clex has no field 'maxfactor' (did you mean 'max_factor'?)"]),
        (dict(method="yran"), ["did you mean 'yarn'?"]),
        (dict(pose=True, clex={"position_sampler": "random"}), ["pose=true", "clex.position_sampler='random'"]),
        (dict(method="yarn", factor=8, rope={"factor": 2}), ["rope.factor=2", "TrainConfig.factor (8.0)"]),
        (dict(method="yarn", rope={"rope_type": "linear"}), ["rope.rope_type", "TrainConfig.method ('yarn')"]),
        (dict(dtype="float8"), ["dtype", "bfloat16"]),
        (dict(steps=0), ["steps", ">= 1"]),
        (dict(held_out=1.0), ["held_out"]),
        (dict(method="pi", clex={"act": "silu"}), ["clex", "pi"]),
    ],
)
def test_bad_configs_name_the_field(kwargs, words):
    with pytest.raises(ValueError) as e:
        TrainConfig(**kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_config_files_and_overrides(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        TrainConfig.from_file(tmp_path / "nope.yaml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ValueError, match=r"c\.json.*\.yaml"):
        TrainConfig.from_file(tmp_path / "c.json")
    (tmp_path / "d.yaml").write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="stepz"):
        TrainConfig.from_file(tmp_path / "d.yaml")
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig.from_file(None, ["steps"])
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig.from_file(None, ["batch_size=two"])


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_parse(recipe):
    TrainConfig.from_file(recipe)


# --- training -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, pose", [("clex", False), ("pi", False), ("yarn", True)])
def test_loss_falls(tmp_path, text_dir, method, pose):
    final = run(tiny(tmp_path, text_dir, method=method, pose=pose))
    losses = [r["loss"] for r in records(tmp_path / "run")]
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.0, (first, last)  # from ~5.5 (uniform over 257 bytes) down past 4.5
    if method == "clex":  # t drawn from {1..4}, logged; the final folder loads back with CLEX
        ts = [t for r in records(tmp_path / "run") for t in r["t"]]
        assert set(ts) <= {1.0, 2.0, 3.0, 4.0} and len(set(ts)) > 1
        model = clex.load_model(final)
        assert clex.get_clex_rotary(model).config.max_factor == 4
        assert torch.count_nonzero(clex.get_clex_rotary(model).dynamics.ode_down_proj) > 0  # the ODE learned


def test_resume_continues_the_same_loss_curve(tmp_path, text_dir):
    """A run killed after its step-6 checkpoint (and a half-written step-9 one) resumes to the same losses."""
    common = dict(steps=10, save_every=3, keep_checkpoints=0, grad_accum=2, batch_size=4, pose=True)
    full = tmp_path / "full"
    run(tiny(full, text_dir, **common))
    whole = records(full / "run")

    killed = tmp_path / "killed" / "run"
    shutil.copytree(full / "run", killed)
    for name in ("checkpoint-000009", "checkpoint-000010", "final"):  # what a kill after step 7 leaves...
        shutil.rmtree(killed / name)
    shutil.copytree(full / "run" / "checkpoint-000009", killed / ".tmp-checkpoint-000009")  # ...mid-save
    (killed / ".tmp-checkpoint-000009" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="resume"):  # no silent overwrite of an unfinished run
        run(tiny(tmp_path / "killed", text_dir, **common))
    run(tiny(tmp_path / "killed", text_dir, **common, resume=True))
    again = records(killed)
    assert [r["step"] for r in again] == list(range(1, 11))  # records past the checkpoint were dropped
    for a, b in zip(whole, again):
        assert a["t"] == b["t"]  # the CLEX draw counter was restored
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
    assert not (killed / ".tmp-checkpoint-000009").exists()
    w1 = clex.load_model(full / "run" / "final").state_dict()
    w2 = clex.load_model(killed / "final").state_dict()
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)


def test_train_clex_only_and_lora(tmp_path, text_dir):
    base = build_model("micro-llama", seed=0)[0].state_dict()
    final = run(tiny(tmp_path / "a", text_dir, train="clex", steps=4, lr=1e-2))
    after = clex.load_model(final).state_dict()
    changed = {k for k in after if k in base and not torch.equal(after[k], base[k])}
    assert changed == set()  # every transformer weight frozen
    assert torch.count_nonzero(after["model.rotary_emb.dynamics.ode_down_proj"]) > 0
    final = run(tiny(tmp_path / "b", text_dir, train="lora", lora_rank=4, steps=4, lr=1e-2))
    merged = clex.load_model(final).state_dict()
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_two_processes_draw_the_same_t(tmp_path, text_dir):
    """torchrun, 2 CPU processes (gloo, DDP): t=1 draws happen (ODE weights unused) and every rank logs the same t."""
    out = tmp_path / "ddp"
    args = [
        "model=micro-llama",
        f"data={text_dir}",
        "seq_len=32",
        "batch_size=4",
        "steps=6",
        "factor=4",
        "clex.time_dt=0.1",
        f"out_dir={out}",
        "log_every=2",
        "save_every=3",
        "eval_every=0",
        "eval_batches=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "clex.train",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        raise
    assert proc.returncode == 0, stderr[-3000:]
    logs = records(out)
    assert "2 process(es)" in stdout
    ranks = [row for r in logs for row in zip(*r["t_ranks"])]
    assert len(logs[0]["t_ranks"]) == 2 and all(a == b for a, b in ranks)
    assert 1.0 in [t for r in logs[:-1] for t in r["t"]]  # a t=1 step, followed by more DDP steps
    assert (out / "final" / "config.json").is_file() and len(
        list((out / "checkpoint-000006").glob("random_states_*"))
    ) == 2


def test_main_is_the_cli_entry(tmp_path, text_dir, capsys):
    """`clex train CONFIG k=v --resume` maps to main(CONFIG, k=v, resume=True): the grammar of `python -m
    clex.train`, which `cli` passes through as it is."""
    from clex.cli import main as clex_main
    from clex.train.loop import cli, split_words

    (tmp_path / "r.yaml").write_text(f"model: micro-llama\nmethod: ntk\nfactor: 2\ndata: {text_dir}\nseq_len: 32\n")
    args = ["steps=2", f"out_dir={tmp_path / 'out'}", "save_every=1", "batch_size=2"]
    assert clex_main(["train", str(tmp_path / "r.yaml"), *args]) == 0
    assert "final model" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already holds a run"):
        main(str(tmp_path / "r.yaml"), *args)
    assert cli([str(tmp_path / "r.yaml"), *args, "resume=true"]) == 0  # nothing left to do
    assert clex_main(["train", str(tmp_path / "r.yaml"), *args, "--resume"]) == 0
    resolved = TrainConfig.from_file(tmp_path / "out" / "config.yaml")
    assert resolved.method == "ntk" and resolved.steps == 2 and resolved.resume
    assert split_words(["steps=3"]) == (None, ["steps=3"]) and split_words(["a.yaml", "x=1"]) == ("a.yaml", ["x=1"])


def test_the_ode_weights_get_their_own_learning_rate():
    from clex.data.presets import build_model
    from clex.train.loop import _select_trainable

    model, _ = build_model("micro-llama")
    clex.apply_clex(model, max_factor=4)
    _, groups = _select_trainable(model, TrainConfig(model="micro-llama", lr=1e-3, clex_lr=2e-5))
    assert len(groups) == 2 and "lr" not in groups[0] and groups[1]["lr"] == 2e-5
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in clex.get_clex_rotary(model).dynamics.parameters()}
    with pytest.raises(ValueError, match=r"TrainConfig.clex_lr must be a number >= 0 \(0: the ODE weights frozen\)"):
        TrainConfig(clex_lr=-1)
    _, groups = _select_trainable(model, TrainConfig(model="micro-llama", lr=1e-3, clex_lr=0))
    assert len(groups) == 1 and not any(p.requires_grad for p in clex.get_clex_rotary(model).dynamics.parameters())
    with pytest.raises(ValueError, match="train='clex' with clex_lr=0 would train nothing"):
        TrainConfig(train="clex", clex_lr=0)


def test_lora_with_the_functions_of_t_a_frozen_ode_and_the_adapter_saved_apart(tmp_path, text_dir):
    from peft import PeftModel
    from safetensors.torch import load_file

    from clex.hf.t_adapter import TAdapter

    options = {"time_dt": 0.1, "mscale": "learned", "adapter_rank": 2, "log_scale": True}
    cfg = tiny(tmp_path, text_dir, train="lora", lora_rank=4, steps=4, lr=1e-2, clex_lr=0, t_lr=5e-2, clex=options)
    final = run(dataclasses.replace(cfg, save_adapter=True))
    model = clex.load_model(final)
    rotary = clex.get_clex_rotary(model)
    assert torch.count_nonzero(rotary.dynamics.ode_down_proj) == 0  # frozen: still the prior
    assert rotary.temperature.abs().min() > 1e-3  # moved at t_lr (the stock rotation's full gradient)
    assert all(torch.count_nonzero(m.up) > 0 for m in model.modules() if isinstance(m, TAdapter))
    # the adapter folder + the base + CLEX: the same merged weights as the final folder
    base = build_model("micro-llama", seed=0)[0]
    clex.apply_clex(base, rotary.config)
    rebuilt = PeftModel.from_pretrained(base, final / "adapter").merge_and_unload()
    saved = load_file(str(final / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        assert torch.allclose(rebuilt.state_dict()[name], saved[name], atol=1e-6)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"batch_size": 10**6, "seq_len": 10**6}, r"batch_size x seq_len=1000000 x 1000000 needs at least"),
        ({"factor": 1e9}, r"factor \(CLEX max_factor\)=1e\+09 needs at least"),
    ],
)
def test_sizes_that_cannot_fit_are_refused_before_the_first_step_and_an_old_run_is_kept(
    tmp_path, text_dir, fields, message
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 5.0}\n')  # a previous run, asked to be overwritten
    config = TrainConfig(model="micro-llama", data=str(text_dir), steps=1, out_dir=str(out), overwrite=True, **fields)
    with pytest.raises(ValueError, match=message + r" .* GiB, but this machine has .* GiB free"):
        run(config)
    assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'  # refused before anything was removed
