"""Volumes and views for S2DC pretraining (docs/method.md section 1).

Pipeline per volume: NIfTI load (nibabel) -> reorientation to canonical RAS -> intensity preset to [0, 1]
-> a region cut at a random position -> three views (source crops, teacher crops after one affine on the
whole region, per-crop augmented crops) and the ground-truth token correspondence G of that affine.

Affine convention (one place, used by the teacher view AND by G):
    voxel coordinates p = (x, y, z) index the region tensor (X, Y, Z); voxel centres sit at integers,
    the region centre is c = ((X - 1) / 2, (Y - 1) / 2, (Z - 1) / 2).
    ``affine`` A (3, 4) = [M | b] maps a TEACHER voxel coordinate to the SOURCE coordinate it samples:
        p_source = M p_teacher + b,   teacher[p] = source[A p]   (trilinear, zeros outside the region)
    built as a rotation about z by theta and an isotropic in-plane scale s about the region centre, plus a
    shift t = (t_x, t_y, 0):
        M = [[s cos, -s sin, 0], [s sin, s cos, 0], [0, 0, 1]],   b = c + t - M c
    ``warp_region`` turns exactly this A into the normalised ``theta`` of ``F.affine_grid`` (align_corners
    False), and ``correspondence`` maps teacher token centres through the same A, so G and the teacher
    view cannot disagree (tests/test_train_data.py checks both against a bright voxel).
"""

from __future__ import annotations

import glob
import importlib.resources
import math
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from s2dc_kernels._utils import check_choice

PRESETS = ("ct", "mri")
CT_WINDOW_HU = (-1000.0, 1000.0)
MRI_PERCENTILES = (0.5, 99.5)
MAX_ROTATION_DEG = 30.0
MAX_SHIFT_FRACTION = 24.0 / 384.0  # official: up to 24 voxels on a 384-voxel region edge
SCALE_RANGE = (0.9, 1.2)
FLIP_PROBABILITY = 0.5
INTENSITY_JITTER = 0.1  # augmented crop = crop * (1 + U(-j, j)) + U(-j, j)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
BUNDLED_NAMES = ("anatomical.nii", "example4d.nii.gz")


class DataError(ValueError):
    """A volume or a data path that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Geometry:
    """Crop and token layout of one region (CPU-sized defaults; official values in the comments).

    region = (grid[0] * crop, grid[1] * crop, depth); each crop is tiled into tokens of token_stride^3
    voxels; one z-layer of tokens is one matching problem of N = grid[0] * t * grid[1] * t tokens, ordered
    row-major over (x_token, y_token) of the whole region: n = X * (grid[1] * t) + Y.
    """

    grid: tuple[int, int] = (2, 2)  # crops in x, y (official 4 x 4)
    crop: int = 16  # crop edge in voxels (official 96)
    depth: int = 16  # region depth in z = crop depth: one crop layer in z (official 96)
    token_stride: int = 4  # voxels per token edge (official 32: 3x3x3 tokens per 96^3 crop)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(self.grid))
        if len(self.grid) != 2:
            raise ValueError(f"grid must have two entries (crops in x, y), got {self.grid}")
        values = {"grid x": self.grid[0], "grid y": self.grid[1], "crop": self.crop, "depth": self.depth}
        values["token_stride"] = self.token_stride
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("crop", "depth"):
            if values[name] % self.token_stride:
                stride = self.token_stride
                raise ValueError(f"{name} ({values[name]}) must be divisible by token_stride ({stride})")

    @property
    def region(self) -> tuple[int, int, int]:
        """Region size (X, Y, Z) in voxels."""
        return (self.grid[0] * self.crop, self.grid[1] * self.crop, self.depth)

    @property
    def tokens_per_crop(self) -> int:
        """Tokens per crop edge in x and y, t = crop // token_stride."""
        return self.crop // self.token_stride

    @property
    def n_crops(self) -> int:
        """Crops per region, grid[0] * grid[1]."""
        return self.grid[0] * self.grid[1]

    @property
    def z_layers(self) -> int:
        """Token layers in z (matching problems per volume), depth // token_stride."""
        return self.depth // self.token_stride

    @property
    def n_tokens(self) -> int:
        """Tokens per z-layer problem, N = grid[0] * t * grid[1] * t."""
        return self.n_crops * self.tokens_per_crop**2


