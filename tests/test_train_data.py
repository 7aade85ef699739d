"""S2DC pretraining data: geometry, affine convention, ground truth G, views, loading, bad input."""

import itertools
import re

import numpy as np
import pytest
import torch

from s2dc_kernels.train.data import (
    DataError,
    Geometry,
    Views,
    VolumeDataset,
    affine_matrix,
    bundled_volumes,
    collate,
    correspondence,
    find_volumes,
    load_volume,
    split_crops,
    token_centres,
    warp_region,
)

nib = pytest.importorskip("nibabel")  # training only needs it; a bare GPU machine may lack it


def save_nifti(path, data, affine=None):
    nib.save(
        nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4) if affine is None else affine), path
    )
    return path


def map_points(affine, points):
    """A p for points (..., 3) in voxel coordinates."""
    return points @ affine[:, :3].double().T + affine[:, 3].double()


def inverse_map(affine, point):
    """A^-1 p: the teacher voxel that samples source voxel p."""
    linear, offset = affine[:, :3].double(), affine[:, 3].double()
    return torch.linalg.solve(linear, torch.as_tensor(point, dtype=torch.float64) - offset)


def token_grid(geometry):
    """(Tx, Ty): tokens per z-layer in x and y."""
    return geometry.grid[0] * geometry.tokens_per_crop, geometry.grid[1] * geometry.tokens_per_crop


def token_means(region, geometry):
    """(Z_layers, N) mean voxel value of every token, order n = X * Ty + Y."""
    s = geometry.token_stride
    tx, ty = token_grid(geometry)
    blocks = region.reshape(tx, s, ty, s, geometry.z_layers, s).mean((1, 3, 5))
    return blocks.permute(2, 0, 1).reshape(geometry.z_layers, -1)


def unsplit_crops(crops, geometry):
    """Inverse of split_crops: (n_crops, 1, c, c, d) -> (X, Y, Z)."""
    (gx, gy), c = geometry.grid, geometry.crop
    return crops.reshape(gx, gy, c, c, geometry.depth).permute(0, 2, 1, 3, 4).reshape(geometry.region)


# ---------------------------------------------------------------------------------------------- geometry


def test_geometry_derived_sizes():
    geometry = Geometry()
    assert geometry.region == (32, 32, 16)
    assert (geometry.tokens_per_crop, geometry.n_crops, geometry.z_layers, geometry.n_tokens) == (4, 4, 4, 64)
    official = Geometry(grid=(4, 4), crop=96, depth=96, token_stride=32)
    assert official.region == (384, 384, 96)
    assert (official.tokens_per_crop, official.n_crops, official.z_layers, official.n_tokens) == (
        3,
        16,
        3,
        144,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"crop": 10}, "crop"),
        ({"depth": 6}, "depth"),
        ({"token_stride": 0}, "token_stride"),
        ({"grid": (0, 2)}, "grid x"),
        ({"grid": (2, 2, 2)}, "grid"),
    ],
)
def test_geometry_rejects_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Geometry(**kwargs)


def test_token_order_and_crop_order():
    geometry = Geometry(grid=(3, 2), crop=8, depth=8, token_stride=4)
    centres = token_centres(geometry)
    tx, ty = token_grid(geometry)
    assert centres.shape == (tx * ty, 2)
    n = 1 * ty + 2  # X = 1, Y = 2
    assert centres[n].tolist() == [1 * 4 + 1.5, 2 * 4 + 1.5]
    region = torch.arange(24 * 16 * 8, dtype=torch.float32).reshape(24, 16, 8)
    crops = split_crops(region, geometry)
    assert crops.shape == (6, 1, 8, 8, 8)
    # crop index = crop_x * grid[1] + crop_y
    assert torch.equal(crops[1 * 2 + 1, 0], region[8:16, 8:16, :])
    assert torch.equal(unsplit_crops(crops, geometry), region)


# ------------------------------------------------------------------------------ ground truth G and affine


def test_truth_identity_is_eye():
    geometry = Geometry(grid=(3, 2), crop=8, depth=8, token_stride=4)
    affine = affine_matrix(geometry.region, 0.0, (0.0, 0.0), 1.0)
    assert torch.equal(affine, torch.cat([torch.eye(3), torch.zeros(3, 1)], 1))
    assert torch.equal(correspondence(affine, geometry), torch.eye(geometry.n_tokens))


