"""Resuming training never discards a run silently: damaged checkpoints are fallen back from (with one
line saying so) or refused (one line, non-zero exit), metrics and older checkpoints stay on disk, and a
run killed at random points (in steps and in saves) finishes bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemotron.errors import CheckpointError
from nemotron.config.presets import toy_super_config
from nemotron.io.random_checkpoint import init_checkpoint
from nemotron.models.init import init_weights_
from nemotron.models import build_model
from nemotron.train import load_recipe, train
from nemotron.train.optim import make_optimizer
from nemotron.train.state import load_training_state, read_training_state, step_dirs

from checkpoints import assert_one_line_error, cli, deadline

STEPS = 8
RUN_TIMEOUT = 180   # seconds for one training process (a few on an idle machine)


def _data(path: Path) -> Path:
    rng = random.Random(0)
    words = "the cat sat on a mat and the dog ran to the park while birds sang in trees".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))})
                            + "\n" for _ in range(60)))
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> list[str]:
    """key=value settings of a tiny pretraining run that saves after every step."""
    root = tmp_path_factory.mktemp("resume_inputs")
    tok = init_checkpoint(root / "tiny", seed=0)
    return [f"data=[{_data(root / 'pre.jsonl')}]", "init_config=toy_super", f"tokenizer={tok}", f"steps={STEPS}",
            "seq_len=64", "batch_size=1", "lr=3e-3", "warmup=1", "save_every=1"]


def _train_args(recipe: list[str], out: Path) -> list[str]:
    return ["train", "pretrain", "--quiet", *recipe, f"out_dir={out}"]


def _train_cli(recipe: list[str], out: Path) -> subprocess.CompletedProcess:
    return cli(*_train_args(recipe, out), timeout=RUN_TIMEOUT)


@pytest.fixture(scope="module")
def base(recipe, tmp_path_factory) -> Path:
    """An uninterrupted run: the reference, and the starting point of every damage case."""
    out = tmp_path_factory.mktemp("resume_base") / "run"
    result = _train_cli(recipe, out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for _, p in step_dirs(out / "checkpoints")] == ["step_00000007", "step_00000008"]
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _weights(out: Path) -> dict[str, bytes]:
    return {name: data for name, data in _files(out / "final").items() if name.endswith(".safetensors")}


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.is_file() else []


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in _lines(path)]


# --------------------------------------------------------------------------------------------------
# (a) each damage case through the CLI
# --------------------------------------------------------------------------------------------------

CK = "checkpoints"
S7, S8 = f"{CK}/step_00000007", f"{CK}/step_00000008"


def _rewrite_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _named(cases: list) -> list:
    return [pytest.param(*c, id=c[0]) if type(c) is tuple else c for c in cases]   # ParameterSets pass as they are


def _slow(name: str, *values):
    return pytest.param(name, *values, id=name, marks=pytest.mark.slow)


# (name, damage, the checkpoint resumed from, what the warning says); the cases marked slow take the
# same paths as a default one (and their messages are checked through the API below)
FALLBACKS = [
    ("trainer_json_deleted", lambda o: (o / S8 / "trainer.json").unlink(), 7, "step_00000008/trainer.json: missing"),
    ("latest_missing", lambda o: (o / CK / "latest").unlink(), 8, "checkpoints/latest is missing"),
    _slow("latest_names_missing_dir", lambda o: (o / CK / "latest").write_text("step_00000042\n"), 8,
          "checkpoints/latest names step_00000042, which does not exist"),
    ("latest_step_dir_gone", lambda o: shutil.rmtree(o / S8), 7,
     "checkpoints/latest names step_00000008, which does not exist"),
    ("trainer_json_list", lambda o: (o / S8 / "trainer.json").write_text("[]"), 7,
     "step_00000008/trainer.json: expected a JSON object, got list"),
    _slow("trainer_json_invalid", lambda o: (o / S8 / "trainer.json").write_text('{"step": 8,'), 7,
          "step_00000008/trainer.json: not valid JSON"),
    _slow("trainer_json_wrong_type", lambda o: _rewrite_json(o / S8 / "trainer.json", step="8"), 7,
          "step_00000008/trainer.json: 'step' must be an integer"),
    ("model_truncated", lambda o: _truncate(o / S8 / "model.safetensors"), 7,
     "step_00000008/model.safetensors is truncated"),
    _slow("optimizer_truncated", lambda o: _truncate(o / S8 / "optimizer.safetensors"), 7,
          "step_00000008/optimizer.safetensors is truncated"),
]


@pytest.mark.parametrize("name,damage,resumed,says", _named(FALLBACKS))
def test_damaged_latest_state_falls_back_to_the_newest_intact_checkpoint(base, recipe, tmp_path, name, damage,
                                                                         resumed, says):
    out = tmp_path / "run"
    shutil.copytree(base, out)
    damage(out)
    damaged = {k: v for k, v in _files(out).items() if k.startswith(S8 + "/")}
    result = _train_cli(recipe, out)
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()   # one line, no traceback
    assert line.startswith("warning: ") and says in line and f"resuming from step_0000000{resumed}" in line, line
    assert _weights(out) == _weights(base)   # the fallback is clean: the same final weights
    # nothing lost: the metrics up to the checkpoint stay, those after it are set aside
    before = _lines(base / "metrics.jsonl")
    assert _lines(out / "metrics.jsonl")[:resumed] == before[:resumed] and _steps(out / "metrics.jsonl") == \
        list(range(1, STEPS + 1))
    assert _lines(out / "metrics.discarded.jsonl") == before[resumed:]
    # the older checkpoint is still there, untouched; a damaged one is kept, renamed
    assert {k: v for k, v in _files(out).items() if k.startswith(S7 + "/")} == \
        {k: v for k, v in _files(base).items() if k.startswith(S7 + "/")}
    if resumed == 7 and damaged:
        aside = {k.replace("step_", "damaged_step_", 1): v for k, v in damaged.items()}
        assert {k: v for k, v in _files(out).items() if k.startswith(f"{CK}/damaged_")} == aside
        assert "renamed damaged_step_00000008" in line


def _both_damaged(out: Path) -> None:
    (out / S8 / "trainer.json").write_text("[]")
    _truncate(out / S7 / "model.safetensors")


REFUSALS = [
    ("nothing_usable", _both_damaged, ["no usable checkpoint", "step_00000008/trainer.json: expected a JSON object",
                                       "step_00000007/model.safetensors is truncated"]),
    _slow("only_the_pointer_left", lambda o: (shutil.rmtree(o / S7), shutil.rmtree(o / S8)),
          ["checkpoints/latest exists but no step_* checkpoint is left"]),
]


@pytest.mark.parametrize("name,damage,says", _named(REFUSALS))
def test_unusable_checkpoints_are_refused_in_one_line_and_left_alone(base, recipe, tmp_path, name, damage, says):
    out = tmp_path / "run"
    shutil.copytree(base, out)
    damage(out)
    before = _files(out)
    assert_one_line_error(_train_cli(recipe, out), *says)
    assert _files(out) == before   # nothing renamed, pruned, truncated or written


def _live_model():
    config = toy_super_config()
    model = init_weights_(build_model(config), config, seed=7)
    return model, make_optimizer(model, 1e-3)


def test_a_damaged_checkpoint_fails_before_anything_is_copied(base, tmp_path):
    """Loading checks every file first: a truncated optimizer file leaves the live model and
    optimizer exactly as they were, so that falling back to an older checkpoint is clean."""
    model, opt = _live_model()
    model(torch.tensor([[5, 6, 7]])).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = json.dumps(opt.state_dict(), default=lambda t: t.tolist())
    rng_before = torch.get_rng_state()
    path = tmp_path / "step_00000008"
    shutil.copytree(base / S8, path)
    _truncate(path / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match="optimizer.safetensors is truncated"):
        load_training_state(path, model, opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert json.dumps(opt.state_dict(), default=lambda t: t.tolist()) == opt_before
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.mark.parametrize("change,says", [
    ("[]", "expected a JSON object, got list"),
    ('{"step": 8', "not valid JSON"),
    (b"\xff\x00", "unreadable"),
    ({"step": "8"}, "'step' must be an integer"),
    ({"step": True}, "'step' must be an integer"),
    ({"step": 9}, "says step 9, its folder step 8"),
    ({"world_size": 2}, "written by 2 processes; resume with as many"),
    ({"param_groups": {}}, "'param_groups' must be a JSON list"),
    ({"param_groups": [{"params": []}, {"params": []}]}, "does not fit this model's optimizer"),
    ({"scalars": {"x": 1}}, "optimizer scalar 'x' names no parameter"),
    ({"data": {"epoch": "0", "batch": 1, "seed": 0}}, "data position"),
    ({"data": None}, "'data' must be a JSON dict"),
])
def test_a_bad_trainer_json_is_one_line_naming_the_file(base, tmp_path, change, says):
    path = tmp_path / "step_00000008"
    shutil.copytree(base / S8, path)
    file = path / "trainer.json"
    if isinstance(change, dict):
        _rewrite_json(file, **change)
    elif isinstance(change, bytes):
        file.write_bytes(change)
    else:
        file.write_text(change)
    model, opt = _live_model()
    with pytest.raises(CheckpointError) as e:
        read_training_state(path, model, opt, {"epoch": 0, "batch": 0, "seed": 0})
    assert str(e.value).startswith(f"{file}: ") and says in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# (b) SIGKILL at random points, resume, repeat: bit-identical to the uninterrupted run
# --------------------------------------------------------------------------------------------------


def _newest_step(out: Path) -> int:
    dirs = step_dirs(out / CK)
    return dirs[-1][0] if dirs else 0


def _max_logged_step(path: Path) -> int:
    best = 0
    for line in _lines(path):
        try:
            best = max(best, int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            pass   # the line being written
    return best


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _where_it_landed(out: Path, since_ns: int) -> str:
    """Where a kill hit, read from what it left in the checkpoints folder."""
    root = out / CK
    fresh = [p for p in [*root.glob(".tmp_step_*"), root / "latest.tmp"]   # left by this process, not an earlier one
             if p.exists() and p.stat().st_mtime_ns >= since_ns]
    if any(p.name.startswith(".tmp_step_") for p in fresh):
        return "save: writing"
    dirs = step_dirs(root)
    pointer = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    if fresh or (dirs and pointer != dirs[-1][1].name):
        return "save: renamed, pointer not moved"
    if len(dirs) > 2:
        return "save: pruning"
    return "export" if dirs and dirs[-1][0] == STEPS else "step"


def _attempt(recipe: list[str], out: Path, rng: random.Random) -> str:
    """One training process, SIGKILLed a seeded delay after its k-th new step record (a short delay
    mostly lands in that step's save, a longer one in the next step); returns where it landed."""
    start = _newest_step(out)
    k = rng.randint(1, 2)
    delay = rng.uniform(0, 0.03) if rng.random() < 0.5 else rng.uniform(0, 0.3)
    target = min(start + k, STEPS) if start < STEPS else None   # None: only the export is left, let it finish
    metrics = out / "metrics.jsonl"
    # records the last process logged after its checkpoint are stale until the resume sets them aside
    stale_inode = _inode(metrics) if _max_logged_step(metrics) > start else None
    since = time.time_ns()
    with (out.parent / f"{out.name}.stderr").open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "nemotron.cli", *_train_args(recipe, out)],
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    give_up = time.monotonic() + RUN_TIMEOUT
    try:
        while proc.poll() is None:
            assert time.monotonic() < give_up, "a training process hung"
            if target and _inode(metrics) not in (None, stale_inode) and _max_logged_step(metrics) >= target:
                time.sleep(delay)
                break
            time.sleep(0.002)
        if proc.poll() is not None:
            assert proc.returncode == 0, (out.parent / f"{out.name}.stderr").read_text()[-2000:]
            return "finished"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return _where_it_landed(out, since)