@dataclass
class Views:
    """The views of one volume (``collate`` adds a leading batch dim B to every field).

    source (n_crops, 1, c, c, d): the region's crops, row-major over (crop_x, crop_y).
    teacher (n_crops, 1, c, c, d): the crops of the region after ONE affine (``affine``).
    augmented (n_crops, 1, c, c, d): each source crop flipped and intensity-jittered on its own.
    truth (N, N) float 0/1: rows source tokens, columns teacher tokens of one z-layer (shared by all).
    affine (3, 4) float32: teacher voxel -> source voxel coordinates (module docstring).
    """

    source: torch.Tensor
    teacher: torch.Tensor
    augmented: torch.Tensor
    truth: torch.Tensor
    affine: torch.Tensor

    def to(self, device: torch.device | str) -> Views:
        """A copy with every field on ``device``."""
        return Views(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def collate(views: list[Views]) -> Views:
    """Stack B volumes' views: every field gains a leading dim B."""
    if not views:
        raise ValueError("collate needs at least one Views")
    return Views(**{f.name: torch.stack([getattr(v, f.name) for v in views]) for f in fields(Views)})


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def _nifti_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and _is_nifti(p)]


def find_volumes(paths: Sequence[str | Path]) -> list[Path]:
    """The NIfTI files named by ``paths``: files, folders (recursive *.nii, *.nii.gz) or globs.

    Returns them sorted and deduplicated; a path or glob that matches no NIfTI file raises DataError.
    A file named explicitly is taken as it is (a bad one fails later, in ``load_volume``, by name).
    """
    found: set[Path] = set()
    for path in paths:
        path = str(path)
        candidate = Path(path).expanduser()
        if candidate.is_file():
            matches = [candidate]
        elif candidate.is_dir():
            matches = _nifti_under(candidate)
        else:
            matches = []
            for hit in map(Path, glob.glob(str(candidate), recursive=True)):
                matches += _nifti_under(hit) if hit.is_dir() else [hit] if _is_nifti(hit) else []
        if not matches:
            raise DataError(f"data path {path!r} matches no NIfTI file (*.nii, *.nii.gz)")
        found.update(m.resolve() for m in matches)
    return sorted(found)


def bundled_volumes() -> list[Path]:
    """nibabel's bundled test volumes (anatomical.nii 33x41x25, example4d.nii.gz 128x96x24x2).

    Read through importlib.resources; copied to a temporary folder when the package is not on the file
    system (zipped install).
    """
    data = importlib.resources.files("nibabel.tests.data")
    paths = []
    for name in BUNDLED_NAMES:
        resource = data / name
        if isinstance(resource, Path) and resource.is_file():
            paths.append(resource)
            continue
        copy = Path(tempfile.mkdtemp(prefix="s2dc_bundled_")) / name
        with resource.open("rb") as src, copy.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        paths.append(copy)
    return paths


def _normalise(data, preset: str):
    """Intensity preset to [0, 1]: CT window [-1000, 1000] HU, or MRI 0.5 / 99.5 percentile clip."""
    import numpy as np  # here, not at import: the losses and benchmarks run without numpy

    data = np.nan_to_num(data, nan=0.0, posinf=np.finfo(np.float32).max, neginf=np.finfo(np.float32).min)
    if preset == "ct":
        low, high = CT_WINDOW_HU
    else:
        low, high = (float(v) for v in np.percentile(data, MRI_PERCENTILES))
    if high <= low:  # constant volume: nothing to scale
        return np.zeros_like(data, dtype=np.float32)
    # clip after scaling so that rounding cannot leave [0, 1]
    return np.clip((data - np.float32(low)) / np.float32(high - low), 0.0, 1.0).astype(np.float32)


def load_volume(path: str | Path, preset: str) -> torch.Tensor:
    """Load one NIfTI volume as (X, Y, Z) float32 in [0, 1], reoriented to canonical RAS.

    4D images give their first frame; trailing singleton dims beyond the third are ignored. Corrupted,
    empty, unreadable or non-3D/4D files raise DataError naming the file.
    """
    import nibabel as nib
    import numpy as np

    check_choice("preset", preset, PRESETS)
    path = Path(path)
    try:
        image = nib.load(str(path))
        shape = tuple(image.shape)
    except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors, ...
        raise DataError(f"{path}: cannot read as NIfTI ({type(err).__name__}: {err})") from err
    kept = shape
    while len(kept) > 3 and kept[-1] == 1:
        kept = kept[:-1]
    if len(kept) not in (3, 4):
        raise DataError(f"{path}: expected a 3D or 4D image, got shape {shape}")
    if min(kept) == 0:
        raise DataError(f"{path}: the image is empty (shape {shape})")
    try:
        canonical = nib.as_closest_canonical(image)
        frame = (slice(None),) * 3 + (0,) * (len(shape) - 3)
        data = np.asarray(canonical.dataobj[frame], dtype=np.float32)
    except Exception as err:
        raise DataError(f"{path}: cannot read the image data ({type(err).__name__}: {err})") from err
    return torch.from_numpy(_normalise(data, preset))