@pytest.mark.parametrize("axis", [0, 1])
def test_truth_one_token_shift_is_shifted_diagonal(axis):
    geometry = Geometry(grid=(3, 2), crop=8, depth=8, token_stride=4)
    shift = [0.0, 0.0]
    shift[axis] = float(geometry.token_stride)
    truth = correspondence(affine_matrix(geometry.region, 0.0, shift, 1.0), geometry)
    tx, ty = token_grid(geometry)
    expected = torch.zeros(tx * ty, tx * ty)
    # teacher token (X, Y) samples source position (X, Y) + one token along ``axis``
    for x, y in itertools.product(range(tx), range(ty)):
        xs, ys = (x + 1, y) if axis == 0 else (x, y + 1)
        if xs < tx and ys < ty:
            expected[xs * ty + ys, x * ty + y] = 1
    assert torch.equal(truth, expected)
    source_rows = torch.arange(tx * ty).reshape(tx, ty)
    border = source_rows[0] if axis == 0 else source_rows[:, 0]
    assert truth[border].sum() == 0  # source tokens on the border that nothing maps to stay unmatched


def test_truth_rotation_90_is_rotated_permutation():
    geometry = Geometry(grid=(2, 2), crop=12, depth=12, token_stride=4)
    truth = correspondence(affine_matrix(geometry.region, 90.0, (0.0, 0.0), 1.0), geometry)
    tx, ty = token_grid(geometry)
    assert torch.equal(truth.sum(0), torch.ones(tx * ty)) and torch.equal(truth.sum(1), torch.ones(tx * ty))
    # p_src - c = R90 (q - c): x_src = cx - (q_y - cy), y_src = cy + (q_x - cx)
    for x, y in itertools.product(range(tx), range(ty)):
        assert truth[(tx - 1 - y) * ty + x, x * ty + y] == 1


def test_truth_is_mutual_nearest_within_half_token():
    geometry = Geometry(grid=(3, 3), crop=12, depth=12, token_stride=4)
    affine = affine_matrix(geometry.region, 21.0, (1.7, -2.4), 1.13)
    truth = correspondence(affine, geometry)
    loose = correspondence(affine, geometry, max_distance=None)
    centres = token_centres(geometry)
    mapped = centres @ affine[:2, :2].double().T + affine[:2, 3].double()
    distance = torch.cdist(centres, mapped)
    assert truth.sum(0).max() <= 1 and truth.sum(1).max() <= 1
    for i, j in truth.nonzero().tolist():
        assert distance[i].argmin() == j and distance[:, j].argmin() == i and distance[i, j] < 2
    assert torch.all(truth <= loose) and loose.sum() > truth.sum() > 0


def test_bright_voxel_lands_where_the_affine_says():
    region = torch.zeros(48, 32, 16)  # X != Y != Z: any axis mix-up moves the voxel
    source_voxel = (30, 10, 5)
    region[source_voxel] = 1.0
    affine = affine_matrix(region.shape, 90.0, (2.0, -3.0), 1.0)
    teacher_voxel = inverse_map(affine, source_voxel)
    assert torch.allclose(teacher_voxel, teacher_voxel.round(), atol=1e-9)  # integer: exact sampling
    teacher = warp_region(region, affine)
    expected = torch.zeros_like(region)
    expected[tuple(int(v) for v in teacher_voxel.round())] = 1.0
    torch.testing.assert_close(teacher, expected, atol=1e-5, rtol=0)


def test_bright_voxel_generic_affine():
    region = torch.zeros(40, 32, 16)
    source_voxel = (22, 13, 7)
    region[source_voxel] = 1.0
    affine = affine_matrix(region.shape, -17.0, (1.3, -2.2), 0.93)  # scale < 1: the peak is not sampled away
    teacher = warp_region(region, affine)
    peak = torch.tensor(np.unravel_index(int(teacher.argmax()), teacher.shape), dtype=torch.float64)
    assert (peak - inverse_map(affine, source_voxel)).abs().max() <= 0.5 + 1e-6
    assert teacher.max() > 0.25