def _kill_until_done(recipe: list[str], base: Path, out: Path, rng: random.Random, kills: int) -> list[str]:
    """Kill `kills` times (fewer if the run finishes first), then let it finish; the final weights and
    the logged losses must be the uninterrupted run's, bit for bit."""
    landed: list[str] = []
    while len(landed) < kills:
        where = _attempt(recipe, out, rng)
        if where == "finished":
            break
        landed.append(where)
    else:
        result = _train_cli(recipe, out)
        assert result.returncode == 0, result.stderr[-2000:]
    assert not list((out / CK).glob("damaged_*"))   # no kill ever damaged a checkpoint: saves are atomic
    assert _weights(out) == _weights(base)
    ref = [json.loads(line)["loss"] for line in _lines(base / "metrics.jsonl")]
    assert [json.loads(line)["loss"] for line in _lines(out / "metrics.jsonl")] == ref
    return landed


def test_killed_at_random_points_resumes_bit_identically(base, recipe, tmp_path):
    landed = _kill_until_done(recipe, base, tmp_path / "run", random.Random(2), kills=2)
    print(f"\nkills landed: {landed}")
    assert len(landed) >= 2, landed


@pytest.mark.slow
def test_twenty_random_kills_resume_bit_identically(base, recipe, tmp_path):
    rng = random.Random(20)
    landed: list[str] = []
    runs = 0
    while len(landed) < 20:
        runs += 1
        landed += _kill_until_done(recipe, base, tmp_path / f"run{runs}", rng, kills=20 - len(landed))
    counts = {w: landed.count(w) for w in sorted(set(landed))}
    print(f"\n{len(landed)} kills over {runs} runs, all bit-identical: {counts}")
    assert sum(n for w, n in counts.items() if w.startswith("save")) >= 3, counts