def affine_matrix(
    region: Sequence[int], angle_deg: float, shift_xy: Sequence[float], scale: float
) -> torch.Tensor:
    """(3, 4) float32 A = [M | b], teacher voxel -> source voxel coordinates (module docstring).

    Rotation by ``angle_deg`` about z and isotropic in-plane ``scale`` about the region centre
    c = (size - 1) / 2, then the shift (t_x, t_y, 0): p_source = M (p_teacher - c) + c + t.
    """
    angle = math.radians(angle_deg)
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    linear = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    centre = (torch.tensor(region, dtype=torch.float64) - 1) / 2
    shift = torch.tensor([shift_xy[0], shift_xy[1], 0.0], dtype=torch.float64)
    return torch.cat([linear, (centre + shift - linear @ centre)[:, None]], 1).float()


def random_affine(geometry: Geometry, generator: torch.Generator) -> torch.Tensor:
    """(3, 4) A with rotation U(+-30 deg) about z, shift U(+-24/384 region edge) in x/y, scale U(0.9, 1.2)."""
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    angle = (2 * u[0] - 1) * MAX_ROTATION_DEG
    shift = [(2 * u[i + 1] - 1) * MAX_SHIFT_FRACTION * geometry.region[i] for i in range(2)]
    scale = SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * u[3]
    return affine_matrix(geometry.region, angle, shift, scale)


