"""Geometry: every case is segmented in one canonical orientation on the training grid and written on its own grid.

One test, run on a synthetic 48^3 case (always) and on a 64x64x48 mm box of the real case of ``BRATS_TEST_CASE``
(skipped without it), with a random-weight network of a fixed seed (``BlobNet``): its segmentation is a
deterministic function of the input that no flip or axis permutation leaves unchanged (the test checks that too), so
the identities are meaningful. The copies describe the same physical image as the case: its first axis flipped, its
axes permuted (affines changed to match), and the case resampled to 0.8 mm isotropic and to 1x1x3 mm.
"""

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIG_DIR
from custom.data.synthetic import case_files, synthesize
from custom.inference.segment import segment_cases
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Spacing, SpatialResample

SEQUENCES = ("t1", "t1ce", "t2", "flair")
PERMUTATION = (2, 0, 1)
RESAMPLED = ("iso08", "thick3")
REAL_BOX = (slice(136, 200), slice(84, 148), slice(40, 88))  # 64x64x48 voxels around the tumor, over the brain's edge


class BlobNet(torch.nn.Module):
    """A random-weight network with a fixed seed whose output is smooth, as a trained one's is (a random cascade's
    0.5 boundary runs through the whole brain, so any interpolation flips voxels everywhere): each region's logit
    is a local weighted mean of the z-scored sequences minus a threshold, through a 5x5x5 kernel of positive random
    weights that lean towards one corner, so that no flip or axis permutation maps the kernel onto itself."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weights = torch.rand(3, 4, 5, 5, 5, generator=generator)
        steps = torch.arange(5.0)
        weights = weights * torch.exp(steps[:, None, None] + 0.6 * steps[None, :, None] + 0.3 * steps[None, None, :])
        self.conv = torch.nn.Conv3d(4, 3, 5, padding=2, bias=False)
        self.conv.weight.data = weights / weights.sum(dim=(1, 2, 3, 4), keepdim=True)
        self.register_buffer("threshold", torch.tensor([0.9, 0.4, 1.3]).view(1, 3, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * (self.conv(x) - self.threshold)


def _write(folder, name, volumes, affine):
    """A case of 4 float32 NIfTI files; its inference entry."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for sequence, volume in zip(SEQUENCES, volumes):
        paths.append(str(folder / f"{name}_{sequence}.nii.gz"))
        nib.Nifti1Image(np.asarray(volume, np.float32), affine).to_filename(paths[-1])
    return {"case_id": name, "image": paths}


def _flip_first_axis(volumes, affine):
    n = volumes[0].shape[0]
    index_map = np.diag([-1.0, 1.0, 1.0, 1.0])
    index_map[0, 3] = n - 1  # old index i = n - 1 - new index
    return [v[::-1] for v in volumes], affine @ index_map


def _permute_axes(volumes, affine):
    index_map = np.zeros((4, 4))
    index_map[3, 3] = 1
    for new, old in enumerate(PERMUTATION):  # new axis k is old axis PERMUTATION[k]
        index_map[old, new] = 1
    return [np.transpose(v, PERMUTATION) for v in volumes], affine @ index_map


def _resample(volumes, affine, pixdim):
    """The case on a grid of ``pixdim`` mm (MONAI Spacing, bilinear), skull-stripped on that grid (its brain mask
    resampled nearest): what another acquisition of the same head would give."""
    stack = torch.from_numpy(np.stack(volumes).astype(np.float32))
    out = Spacing(pixdim=pixdim, mode="bilinear", padding_mode="zeros")(MetaTensor(stack, affine=affine))
    brain = MetaTensor((stack != 0).any(0, keepdim=True).float(), affine=affine)  # skull-stripped on its own grid
    outside = Spacing(pixdim=pixdim, mode="nearest", padding_mode="zeros")(brain).as_tensor() < 0.5
    return [c.numpy() for c in out.as_tensor().masked_fill(outside, 0)], out.affine.numpy()


def _to_grid(labels, affine, reference_affine, reference_shape):
    """Labels of one grid read on another in physical space (nearest neighbour)."""
    image = MetaTensor(torch.from_numpy(labels[None].astype(np.float32)), affine=torch.as_tensor(affine))
    out = SpatialResample(mode="nearest", padding_mode="zeros")(
        image, dst_affine=torch.as_tensor(reference_affine), spatial_size=reference_shape
    )
    return out.as_tensor()[0].numpy().round().astype(np.uint8)


