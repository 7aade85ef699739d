"""The S2DC training loop and its command line: metrics, checkpoints, resume after SIGKILL, fused vs
reference ops, bad input. Tiny geometry (2 x 2 crops of 8^3 voxels, 16 tokens per z-layer): fast runs."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from s2dc_kernels.train import RunError, main, parse_args, train
from s2dc_kernels.train.data import DataError
from s2dc_kernels.train.loop import Trainer

nib = pytest.importorskip("nibabel")  # training only needs it; a bare GPU machine may lack it

TINY = ["--batch-size", "1", "--grid", "2", "2", "--crop", "8", "--depth", "8", "--token-stride", "4",
        "--sinkhorn-iters", "20", "--queue-size", "8", "--nc-k", "4", "--num-threads", "1"]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


def run_args(out: Path, *extra: str) -> list[str]:
    return [*TINY, "--out", str(out), *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_close_rel(actual: float, expected: float, rel: float) -> None:
    assert abs(actual - expected) <= rel * abs(expected), f"{actual} vs {expected} (rel {rel})"


def write_volume(path: Path, shape=(20, 20, 12), seed=0) -> Path:
    data = np.random.default_rng(seed).normal(100.0, 30.0, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def test_run_writes_metrics_checkpoint_plot_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(parse_args(run_args(out, "--steps", "4", "--save-every", "2")))
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    keys = {"step", "loss", "p2p", "p2s", "nc", "g", "time_loss_s", "time_encoder_s", "lr"}
    assert keys <= set(lines[0])
    for m in lines:
        weighted = 0.5 * (m["p2p"] + m["p2s"] + m["nc"] + m["g"])
        assert_close_rel(m["loss"], weighted, 1e-5)
        assert m["time_loss_s"] > 0 and m["time_encoder_s"] > 0
    assert (out / "loss.png").stat().st_size > 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp file
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    saved = {"model", "teacher", "optimizer", "scheduler", "losses", "data_generator", "torch_rng", "args"}
    assert saved <= set(state)
    assert summary["steps"] == summary["steps_run"] == 4
    assert summary["final_loss"] == lines[-1]["loss"] and summary["steps_per_s"] > 0
    assert "steps/s" in capsys.readouterr().out


def test_options_bf16_clipping_and_a_term_off(tmp_path):
    out = tmp_path / "run"
    flags = ["--steps", "2", "--precision", "bf16", "--clip-grad", "1.0", "--w-g", "0"]
    train(parse_args(run_args(out, *flags)))
    lines = metrics(out)
    assert all(m["g"] is None and np.isfinite(m["loss"]) for m in lines)
    assert_close_rel(lines[-1]["loss"], 0.5 * (lines[-1]["p2p"] + lines[-1]["p2s"] + lines[-1]["nc"]), 1e-5)


def test_warmup_then_cosine_schedule(tmp_path):
    out = tmp_path / "run"
    train(parse_args(run_args(out, "--steps", "6", "--warmup-steps", "2", "--lr", "1e-3")))
    lrs = [m["lr"] for m in metrics(out)]
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and 0 < lrs[-1] < lrs[2]


@pytest.mark.parametrize(
    ("flags", "rel"),
    [
        ([], 1e-4),
        # L_g's dot products of unnormalised embeddings amplify float noise into the trajectory (the same ops
        # on 1 vs 2 threads drift by ~1e-5); without it, the kernels' drop-in agreement shows directly.
        (["--w-g", "0"], 1e-5),
    ],
    ids=["all-terms", "token-terms"],
)
def test_fused_and_reference_ops_give_the_same_loss_curve(tmp_path, flags, rel):
    curves = {}
    for ops in ("fused", "reference"):
        train(parse_args(run_args(tmp_path / ops, "--steps", "20", "--ops", ops, *flags)))
        curves[ops] = metrics(tmp_path / ops)
    for fused, ref in zip(curves["fused"], curves["reference"], strict=True):
        assert_close_rel(fused["loss"], ref["loss"], rel)
        for key in ("p2p", "p2s", "nc", "g"):  # terms near 0 (L_nc) are compared on the loss scale
            if ref[key] is not None:
                assert abs(fused[key] - ref[key]) <= rel * max(abs(ref[key]), 1.0), (key, fused, ref)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    # Steps of ~0.2 s (4 volumes of 3 x 3 crops, 144 tokens per z-layer) leave time to kill the run mid-way.
    volume = write_volume(tmp_path / "volume.nii.gz", shape=(56, 56, 20))
    run = ["--grid", "3", "3", "--crop", "16", "--depth", "16", "--batch-size", "4", "--data", str(volume),
           "--steps", "20", "--save-every", "5", "--seed", "1"]  # fmt: skip
    flags = run_args(tmp_path / "killed", *run)
    command = [sys.executable, "-m", "s2dc_kernels.train", *flags]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the run ended before the kill: {stderr.decode()[-2000:]}"
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 5 <= killed_at < 20

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = train(parse_args(run_args(tmp_path / "whole", *run)))
    lines = metrics(tmp_path / "killed")
    assert [m["step"] for m in lines] == list(range(1, 21))  # lines past the checkpoint are not duplicated
    assert_close_rel(lines[-1]["loss"], reference["final_loss"], 1e-6)
    for key in ("p2p", "p2s", "nc", "g"):
        assert_close_rel(lines[-1][key], metrics(tmp_path / "whole")[-1][key], 1e-6)


def test_rerun_without_resume_keeps_the_run_folder_intact(tmp_path, capsys):
    out = tmp_path / "run"
    train(parse_args(run_args(out, "--steps", "2")))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunError, match="already holds a run"):
        train(parse_args(run_args(out, "--steps", "4")))
    assert main(run_args(out, "--steps", "4")) == 1
    assert "--resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_diverged_loss_stops_the_run_before_the_update_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """A NaN reaching the loss, or a non-finite encoder output (the ops' own NaN scans are off in the loop),
    stops the run at that step, naming the terms; the checkpoint and metrics of the steps before stay."""
    out = tmp_path / "run"
    train(parse_args(run_args(out, "--steps", "2", "--save-every", "1")))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from s2dc_kernels.train.losses import P2SLoss

    forward = P2SLoss.forward
    monkeypatch.setattr(P2SLoss, "forward", lambda *args, **kwargs: forward(*args, **kwargs) * float("nan"))
    with pytest.raises(RunError, match=r"step 3: the loss is nan \(p2p [0-9.]+, p2s nan, nc [0-9.]+, g"):
        train(parse_args(run_args(out, "--steps", "4", "--save-every", "1", "--resume")))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    encode = Trainer._encode  # an encoder output with an inf: stopped before the kernels see it
    monkeypatch.setattr(
        Trainer, "_encode", lambda *args: [t.clone().fill_(float("inf")) for t in encode(*args)]
    )
    with pytest.raises(RunError, match="step 3: the encoders' outputs are not finite: training diverged"):
        train(parse_args(run_args(out, "--steps", "4", "--save-every", "1", "--resume")))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def same_state(a, b) -> bool:
    """Equal nested state: tensors bit for bit, containers entry by entry."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_diverged_step_leaves_model_optimizer_and_schedule_untouched(tmp_path, monkeypatch):
    trainer = Trainer(parse_args(run_args(tmp_path / "run", "--steps", "4")))
    trainer.step()
    before = copy.deepcopy((trainer.model.state_dict(), trainer.teacher.module.state_dict()))
    optimizer, schedule = copy.deepcopy(trainer.optimizer.state_dict()), trainer.scheduler.state_dict()
    from s2dc_kernels.train.losses import P2SLoss

    forward = P2SLoss.forward
    monkeypatch.setattr(P2SLoss, "forward", lambda *args, **kwargs: forward(*args, **kwargs) * float("nan"))
    with pytest.raises(RunError, match="step 2: the loss is nan"):
        trainer.step()
    after = (trainer.model.state_dict(), trainer.teacher.module.state_dict())
    assert same_state(before, after) and same_state(optimizer, trainer.optimizer.state_dict())
    assert trainer.scheduler.state_dict() == schedule and trainer.step_count == 1


def test_resume_without_a_checkpoint_or_with_another_geometry_is_an_error(tmp_path):
    with pytest.raises(RunError, match="no checkpoint.pt"):
        train(parse_args(run_args(tmp_path / "empty", "--resume")))
    out = tmp_path / "run"
    train(parse_args(run_args(out, "--steps", "2")))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunError, match="--queue-size 8"):
        train(parse_args(run_args(out, "--steps", "4", "--resume", "--queue-size", "4")))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_data_path_matching_nothing(tmp_path, capsys):
    pattern = str(tmp_path / "missing" / "*.nii.gz")
    assert main(run_args(tmp_path / "run", "--data", pattern)) == 1
    assert "matches no NIfTI file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_corrupted_volume_is_named_and_skip_bad_skips_it(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_volume(data / "good.nii.gz")
    (data / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    assert main(run_args(tmp_path / "run", "--data", str(data))) == 1
    assert "broken.nii.gz" in capsys.readouterr().err
    with pytest.raises(DataError, match="broken.nii.gz"):
        train(parse_args(run_args(tmp_path / "run", "--data", str(data))))

    with pytest.warns(UserWarning, match="broken.nii.gz"):
        summary = train(
            parse_args(run_args(tmp_path / "run", "--data", str(data), "--skip-bad", "--steps", "3"))
        )
    assert summary["steps"] == 3


@pytest.mark.parametrize(
    "flags",
    [
        ["--steps", "0"],
        ["--steps", "-3"],
        ["--save-every", "0"],
        ["--batch-size", "0"],
        ["--crop", "10", "--depth", "10", "--token-stride", "4"],
        ["--depth", "10", "--token-stride", "4"],
        ["--grid", "2"],
        ["--grid", "0", "2"],
        ["--lr", "nan"],
        ["--lr", "-1e-3"],
        ["--weight-decay", "-0.1"],
        ["--momentum", "1.5"],
        ["--tau-s", "0"],
        ["--temperature", "inf"],
        ["--nc-k", "16"],
        ["--warmup-steps", "60", "--steps", "60"],
        ["--w-p2p", "0", "--w-p2s", "0", "--w-nc", "0", "--w-g", "0"],
        ["--ops", "fast"],
        ["--precision", "fp16"],
        ["--clip-grad", "0"],
        ["--num-threads", "0"],
        ["--data"],
        ["--unknown-flag"],
    ],
    ids=lambda flags: " ".join(flags),
)
def test_nonsensical_flags_are_argparse_errors(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*TINY, *flags])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