def warp_region(region: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """teacher[p] = region[A p] for region (X, Y, Z): trilinear, zeros outside. Returns (X, Y, Z).

    grid_sample's normalised coordinate u (align_corners=False) of voxel p along an axis of size S is
    u = (2 p + 1) / S - 1, i.e. p = D u + c with D = S / 2, c = (S - 1) / 2. Substituting in
    p_src = M p + b gives u_src = (D^-1 M D) u + D^-1 (M c + b - c). The input is (1, 1, X, Y, Z), so
    grid_sample's (x, y, z) components index (Z, Y, X): theta is that map with the axes reversed.
    """
    size = torch.tensor(region.shape, dtype=torch.float64)
    half, centre = size / 2, (size - 1) / 2
    linear, offset = affine[:, :3].double(), affine[:, 3].double()
    normalised_linear = linear * half[None, :] / half[:, None]
    normalised_offset = (linear @ centre + offset - centre) / half
    reverse = [2, 1, 0]
    theta = torch.cat([normalised_linear[reverse][:, reverse], normalised_offset[reverse, None]], 1)
    theta = theta.to(region.device)
    grid = F.affine_grid(theta[None], [1, 1, *region.shape], align_corners=False).to(region.dtype)
    # mode "bilinear" on a 5D input is trilinear interpolation
    warped = F.grid_sample(
        region[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return warped[0, 0]


def token_centres(geometry: Geometry) -> torch.Tensor:
    """(N, 2) float64 in-plane voxel coordinates of the token centres of one z-layer, order n = X * Ty + Y."""
    s, t = geometry.token_stride, geometry.tokens_per_crop
    xs = torch.arange(geometry.grid[0] * t, dtype=torch.float64) * s + (s - 1) / 2
    ys = torch.arange(geometry.grid[1] * t, dtype=torch.float64) * s + (s - 1) / 2
    return torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)


def correspondence(
    affine: torch.Tensor, geometry: Geometry, max_distance: float | None = 0.5
) -> torch.Tensor:
    """Ground truth G (N, N) float32 0/1: rows source tokens, columns teacher tokens of one z-layer.

    Teacher token centre q_j goes through the in-plane part of A to A q_j (source coordinates); with
    d_ij = |p_i - A q_j| to the source token centres p_i, (i, j) is kept when j is i's nearest teacher
    token, i is j's nearest source token, and d_ij < max_distance * token_stride (None: no distance
    limit). On the official geometry (12 x 12 tokens) and random affines, about 93 of 144 rows are matched
    with the default 0.5 and about 113 with None (docs/method.md: "about 110"). A must leave z alone (true for
    ``random_affine``), so every z-layer shares G.
    """
    affine = affine.double()
    if affine[:2, 2].abs().max() > 0 or not torch.equal(affine[2], affine.new_tensor([0.0, 0.0, 1.0, 0.0])):
        raise ValueError(f"correspondence needs an in-plane affine (z unchanged), got\n{affine}")
    centres = token_centres(geometry)
    mapped = centres @ affine[:2, :2].T + affine[:2, 3]
    distance = torch.cdist(centres, mapped)  # (source i, teacher j)
    nearest_teacher = distance.argmin(1)
    nearest_source = distance.argmin(0)
    rows = torch.arange(len(centres))
    keep = nearest_source[nearest_teacher] == rows
    if max_distance is not None:
        keep &= distance[rows, nearest_teacher] < max_distance * geometry.token_stride
    truth = torch.zeros(len(centres), len(centres))
    truth[rows[keep], nearest_teacher[keep]] = 1.0
    return truth


def split_crops(region: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """(X, Y, Z) region -> (n_crops, 1, c, c, d) crops, row-major over (crop_x, crop_y)."""
    (gx, gy), c = geometry.grid, geometry.crop
    crops = region.reshape(gx, c, gy, c, geometry.depth).permute(0, 2, 1, 3, 4)
    return crops.reshape(gx * gy, 1, c, c, geometry.depth)


def augment_crops(crops: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each crop (n, 1, c, c, d) on its own: flip each spatial axis with p = 0.5, then x (1 + g) + o
    with g, o ~ U(-0.1, 0.1)."""
    n = crops.shape[0]
    flips = torch.rand(n, 3, generator=generator) < FLIP_PROBABILITY
    gain = 1 + (2 * torch.rand(n, generator=generator) - 1) * INTENSITY_JITTER
    offset = (2 * torch.rand(n, generator=generator) - 1) * INTENSITY_JITTER
    out = []
    for i in range(n):
        dims = [1 + axis for axis in range(3) if flips[i, axis]]
        crop = crops[i].flip(dims) if dims else crops[i]
        out.append(crop * gain[i] + offset[i])
    return torch.stack(out)


class VolumeDataset:
    """Volumes loaded once (float32, canonical, preset applied) and the views drawn from them.

    A bad file, or a volume smaller than the region in any axis, raises DataError naming the file; with
    ``skip_bad=True`` it is skipped with a warning naming it. No usable volume at all raises DataError.
    """

    def __init__(
        self, paths: Sequence[Path], geometry: Geometry, preset: str = "mri", skip_bad: bool = False
    ) -> None:
        check_choice("preset", preset, PRESETS)
        self.geometry = geometry
        self.paths: list[Path] = []
        self.volumes: list[torch.Tensor] = []
        for path in paths:
            try:
                volume = load_volume(path, preset)
                if any(v < r for v, r in zip(volume.shape, geometry.region, strict=True)):
                    raise DataError(
                        f"{path}: volume shape {tuple(volume.shape)} (canonical) is smaller than the region "
                        f"{geometry.region} in some axis"
                    )
            except DataError as err:
                if not skip_bad:
                    raise
                warnings.warn(f"skipping a bad volume: {err}", UserWarning, stacklevel=2)
                continue
            self.paths.append(Path(path))
            self.volumes.append(volume)
        if not self.volumes:
            raise DataError(f"no usable volume among {len(paths)} path(s): {[str(p) for p in paths]}")

    def __len__(self) -> int:
        return len(self.volumes)

    def sample(self, index: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Views:
        """The views of volume ``index``; the region position, affine and augmentations come from
        ``generator`` only (in that order), so equal generator states give equal views.

        The region is moved to ``device`` before it is warped, cropped and augmented (the trilinear warp
        of a 384 x 384 x 96 region takes ~0.5 s on 2 CPU cores, well under a millisecond on a GPU); the
        random draws stay on the CPU generator, so the views do not depend on the device beyond rounding.
        """
        volume, geometry = self.volumes[index], self.geometry
        origin = [
            int(torch.randint(0, v - r + 1, (1,), generator=generator))
            for v, r in zip(volume.shape, geometry.region, strict=True)
        ]
        region = volume[tuple(slice(o, o + r) for o, r in zip(origin, geometry.region, strict=True))]
        region = region.to(device)
        affine = random_affine(geometry, generator)
        source = split_crops(region, geometry)
        return Views(
            source=source,
            teacher=split_crops(warp_region(region, affine), geometry),
            augmented=augment_crops(source, generator),
            truth=correspondence(affine, geometry, max_distance=None),  # official: mutual nearest only
            affine=affine,
        )
