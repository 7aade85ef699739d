"""The S2DC pretraining loop: one step, checkpoints that resume bit for bit, metrics and the loss plot.

A step (B volumes): the student encodes the source crops, the EMA teacher encodes the affine-warped crops
(token terms) and the separately augmented crops (global term); the loss path runs in fp32 on the public
ops (``--ops fused``) or their references (``--ops reference``); AdamW, warm-up + cosine schedule, EMA update.

Run folder (``--out DIR``): ``checkpoint.pt`` (atomic: temp file, fsync, rename), ``metrics.jsonl`` (one JSON
line per step), ``loss.png`` (the terms against the step, at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .._utils import all_finite, value_checks
from .data import Geometry, Views, VolumeDataset, bundled_volumes, collate, find_volumes
from .losses import GlobalLoss, NCLoss, P2PLoss, P2SLoss, token_scores
from .model import EMATeacher, S2DCModel

TERMS = ("p2p", "p2s", "nc", "g")
TOKEN_TERMS = ("p2p", "p2s", "nc")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
# Settings that fix the shapes of the saved state: a resumed run must keep them.
STATE_SHAPING_ARGS = ("grid", "crop", "depth", "token_stride", "backbone", "queue_size")


class RunError(RuntimeError):
    """The run cannot go on: the run folder does not fit the request (a run already there without --resume,
    or none to resume), or the loss is no longer finite."""


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LambdaLR factor after ``s`` steps: linear warm-up to 1 over ``warmup_steps``, then cosine to 0."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """Everything a run holds: data, student, EMA teacher, losses, optimiser, schedule and the data generator.

    ``step()`` runs one optimiser step and returns its metrics; ``state_dict``/``load_state_dict`` cover all
    of it (RNG states included), so a resumed run continues exactly where the checkpoint left it.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.geometry = Geometry(
            grid=tuple(args.grid), crop=args.crop, depth=args.depth, token_stride=args.token_stride
        )
        paths = find_volumes(args.data) if args.data else bundled_volumes()
        self.dataset = VolumeDataset(paths, self.geometry, preset=args.preset, skip_bad=args.skip_bad)

        torch.manual_seed(args.seed)
        self.generator = torch.Generator().manual_seed(args.seed)  # data order, views, L_g's crop choice
        self.model = S2DCModel(self.geometry, backbone=args.backbone).to(self.device)
        self.teacher = EMATeacher(self.model, momentum=args.momentum)
        self.weights = {term: getattr(args, f"w_{term}") for term in TERMS}
        self.losses = nn.ModuleDict(
            {
                "p2p": P2PLoss(args.ops, n_iters=args.sinkhorn_iters, alpha=args.alpha),
                "p2s": P2SLoss(args.ops),
                "nc": NCLoss(args.ops, k=args.nc_k, tau_s=args.tau_s, tau_t=args.tau_t),
                "g": GlobalLoss(args.ops, self.model.proj, args.temperature, args.queue_size),
            }
        ).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(args.warmup_steps, args.steps)
        )
        self.autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
        self.step_count = 0

    def _batch(self) -> Views:
        """B volumes drawn (with replacement) and their views, all from ``self.generator``."""
        indices = torch.randint(len(self.dataset), (self.args.batch_size,), generator=self.generator)
        views = collate([self.dataset.sample(int(i), self.generator, self.device) for i in indices])
        return views.to(self.device)

    def _sync(self) -> None:
        """Wait for queued CUDA work, so that perf_counter brackets the kernels themselves."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _encode(self, crops: torch.Tensor, encoder) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, Z, N, d), pooled (B, n_crops, d)) in fp32, the encoder under the chosen autocast."""
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            tokens, pooled = encoder(crops)
        return tokens.float(), pooled.float()

    def _diverged(self, what: str) -> RunError:
        """The error that stops a run whose step went non-finite (before the update)."""
        return RunError(
            f"step {self.step_count + 1}: {what}: training diverged; the model was not updated and the last "
            "checkpoint stays (try a lower --lr, --clip-grad or --precision fp32)"
        )

    def step(self) -> dict:
        """One optimiser step; returns its metrics line (``None`` for terms whose weight is 0)."""
        views = self._batch()
        use_tokens = any(self.weights[t] > 0 for t in TOKEN_TERMS)
        use_global = self.weights["g"] > 0

        self._sync()
        start = time.perf_counter()
        student_tokens, student_pooled = self._encode(views.source, self.model)
        if use_tokens:
            teacher_tokens, _ = self._encode(views.teacher, self.teacher)
        if use_global:
            _, teacher_keys = self._encode(views.augmented, self.teacher)
        self._sync()
        encoder_done = time.perf_counter()
        outputs = [student_tokens, student_pooled]
        if use_tokens:
            outputs.append(teacher_tokens)
        if use_global:
            outputs.append(teacher_keys)
        if not all_finite(*outputs):  # fp32 (see _encode); the kernels below take them unscanned
            raise self._diverged("the encoders' outputs are not finite")

        # The loss path in fp32 (the OT and similarity kernels take fp32/fp64 inputs), forward and backward
        # down to the encoder's outputs, taken as detached leaves (their gradients are then the loss path's
        # alone, whatever the encoder shares between tokens and pooled rows). The ops' input scans (host
        # syncs) are off: the encoder outputs were checked above, the loss is checked once.
        terms = {}
        tokens, pooled = (t.detach().requires_grad_() for t in (student_tokens, student_pooled))
        with value_checks(False):
            if self.weights["p2p"] > 0 or self.weights["p2s"] > 0:  # their shared q k^T, computed once
                scores = token_scores(tokens, teacher_tokens)
            for term in ("p2p", "p2s"):
                if self.weights[term] > 0:
                    terms[term] = self.losses[term](tokens, teacher_tokens, views.truth, scores=scores)
            if self.weights["nc"] > 0:
                terms["nc"] = self.losses["nc"](tokens, teacher_tokens, views.truth)
            if use_global:
                terms["g"] = self.losses["g"](pooled, teacher_keys, self.generator)
            loss = sum(self.weights[t] * value for t, value in terms.items())
            grads = torch.autograd.grad(loss, (tokens, pooled), allow_unused=True)
        self._sync()
        loss_done = time.perf_counter()
        if not torch.isfinite(loss):
            values = ", ".join(f"{t} {value.item():.4g}" for t, value in terms.items())
            raise self._diverged(f"the loss is {loss.item()} ({values})")

        self.optimizer.zero_grad(set_to_none=True)
        used = [(t, g) for t, g in zip((student_tokens, student_pooled), grads, strict=True) if g is not None]
        torch.autograd.backward([t for t, _ in used], [g for _, g in used])  # the encoders' backward
        if self.args.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.teacher.update(self.model)
        self._sync()
        self.step_count += 1
        return {
            "step": self.step_count,
            "loss": loss.item(),
            **{t: (terms[t].item() if t in terms else None) for t in TERMS},
            "time_loss_s": loss_done - encoder_done,
            "time_encoder_s": encoder_done - start,
            "time_step_s": time.perf_counter() - start,
            "lr": lr,
        }

    def state_dict(self) -> dict:
        """The whole run state: weights, optimiser, schedule, L_g queue, RNG and data-generator states."""
        return {
            "step": self.step_count,
            "args": _plain_args(self.args),
            "model": self.model.state_dict(),
            "teacher": self.teacher.module.state_dict(),
            "losses": self.losses.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; settings that shape the state must match (RunError naming them)."""
        saved = state["args"]
        changed = [k for k in STATE_SHAPING_ARGS if saved.get(k) != _plain_args(self.args).get(k)]
        if changed:
            detail = ", ".join(
                f"--{k.replace('_', '-')} {saved[k]} (now {_plain_args(self.args)[k]})" for k in changed
            )
            raise RunError(f"the checkpoint was written with {detail}; resume with the same settings")
        self.model.load_state_dict(state["model"])
        self.teacher.module.load_state_dict(state["teacher"])
        self.losses.load_state_dict(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["data_generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step_count = state["step"]


def _plain_args(args: argparse.Namespace) -> dict:
    """The arguments as plain Python values (tuples as lists), safe for ``torch.load(weights_only=True)``."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def save_atomically(state: dict, path: Path) -> None:
    """torch.save to a temp file next to ``path``, fsync, then rename over it: a crash leaves the old file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same file system, so the rename is atomic
    try:
        with open(tmp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
            lines.append(json.loads(line))
    return lines


def _prepare_out(out: Path, resume: bool) -> dict | None:
    """Check the run folder (create it for a new run); on resume return the checkpoint's state."""
    checkpoint = out / CHECKPOINT
    if not resume:
        present = [name for name in (CHECKPOINT, METRICS, PLOT) if (out / name).exists()]
        if present:
            raise RunError(
                f"{str(out)!r} already holds a run ({', '.join(present)}); pass --resume to continue it "
                "or choose another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        return None
    if not checkpoint.exists():
        raise RunError(f"--resume: no {CHECKPOINT} in {str(out)!r}")
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def _cut_metrics(path: Path, step: int) -> None:
    """Drop the lines past ``step``: a run killed after its checkpoint wrote them; the resumed run redoes
    those steps."""
    kept = [m for m in _read_metrics(path) if m["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
    os.replace(tmp, path)


def _moving_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (single steps are noisy: one query per volume in L_g)."""
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(window, i + 1) for i in range(len(values))]


def plot_losses(metrics: list[dict], path: Path) -> bool:
    """Plot the total loss and each active term against the step into ``path`` (faint: per step, solid: a
    moving mean over a twentieth of the run); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [m["step"] for m in metrics]
    window = max(1, len(metrics) // 20)
    for key in ("loss", *TERMS):
        if all(m.get(key) is not None for m in metrics):
            values = [m[key] for m in metrics]
            (line,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
            label = "total" if key == "loss" else f"L_{key}"
            ax.plot(steps, _moving_mean(values, window), color=line.get_color(), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (solid: mean of the last {window} steps)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


@contextlib.contextmanager
def _torch_settings(num_threads: int | None, device: str) -> Iterator[None]:
    """Thread count and (on CPU, where it costs nothing) deterministic kernels for the run, restored
    afterwards: train() also runs in-process."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _progress(total: int, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:
        print("s2dc-train: tqdm is not installed, no progress bar (pip install tqdm)")
        return None
    return tqdm(total=total, initial=initial, desc="s2dc", unit="step", dynamic_ncols=True)


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) the training described by ``args`` (from :func:`s2dc_kernels.train.cli.parse_args`).

    Returns the summary: ``steps`` (total reached), ``steps_run`` (in this call), ``first_loss`` and
    ``final_loss`` (steps 1 and last, resumed parts included), ``start_loss_mean`` and ``end_loss_mean``
    (means over the first and last tenth of the steps: single steps are noisy), ``wall_s``, ``steps_per_s``,
    ``out``.
    """
    out = Path(args.out)
    with _torch_settings(args.num_threads, args.device):
        trainer = Trainer(args)  # data errors surface before the run folder is touched
        state = _prepare_out(out, args.resume)
        if state is not None:
            trainer.load_state_dict(state)
            _cut_metrics(out / METRICS, trainer.step_count)
        start_step = trainer.step_count
        bar = _progress(args.steps, start_step)
        started = time.perf_counter()
        with open(out / METRICS, "a") as metrics_file:
            while trainer.step_count < args.steps:
                metrics = trainer.step()
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                if bar is not None:
                    shown = {k: f"{metrics[k]:.3f}" for k in ("loss", *TERMS) if metrics[k] is not None}
                    bar.set_postfix(shown, refresh=False)
                    bar.update(1)
                if trainer.step_count % args.save_every == 0 or trainer.step_count == args.steps:
                    save_atomically(trainer.state_dict(), out / CHECKPOINT)
        wall = time.perf_counter() - started
        if bar is not None:
            bar.close()

    history = _read_metrics(out / METRICS)
    plotted = plot_losses(history, out / PLOT)
    steps_run = trainer.step_count - start_step
    losses = [m["loss"] for m in history] or [float("nan")]
    window = max(1, len(losses) // 10)
    summary = {
        "steps": trainer.step_count,
        "steps_run": steps_run,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "start_loss_mean": sum(losses[:window]) / window,
        "end_loss_mean": sum(losses[-window:]) / window,
        "wall_s": wall,
        "steps_per_s": steps_run / wall if wall > 0 else float("nan"),
        "out": str(out),
    }
    note = "" if plotted else " (no loss.png: matplotlib is not installed)"
    print(
        f"s2dc-train: {steps_run} steps in {wall:.1f} s ({summary['steps_per_s']:.2f} steps/s); loss "
        f"{summary['start_loss_mean']:.4f} -> {summary['end_loss_mean']:.4f} (means of the first / last "
        f"{window} steps), step {summary['steps']} loss {summary['final_loss']:.4f}; run folder {out}{note}",
        flush=True,
    )
    return summary