def _segment(entries, output_dir, network, **config):
    """inference.json's preprocessing, flip-free inferer, postprocessing and writer; the written label maps."""
    parser = ConfigParser()
    parser.read_config(str(CONFIG_DIR / "inference.json"))
    parser.update({"output_dir": str(output_dir), "tta": 1, "et_label": 4, "et_threshold": 0, **config})
    parts = [parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing", "writer")]
    summary = segment_cases(entries, parts[0], network, *parts[1:], progress=False, volumes_csv=None)
    assert not summary.failed, summary.text()
    written = {e["case_id"]: nib.load(str(output_dir / f"{e['case_id']}.nii.gz")) for e in entries}
    for entry in entries:  # every output on its input's exact grid
        source = nib.load(entry["image"][0])
        assert written[entry["case_id"]].shape == source.shape
        np.testing.assert_allclose(written[entry["case_id"]].affine, source.affine, atol=1e-5)
    return {name: np.asarray(image.dataobj) for name, image in written.items()}, parts[0]


def _near_borders(labels):
    """Voxels within 1 voxel (6-neighbourhood) of a border between two labels."""

    def grow(mask):
        grown = mask.copy()
        for axis in range(3):
            for shift in (1, -1):
                grown |= np.roll(mask, shift, axis=axis)
        return grown

    edge = np.zeros(labels.shape, bool)
    for axis in range(3):
        for shift in (1, -1):
            edge |= labels != np.roll(labels, shift, axis=axis)
    return grow(edge)


def _agreement(reference, other, brain):
    """Shares of voxels with the same label: of the brain, of the voxels either calls tumor, and of the brain voxels
    more than 1 voxel away from the borders between the reference's labels."""
    tumor = brain & ((reference > 0) | (other > 0))
    inside = brain & ~_near_borders(reference)
    same = reference == other
    return tuple(round(float(same[region].mean()), 4) for region in (brain, tumor, inside))


def _case(source, request, tmp_path):
    if source == "synthetic":
        synthesize(str(tmp_path / "synthetic"), num_cases=1, shape=(48, 48, 48), seed=5)
        files = case_files(tmp_path / "synthetic" / "BraTS2021_00000")
        images = [nib.load(str(files[s])) for s in ("t1", "t1c", "t2", "flair")]
        return [np.asarray(i.dataobj, np.float32) for i in images], images[0].affine
    real_case = request.getfixturevalue("real_case")  # skips, saying how to enable it, without BRATS_TEST_CASE
    images = [nib.load(str(p)) for p in real_case.images]
    shift = np.eye(4)
    shift[:3, 3] = [box.start for box in REAL_BOX]
    return [np.asarray(i.dataobj, np.float32)[REAL_BOX] for i in images], images[0].affine @ shift


@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_flipped_permuted_and_resampled_copies_give_the_case_segmentation(source, request, tmp_path):
    volumes, affine = _case(source, request, tmp_path)
    assert nib.aff2axcodes(affine) == ("L", "P", "S") and np.allclose(np.linalg.norm(affine[:3, :3], axis=0), 1)
    network = BlobNet(seed=0).eval()
    folder = tmp_path / "cases"
    copies = {
        "case": (volumes, affine),
        "flipped": _flip_first_axis(volumes, affine),
        "permuted": _permute_axes(volumes, affine),
        "iso08": _resample(volumes, affine, (0.8, 0.8, 0.8)),
        "thick3": _resample(volumes, affine, (1.0, 1.0, 3.0)),
    }
    entries = {name: _write(folder / name, name, *copy) for name, copy in copies.items()}
    labels, preprocessing = _segment(list(entries.values()), tmp_path / "out", network)
    case = labels["case"]
    brain = np.any(np.stack(volumes) != 0, axis=0)
    assert 0.05 < (case > 0)[brain].mean() < 0.95, "the network's segmentation is trivial: the test would prove nothing"
    assert not case[~brain].any()  # no label outside the brain (the union of the sequences' non-zero voxels)

    # the flipped and the permuted copy: the same segmentation, voxel for voxel, once read in physical space
    assert np.array_equal(labels["flipped"][::-1], case)
    assert np.array_equal(np.transpose(labels["permuted"], np.argsort(PERMUTATION)), case)

    # resampled copies: the same up to interpolation at the borders between labels
    figures = {
        name: _agreement(case, _to_grid(labels[name], copies[name][1], affine, case.shape), brain) for name in RESAMPLED
    }
    print(f"{source}: agreement with the case's segmentation (brain, tumor, brain away from borders): {figures}")
    for name, (whole_brain, _, away_from_borders) in figures.items():
        assert whole_brain > 0.9 and away_from_borders > 0.98, (name, figures[name])

    # a 1 mm case in the canonical orientation is neither reoriented nor resampled (the resampled copies are), its
    # voxels reach the network as they are stored
    def geometry(name):
        sample = preprocessing({**entries[name], "source": entries[name]["image"]})
        trace = sample["image"].applied_operations
        (step,) = [op for op in trace if op["class"] == "CanonicalGeometryd"]
        return [op["class"] for op in trace], step["extra_info"]["applied"], sample["image"].pixdim

    trace, applied, _ = geometry("case")
    assert applied == ["orientation"] and "SpatialResample" not in trace, trace  # checked, found canonical
    _, applied, pixdim = geometry("iso08")
    assert applied == ["orientation", "spacing"] and np.allclose(pixdim, 1.0)

    # without the geometry step (every copy segmented on its stored grid): the 1 mm case gets the same output bit for
    # bit, and the flipped and the permuted copy get other segmentations, so the identities above are the geometry
    # step's doing, not a symmetry of the network
    names = ["case", "flipped", "permuted"]
    stored, _ = _segment(
        [entries[n] for n in names], tmp_path / "stored", network, orientation=None, target_spacing=None
    )
    assert np.array_equal(stored["case"], case)
    before = {
        "flipped": _agreement(case, stored["flipped"][::-1], brain),
        "permuted": _agreement(case, np.transpose(stored["permuted"], np.argsort(PERMUTATION)), brain),
    }
    print(f"{source}: without the geometry step: {before}")
    assert before["flipped"][1] < 0.9 and before["permuted"][1] < 0.9, before