def test_teacher_is_the_source_sampled_through_the_affine():
    """Trilinear sampling is exact on a linear ramp: teacher[q] = f(A q) wherever A q is inside."""
    shape = (40, 32, 16)
    weights = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"), -1
    )
    region = (grid @ weights + 3.0).float()
    affine = affine_matrix(shape, 23.0, (1.7, -2.6), 1.15)
    teacher = warp_region(region, affine).double()
    sampled = map_points(affine, grid)
    inside = ((sampled >= 0) & (sampled <= torch.tensor(shape, dtype=torch.float64) - 1)).all(-1)
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(teacher[inside], (sampled @ weights + 3.0)[inside], atol=2e-4, rtol=0)
    far_outside = ((sampled < -1) | (sampled > torch.tensor(shape, dtype=torch.float64))).any(-1)
    assert far_outside.any() and teacher[far_outside].abs().max() == 0  # zeros outside the region


@pytest.mark.parametrize("angle, shift", [(0.0, (4.0, 0.0)), (90.0, (0.0, -4.0)), (180.0, (4.0, 4.0))])
def test_matched_tokens_hold_the_same_voxels(angle, shift):
    """For token-aligned affines, a matched teacher token is its source token moved: same mean."""
    geometry = Geometry(grid=(2, 2), crop=12, depth=12, token_stride=4)
    region = torch.rand(geometry.region, generator=torch.Generator().manual_seed(3))
    affine = affine_matrix(geometry.region, angle, shift, 1.0)
    truth = correspondence(affine, geometry)
    source_means = token_means(region, geometry)
    teacher_means = token_means(warp_region(region, affine), geometry)
    rows, cols = truth.nonzero(as_tuple=True)
    assert len(rows) >= geometry.n_tokens // 2
    torch.testing.assert_close(teacher_means[:, cols], source_means[:, rows], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- views


@pytest.fixture
def volume_files(tmp_path):
    rng = np.random.default_rng(0)
    return [
        save_nifti(tmp_path / "a.nii.gz", rng.normal(size=(40, 36, 20))),
        save_nifti(tmp_path / "b.nii", rng.normal(size=(33, 32, 17))),
    ]


def test_sample_views_are_consistent_and_reproducible(volume_files):
    geometry = Geometry()
    dataset = VolumeDataset(volume_files, geometry)
    assert len(dataset) == 2
    views = dataset.sample(0, torch.Generator().manual_seed(7))
    c, d, n = geometry.crop, geometry.depth, geometry.n_crops
    for name in ("source", "teacher", "augmented"):
        assert getattr(views, name).shape == (n, 1, c, c, d) and getattr(views, name).dtype == torch.float32
    assert views.truth.shape == (geometry.n_tokens,) * 2 and views.affine.shape == (3, 4)
    # the teacher view and G come from the same affine as the one reported
    region = unsplit_crops(views.source, geometry)
    torch.testing.assert_close(views.teacher, split_crops(warp_region(region, views.affine), geometry))
    assert torch.equal(views.truth, correspondence(views.affine, geometry, max_distance=None))
    assert views.truth.sum() > 0
    # the region is a window of the volume
    volume = dataset.volumes[0]
    windows = volume.unfold(0, 32, 1).unfold(1, 32, 1).unfold(2, 16, 1)
    assert (windows == region).flatten(3).all(-1).any()
    # affine parameters in range: scale = sqrt(det of the in-plane block), angle, shift
    linear = views.affine[:2, :2].double()
    scale = linear.det().sqrt()
    assert 0.9 <= scale <= 1.2
    assert abs(torch.atan2(linear[1, 0], linear[0, 0]).rad2deg()) <= 30
    centre = (torch.tensor(geometry.region, dtype=torch.float64) - 1) / 2
    shift = views.affine[:, 3].double() - centre + views.affine[:, :3].double() @ centre
    assert shift[:2].abs().max() <= 24 / 384 * 32 + 1e-5 and abs(shift[2]) < 1e-5
    # equal generator states give equal views; other states differ
    again = dataset.sample(0, torch.Generator().manual_seed(7))
    other = dataset.sample(0, torch.Generator().manual_seed(8))
    for name in ("source", "teacher", "augmented", "truth", "affine"):
        assert torch.equal(getattr(views, name), getattr(again, name))
    assert not torch.equal(views.affine, other.affine)


@pytest.mark.cuda
def test_views_on_the_gpu_equal_the_cpu_views(volume_files):
    """The warp, crops and augmentation run on the training device from the same random draws."""
    dataset = VolumeDataset(volume_files, Geometry())
    on_cpu = dataset.sample(1, torch.Generator().manual_seed(3))
    on_gpu = dataset.sample(1, torch.Generator().manual_seed(3), device="cuda")
    for name in ("source", "teacher", "augmented"):
        assert getattr(on_gpu, name).is_cuda
        torch.testing.assert_close(getattr(on_gpu, name).cpu(), getattr(on_cpu, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(on_gpu.truth.cpu(), on_cpu.truth) and torch.equal(on_gpu.affine.cpu(), on_cpu.affine)


def test_augmented_crops_are_flipped_and_jittered(volume_files):
    views = VolumeDataset(volume_files, Geometry()).sample(1, torch.Generator().manual_seed(2))
    for source, augmented in zip(views.source, views.augmented, strict=True):
        fits = []
        for dims in itertools.chain.from_iterable(itertools.combinations((1, 2, 3), k) for k in range(4)):
            flipped = source.flip(dims).flatten().double()
            design = torch.stack([flipped, torch.ones_like(flipped)], 1)
            solution = torch.linalg.lstsq(design, augmented.flatten().double()[:, None]).solution[:, 0]
            residual = (design @ solution - augmented.flatten().double()).abs().max()
            fits.append((residual, *solution.tolist()))
        residual, gain, offset = min(fits)
        assert residual < 1e-5 and 0.9 <= gain <= 1.1 and -0.1 <= offset <= 0.1


def test_collate_stacks_a_batch(volume_files):
    dataset = VolumeDataset(volume_files, Geometry())
    generator = torch.Generator().manual_seed(0)
    views = [dataset.sample(i, generator) for i in (0, 1, 0)]
    batch = collate(views)
    assert isinstance(batch, Views)
    assert batch.source.shape == (3, 4, 1, 16, 16, 16) and batch.truth.shape == (3, 64, 64)
    assert batch.affine.shape == (3, 3, 4)
    assert torch.equal(batch.teacher[1], views[1].teacher)
    assert batch.to("cpu").source.device.type == "cpu"


# ------------------------------------------------------------------------------------- loading, presets


def test_ct_preset_window(tmp_path):
    values = np.array([-3000.0, -1000.0, -500.0, 0.0, 500.0, 1000.0, 4000.0, 0.0]).reshape(2, 2, 2)
    volume = load_volume(save_nifti(tmp_path / "ct.nii", values), "ct")
    expected = np.array([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.5]).reshape(2, 2, 2)
    torch.testing.assert_close(volume, torch.tensor(expected, dtype=torch.float32))


def test_mri_preset_percentiles(tmp_path):
    values = np.random.default_rng(1).gamma(2.0, 100.0, size=(20, 20, 20))
    volume = load_volume(save_nifti(tmp_path / "mri.nii.gz", values), "mri")
    low, high = np.percentile(values.astype(np.float32), [0.5, 99.5])
    expected = np.clip((values.astype(np.float32) - low) / (high - low), 0, 1)
    assert volume.dtype == torch.float32 and volume.min() == 0 and volume.max() == 1
    torch.testing.assert_close(volume, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)
    constant = load_volume(save_nifti(tmp_path / "flat.nii", np.full((4, 4, 4), 7.0)), "mri")
    assert torch.equal(constant, torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="preset"):
        load_volume(tmp_path / "flat.nii", "pet")


def test_reorientation_to_canonical(tmp_path):
    data = np.random.default_rng(2).normal(size=(6, 5, 4))
    spacing = np.diag([1.5, 2.0, 3.0, 1.0])
    reference = load_volume(save_nifti(tmp_path / "ras.nii", data, spacing), "mri")
    # same world image stored with x flipped (LAS): voxel i holds world x of voxel 5 - i
    flipped = spacing.copy()
    flipped[0, 0], flipped[0, 3] = -1.5, 1.5 * 5
    las = load_volume(save_nifti(tmp_path / "las.nii", data[::-1], flipped), "mri")
    # and with the x and z axes swapped (SAR ordering of the array)
    swapped = np.zeros((4, 4))
    swapped[0, 2], swapped[1, 1], swapped[2, 0], swapped[3, 3] = 1.5, 2.0, 3.0, 1.0
    sar = load_volume(save_nifti(tmp_path / "sar.nii", data.transpose(2, 1, 0), swapped), "mri")
    assert torch.equal(las, reference) and torch.equal(sar, reference)


def test_4d_gives_first_frame(tmp_path):
    data = np.random.default_rng(3).normal(size=(5, 5, 5, 3))
    volume = load_volume(save_nifti(tmp_path / "4d.nii", data), "ct")
    expected = load_volume(save_nifti(tmp_path / "3d.nii", data[..., 0]), "ct")
    assert torch.equal(volume, expected)
    trailing = load_volume(save_nifti(tmp_path / "5d1.nii", data[..., :1, None]), "ct")
    assert torch.equal(trailing, expected)


def test_bundled_volumes_load():
    paths = bundled_volumes()
    assert [p.name for p in paths] == ["anatomical.nii", "example4d.nii.gz"]
    shapes = [tuple(load_volume(p, "mri").shape) for p in paths]
    assert shapes == [(33, 41, 25), (128, 96, 24)]
    dataset = VolumeDataset(paths, Geometry())
    assert len(dataset) == 2
    views = dataset.sample(1, torch.Generator().manual_seed(0))
    assert 0 <= views.source.min() and views.source.max() <= 1


def test_find_volumes(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    files = [tmp_path / "x.nii", tmp_path / "sub" / "y.nii.gz", tmp_path / "sub" / "deeper" / "z.nii"]
    for f in files:
        f.write_bytes(b"")
    (tmp_path / "sub" / "notes.txt").write_text("not a volume")
    expected = sorted(f.resolve() for f in files)
    assert find_volumes([str(tmp_path)]) == expected
    assert (
        find_volumes([tmp_path / "sub", str(tmp_path / "x.nii"), str(tmp_path / "**" / "*.nii*")]) == expected
    )
    assert find_volumes([str(tmp_path / "*.nii")]) == [files[0].resolve()]


# --------------------------------------------------------------------------------------------- bad input


def bad_files(tmp_path):
    corrupted = tmp_path / "corrupted.nii"
    corrupted.write_bytes(bytes(np.random.default_rng(4).integers(0, 256, 1000, dtype=np.uint8)))
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(save_nifti(tmp_path / "whole.nii", np.zeros((40, 40, 40))).read_bytes()[:2000])
    flat = save_nifti(tmp_path / "flat2d.nii", np.zeros((40, 40)))
    five = save_nifti(tmp_path / "five.nii", np.zeros((40, 40, 20, 2, 2)))
    return {corrupted: "cannot read", empty: "cannot read", truncated: "cannot read the image data",
            flat: "3D or 4D", five: "3D or 4D"}  # fmt: skip


def test_bad_files_name_the_file(tmp_path):
    for path, reason in bad_files(tmp_path).items():
        with pytest.raises(DataError, match=re.escape(str(path))) as info:
            load_volume(path, "mri")
        assert reason in str(info.value)
        with pytest.raises(DataError, match=re.escape(str(path))):
            VolumeDataset([path], Geometry())


def test_path_matching_nothing(tmp_path):
    missing = str(tmp_path / "nowhere" / "*.nii.gz")
    with pytest.raises(DataError, match=re.escape(repr(missing)) + " matches no NIfTI file"):
        find_volumes([missing])
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DataError, match="empty_folder"):
        find_volumes([str(tmp_path / "empty_folder")])


def test_volume_smaller_than_region(tmp_path):
    small = save_nifti(tmp_path / "small.nii", np.ones((40, 20, 40)))
    with pytest.raises(DataError, match=re.escape(str(small))) as info:
        VolumeDataset([small], Geometry())
    assert "(40, 20, 40)" in str(info.value) and "(32, 32, 16)" in str(info.value)


def test_skip_bad_warns_and_skips(tmp_path, volume_files):
    bad = list(bad_files(tmp_path)) + [save_nifti(tmp_path / "small.nii", np.ones((8, 8, 8)))]
    with pytest.warns(UserWarning) as record:
        dataset = VolumeDataset(
            [bad[0], volume_files[0], *bad[1:], volume_files[1]], Geometry(), skip_bad=True
        )
    assert dataset.paths == volume_files and len(dataset) == 2
    messages = [str(w.message) for w in record]
    assert len(messages) == len(bad)
    for path, message in zip(bad, messages, strict=True):
        assert str(path) in message
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable volume"):
        VolumeDataset(bad, Geometry(), skip_bad=True)