# --------------------------------------------------------------------------------------------------
# (c) seeded fuzz: random damage, then a resume that falls back with a message or refuses in one line
# --------------------------------------------------------------------------------------------------


GARBLED_JSON = ["[]", "{", "", "null", '{"step": 8}', "\xff\xfe", '{"step": 8, "world_size": 2, "param_groups": [], '
                '"scalars": {}, "data": {}}']


def _mutate(out: Path, rng: random.Random) -> str:
    root = out / CK
    files = sorted(p for p in root.rglob("*") if p.is_file())
    dirs = [p for _, p in step_dirs(root)]
    kind = rng.choice(["delete", "truncate", "garble_json", "pointer", "drop_dir", "flip_header"])
    if kind == "delete" and files:
        target = rng.choice(files)
        target.unlink()
    elif kind == "truncate" and files:
        target = rng.choice(files)
        os.truncate(target, rng.randrange(max(1, target.stat().st_size)))
    elif kind == "garble_json" and dirs:
        target = rng.choice(dirs) / "trainer.json"
        target.write_text(rng.choice(GARBLED_JSON))
    elif kind == "pointer":
        target = root / "latest"
        target.write_text(rng.choice(["", "step_00000007", "step_00000099", "../../etc", "step_0000000x"]) + "\n")
    elif kind == "drop_dir" and dirs:
        target = rng.choice(dirs)
        shutil.rmtree(target)
    elif dirs:   # flip_header: a length prefix that points past the end of the file
        target = rng.choice(dirs) / rng.choice(["model.safetensors", "optimizer.safetensors"])
        if target.is_file():
            with target.open("r+b") as f:
                f.write(b"\xff" * 8)
    else:
        return "nothing left to mutate"
    return f"{kind} {target.relative_to(out)}"


