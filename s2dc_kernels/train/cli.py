"""Command line of the S2DC pretraining loop: ``s2dc-train`` and ``python -m s2dc_kernels.train``.

Defaults are sized for a 2-core CPU (the demo on nibabel's bundled MRI volumes finishes in minutes); the
official values of the S2DC paper's code are given in each flag's help.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

import torch

PROG = "s2dc-train"


def _number(
    kind: type, low: float | None = None, *, strict: bool = True, high: float | None = None
) -> Callable:
    """An argparse type: a finite ``kind`` number, above ``low`` (``strict``) or at least ``low``, at most
    ``high``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0)
non_negative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0)
non_negative_float = _number(float, 0.0, strict=False)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None and False (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``s2dc-train`` (validation of combinations is in :func:`parse_args`)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="S2DC self-supervised pretraining (patch-to-patch OT, patch-to-structure, neighbourhood "
        "consistency and global contrastive terms) on 3D NIfTI volumes.",
        formatter_class=_HelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="NIfTI files, folders (searched recursively for *.nii, *.nii.gz) or globs "
        "(default: the MRI volumes bundled with nibabel)",
    )
    run.add_argument(
        "--preset",
        choices=("ct", "mri"),
        help="intensity preset (default: mri for the bundled volumes, ct for --data)",
    )
    run.add_argument("--skip-bad", action="store_true", help="warn about and skip unreadable volumes")
    run.add_argument(
        "--out", default="runs/s2dc", metavar="DIR", help="run folder: checkpoint.pt, metrics.jsonl, loss.png"
    )
    run.add_argument("--resume", action="store_true", help="continue the run saved in DIR/checkpoint.pt")
    run.add_argument("--steps", type=positive_int, default=400, help="total optimiser steps (official 100k)")
    run.add_argument(
        "--save-every",
        type=positive_int,
        default=100,
        metavar="N",
        help="checkpoint every N steps (and at the end; official 200)",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the data order")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    run.add_argument(
        "--ops",
        choices=("fused", "reference"),
        default="fused",
        help="loss ops: fused kernels (backend=auto) or the pure-PyTorch references",
    )
    run.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="encoder autocast precision (the loss path always runs in fp32; official fp32)",
    )
    run.add_argument("--num-threads", type=positive_int, help="torch CPU threads (default: torch's choice)")

    geo = parser.add_argument_group("geometry and model")
    geo.add_argument(
        "--batch-size", type=positive_int, default=4, help="volumes per step (official 1 per GPU)"
    )
    geo.add_argument(
        "--grid",
        type=positive_int,
        nargs=2,
        default=(2, 2),
        metavar=("GX", "GY"),
        help="crops per region in x, y (official 4 4)",
    )
    geo.add_argument("--crop", type=positive_int, default=16, help="crop edge in voxels (official 96)")
    geo.add_argument(
        "--depth",
        type=positive_int,
        default=16,
        help="region and crop depth in z: one crop layer (official 96)",
    )
    geo.add_argument(
        "--token-stride",
        type=positive_int,
        default=4,
        help="voxels per token edge (official 32: 3x3x3 tokens per 96^3 crop)",
    )
    geo.add_argument(
        "--backbone",
        choices=("small", "monai-swin"),
        default="small",
        help="small strided-conv encoder, or MONAI's SwinTransformer (official; needs monai)",
    )

    opt = parser.add_argument_group("optimisation")
    opt.add_argument(
        "--lr", type=positive_float, default=3e-4, help="peak AdamW learning rate (official 3e-4)"
    )
    opt.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="AdamW weight decay")
    opt.add_argument(
        "--warmup-steps",
        type=non_negative_int,
        help="linear warm-up steps before the cosine decay to 0 (default: steps // 10; official 500)",
    )
    opt.add_argument(
        "--momentum",
        type=_number(float, 0.0, strict=False, high=1.0),
        default=0.999,
        help="EMA momentum of the teacher",
    )
    opt.add_argument("--clip-grad", type=positive_float, metavar="NORM", help="clip the gradient norm")

    loss = parser.add_argument_group("losses")
    loss.add_argument("--sinkhorn-iters", type=positive_int, default=100, help="dustbin Sinkhorn iterations")
    loss.add_argument(
        "--alpha", type=_number(float), default=1.0, help="dustbin score (fixed, as officially)"
    )
    loss.add_argument("--nc-k", type=positive_int, default=8, help="neighbours of the L_nc distributions")
    loss.add_argument("--tau-s", type=positive_float, default=0.1, help="L_nc student temperature")
    loss.add_argument("--tau-t", type=positive_float, default=0.04, help="L_nc teacher temperature")
    loss.add_argument("--temperature", type=positive_float, default=0.9, help="L_g InfoNCE temperature")
    loss.add_argument("--queue-size", type=non_negative_int, default=90, help="L_g queue of past keys")
    for term in ("p2p", "p2s", "nc", "g"):
        loss.add_argument(
            f"--w-{term}", type=non_negative_float, default=0.5, help=f"weight of L_{term} (0 turns it off)"
        )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate ``argv``; a nonsensical combination exits through ``parser.error`` (status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .data import Geometry

    stride = args.token_stride
    if args.crop % stride:
        parser.error(f"--crop {args.crop} is not divisible by --token-stride {stride}")
    try:
        geometry = Geometry(grid=tuple(args.grid), crop=args.crop, depth=args.depth, token_stride=stride)
    except ValueError as err:
        parser.error(f"geometry: {err}")
    if args.nc_k >= geometry.n_tokens:
        parser.error(f"--nc-k {args.nc_k} must be smaller than the {geometry.n_tokens} tokens of a z-layer")
    if args.w_g > 0 and geometry.n_crops < 2 and args.queue_size == 0:
        parser.error("L_g needs negatives: use a grid of >= 2 crops or --queue-size > 0 (or --w-g 0)")
    if args.w_p2p == args.w_p2s == args.w_nc == args.w_g == 0:
        parser.error("all loss weights are 0: nothing to train")
    if args.warmup_steps is None:
        args.warmup_steps = args.steps // 10
    elif args.warmup_steps >= args.steps:
        parser.error(f"--warmup-steps {args.warmup_steps} must be smaller than --steps {args.steps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.preset is None:
        args.preset = "mri" if args.data is None else "ct"
    args.grid = tuple(args.grid)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``s2dc-train``: 0 on success, 1 on a data or run-folder error (message on stderr)."""
    from .data import DataError
    from .loop import RunError, train

    args = parse_args(argv)
    try:
        train(args)
    except (DataError, RunError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0
