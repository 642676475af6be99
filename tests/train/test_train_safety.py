"""Resume safety: no pickle is ever loaded from a checkpoint, nothing of a run is lost or silently replaced,
a damaged checkpoint falls back to the one before, and every parse error names its file."""

import json
import pickle
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from clex.train.checkpoints import list_checkpoints, rng_state, set_rng_state
from clex.train.config import TrainConfig
from clex.train.loop import main, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(out_dir, text_dir, **kw):
    base = dict(
        model="micro-llama",
        data=str(text_dir),
        seq_len=32,
        batch_size=4,
        steps=4,
        lr=3e-3,
        factor=4.0,
        clex={"time_dt": 0.1},
        out_dir=str(out_dir),
        save_every=2,
        keep_checkpoints=0,
        log_every=1,
        eval_every=0,
        eval_batches=1,
        pose=True,
        warmup_ratio=0.5,
    )
    return TrainConfig(**{**base, **kw})


def records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text_dir):
    """A complete 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(tiny(out, text_dir))
    return out


def copy_run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


class Evil:
    """Unpickling this creates the marker file: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- no pickles ------------------------------------------------------------------------------------------


def test_checkpoints_hold_no_pickle(finished):
    for _, folder in list_checkpoints(finished):
        names = sorted(p.name for p in folder.iterdir())
        assert not [n for n in names if n.endswith(".pkl")], names
        assert {"scheduler.json", "random_states_0.json", "trainer_state.json", "model.safetensors"} <= set(names)
        sched = json.loads((folder / "scheduler.json").read_text())
        assert sched["last_epoch"] == int(folder.name.split("-")[1]) and "lr_lambdas" not in sched


def test_planted_pickles_are_never_loaded(finished, tmp_path, text_dir):
    out = copy_run(finished, tmp_path)
    marker = tmp_path / "pwned"
    planted = ["custom_checkpoint_0.pkl", "random_states_0.pkl", "sampler.pkl"]
    for _, folder in list_checkpoints(out):
        for name in planted:
            (folder / name).write_bytes(pickle.dumps(Evil(marker)))
    pickle.loads((out / "checkpoint-000004" / "custom_checkpoint_0.pkl").read_bytes()).close()  # the bait works...
    assert marker.exists()
    marker.unlink()
    shutil.rmtree(out / "final")
    with pytest.warns(UserWarning, match=r"ignored .*custom_checkpoint_0\.pkl.*never unpickles") as caught:
        run(tiny(out, text_dir, resume=True))
    assert not marker.exists()  # ...and resuming never ran it
    said = " ".join(str(w.message) for w in caught)
    assert all(name in said for name in planted), said
    assert (out / "final" / "config.json").is_file()