def test_seeded_resume_fuzz_never_restarts_silently_nor_crashes(base, recipe, tmp_path, capsys):
    rng = random.Random(11)
    outcomes = []
    for case in range(6):
        out = tmp_path / f"case{case}"
        shutil.copytree(base, out)
        done = [_mutate(out, rng) for _ in range(rng.randint(1, 4))]
        had_checkpoints = bool(step_dirs(out / CK))
        untouched = [p.name for _, p in step_dirs(out / CK) if not any(p.name in d for d in done)]
        capsys.readouterr()
        try:
            with deadline(120):
                train(load_recipe(None, recipe + [f"out_dir={out}"], "pretrain"), progress=False)
        except CheckpointError as e:
            message = str(e)
            assert "\n" not in message and (str(out / CK) in message), (done, message)
            assert not untouched, (done, message)   # an intact checkpoint was there to resume from
            outcomes.append(("refused", done))
            continue
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) <= 1, (done, err)
        # never from step 0 while checkpoints were there: the early metrics were kept, not set aside
        discarded = _steps(out / "metrics.discarded.jsonl")
        assert not (had_checkpoints and 1 in discarded), (done, err)
        assert _steps(out / "metrics.jsonl") == list(range(1, STEPS + 1)), done
        assert _weights(out) == _weights(base), done
        if err:
            assert err[0].startswith("warning: "), (done, err)
        if had_checkpoints and err:
            assert "resuming from step_" in err[0], (done, err)
        if not err:   # silence only when the newest checkpoint and the pointer were left alone
            assert untouched and untouched[-1] == "step_00000008" and not any("latest" in d for d in done), done
        outcomes.append(("resumed", done, err))
    print("\n" + "\n".join(map(str, outcomes)))
    assert {o[0] for o in outcomes} == {"resumed", "refused"}, outcomes