def test_resume_restores_the_scheduler_and_rng_from_json(finished, tmp_path, text_dir):
    """A run resumed from step 2 follows the uninterrupted one exactly (lr schedule included)."""
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "checkpoint-000004")
    shutil.rmtree(out / "final")
    run(tiny(out, text_dir, resume=True))
    whole, again = records(finished), records(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(whole, again):
        assert a["lr"] == b["lr"] and a["t"] == b["t"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_rng_state_round_trips_through_json(tmp_path):
    import numpy as np

    state = json.loads(json.dumps(rng_state()))
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state, tmp_path / "random_states_0.json")
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first
    with pytest.raises(ValueError, match=r"random_states_0\.json.*RNG state"):
        set_rng_state({"python": [3, [1, 2], None]}, tmp_path / "random_states_0.json")


# --- nothing lost, nothing silently replaced --------------------------------------------------------------


@pytest.mark.parametrize("item", ["final", "log.jsonl", "config.yaml", "checkpoint-000007"])
def test_a_fresh_run_into_a_used_out_dir_is_refused(tmp_path, text_dir, item):
    out = tmp_path / "run"
    out.mkdir()
    (out / item).mkdir() if "." not in item else (out / item).write_text("keep me\n")
    with pytest.raises(ValueError, match=rf"already holds a run \({item}\).*resume=true.*overwrite=true"):
        run(tiny(out, text_dir))
    assert (out / item).exists()


def test_overwrite_replaces_the_previous_run(finished, tmp_path, text_dir, capsys):
    out = copy_run(finished, tmp_path)
    (out / "checkpoint-000099").mkdir()  # a stale one, that keep_checkpoints would otherwise count
    (out / "checkpoint-000099" / "trainer_state.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    run(tiny(out, text_dir, steps=2, overwrite=True))
    assert "removing the previous run" in capsys.readouterr().out
    assert [p.name for _, p in list_checkpoints(out)] == ["checkpoint-000002"]
    assert [r["step"] for r in records(out)] == [1, 2] and (out / "notes.txt").read_text() == "mine"
    assert TrainConfig.from_file(out / "config.yaml").overwrite is False  # the run is recorded, not the flag


def test_overwrite_flag_and_field():
    from clex.cli import COMMANDS, build_parser

    assert TrainConfig.from_file(None, ["overwrite=true"]).overwrite is True
    assert COMMANDS["train"] == "train.loop:main"
    parser = build_parser(["train"])  # `clex train` builds its flags from main's signature (read from its source)
    ns = parser.parse_args(["train", "r.yaml", "steps=3", "--overwrite"])
    assert ns.overwrite is True and ns.resume is False and ns.words == ["r.yaml", "steps=3"]
    assert "replace the run already in out_dir" in parser.leaf.format_help()
    with pytest.raises(ValueError, match="resume=true and overwrite=true"):
        TrainConfig(resume=True, overwrite=True)
    with pytest.raises(ValueError, match="TrainConfig.overwrite must be true or false, got 'yes please'"):
        TrainConfig.from_file(None, ["overwrite=yes please"])


def test_resume_without_a_checkpoint_is_an_error(tmp_path, text_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(ValueError, match=r"resume=true but out_dir .* holds no complete checkpoint.*drop --resume"):
        run(tiny(out, text_dir, resume=True))
    assert (out / "log.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'  # the log is kept
    with pytest.raises(ValueError, match="no complete checkpoint"):
        main(f"out_dir={tmp_path / 'empty'}", resume=True)


def truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def garbage(file):
    file.write_text("{not json")


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model.safetensors", truncate),
        ("trainer_state.json", garbage),
        ("optimizer.bin", truncate),
        ("scheduler.json", garbage),
        ("random_states_0.json", garbage),
    ],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(finished, tmp_path, text_dir, name, damage):
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "final")
    damage(out / "checkpoint-000004" / name)
    with pytest.warns(UserWarning, match=rf"skipping checkpoint checkpoint-000004: .*{name}"):
        run(tiny(out, text_dir, resume=True))
    again = records(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]  # steps 3 and 4 trained again from checkpoint 2
    for a, b in zip(records(finished), again):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    json.loads((out / "checkpoint-000004" / "trainer_state.json").read_text())  # saved again, whole


def test_no_usable_checkpoint_is_a_clear_error(finished, tmp_path, text_dir):
    out = copy_run(finished, tmp_path)
    truncate(out / "checkpoint-000004" / "model.safetensors")
    garbage(out / "checkpoint-000002" / "trainer_state.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"no usable checkpoint in .*model\.safetensors.*trainer_state\.json"):
            run(tiny(out, text_dir, resume=True))


# --- parse errors name the file ----------------------------------------------------------------------------


def test_a_bad_log_line_names_the_file_and_line(finished, tmp_path, text_dir):
    out = copy_run(finished, tmp_path)
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"log\.jsonl line 2 is not a log record"):
        run(tiny(out, text_dir, resume=True))


def test_a_half_written_last_log_line_is_dropped(finished, tmp_path, text_dir):
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "checkpoint-000004")
    shutil.rmtree(out / "final")
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # killed mid-write of step 4
    with pytest.warns(UserWarning, match=r"log\.jsonl line 4 is half-written"):
        run(tiny(out, text_dir, resume=True))
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "name, text", [("bad.yaml", "steps: [1\n"), ("bad.toml", "steps = = 3\n"), ("bin.yaml", b"\xff\xfe\x00")]
)
def test_bad_config_files_name_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(ValueError, match=rf"cannot parse config file .*{name}"):
        TrainConfig.from_file(path)


def test_an_older_checkpoint_without_the_json_state_still_resumes(finished, tmp_path, text_dir):
    """Written before scheduler.json and random_states_*.json: the schedule is rebuilt from the step (warned)."""
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "checkpoint-000004")
    shutil.rmtree(out / "final")
    (out / "checkpoint-000002" / "scheduler.json").unlink()
    (out / "checkpoint-000002" / "random_states_0.json").unlink()
    with pytest.warns(UserWarning, match=r"no scheduler\.json: the LR schedule is rebuilt at step 2"):
        run(tiny(out, text_dir, resume=True))
    for a, b in zip(records(finished), records(out)):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12) and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
