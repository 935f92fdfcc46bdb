"""The model-zoo bundle zip: ``python -m custom package [--output PATH] [--with_weights] [--weights PATH]``.

The zip unpacks to one folder named by the bundle's id (MONAI bundle specification, "Archive Format"; the model
zoo's folder ``models/<id>``), ``BUNDLE_ID``: the zoo's ``<data>_<modality>_<method>_<task>``. The id is not
``name`` of the metadata, which the zoo uses as a display name ("BraTS MRI segmentation")::

    brats_mri_cascaded_unet_segmentation/
      LICENSE
      large_files.yml
      configs/    the bundle's own configs (BUNDLE_CONFIGS); other files there (datalists, experiments) stay out
      models/     README.md (how to get weights); model.pt when weights are asked for
      docs/       the model card and whatever else the bundle documents
      custom/     this Python package (no caches), next to configs/ so the configs' ``$import custom`` works

so the unpacked folder runs ``python -m monai.bundle run ...`` and ``python -m custom ...`` from inside it, without
this repository installed. Symbolic links are never followed or shipped. The zip is written to a temporary file
beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from custom.core.io import atomic_path

__all__ = ["package", "bundle_files", "default_output", "BUNDLE_CONFIGS", "BUNDLE_ID"]

BUNDLE_ID = "brats_mri_cascaded_unet_segmentation"  # folder of the unpacked zip and of the zoo's models/<id>

# The configs that are part of the bundle. Anything else in configs/ (a datalist with private paths, a local
# experiment) is left out of the zip: add a new bundle config here to ship it.
BUNDLE_CONFIGS = (
    "metadata.json",
    "train.json",
    "multi_gpu_train.json",
    "demo.json",
    "evaluate.json",
    "inference.json",
    "multi_gpu_inference.json",
    "multi_gpu_evaluate.json",
    "logging.conf",
)
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ipynb_checkpoints"}
SKIPPED_SUFFIXES = (".pyc", ".pyo")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same sources give the same zip


def _package_dir() -> Path:
    return Path(__file__).resolve().parents[1]  # custom/tools/ -> custom/


def _bundle_dir() -> Path:
    """The bundle folder (``configs/`` inside): ``bundle/`` of the repository, or the unpacked bundle itself."""
    from custom.core.runtime import bundle_root

    root = Path(bundle_root()).resolve()
    if not (root / "configs" / "metadata.json").is_file():
        raise FileNotFoundError(
            f"no configs/metadata.json in {root}: run `python -m custom package` from the repository "
            "(custom/ next to bundle/) or from an unpacked bundle (custom/ next to configs/)."
        )
    return root


def _metadata(bundle_dir: Path) -> dict:
    path = bundle_dir / "configs" / "metadata.json"
    with open(path) as f:
        metadata = json.load(f)
    if not metadata.get("version"):
        raise ValueError(f"{path} has no `version`: the zip is named {BUNDLE_ID}_v<version>.zip.")
    return metadata


def default_output() -> str:
    """``dist/<BUNDLE_ID>_v<version>.zip`` (relative to the working directory), ``version`` from the metadata."""
    metadata = _metadata(_bundle_dir())
    return os.path.join("dist", f"{BUNDLE_ID}_v{metadata['version']}.zip")


def _tree(folder: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Regular files under ``folder`` (sorted, relative), without caches, compiled files, hidden files and symbolic
    links (a link could point anywhere, e.g. at private data)."""
    found = []
    for root, dirs, names in os.walk(folder, followlinks=False):  # os.walk lists linked folders but never enters them
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".")]
        for name in names:
            path = Path(root) / name
            if name.startswith(".") or path.is_symlink() or not path.is_file() or path.suffix in SKIPPED_SUFFIXES:
                continue
            if suffixes is not None and path.suffix not in suffixes:
                continue
            found.append(path.relative_to(folder))
    return sorted(found)


def _regular_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def bundle_files(with_weights: bool = False, weights: str | os.PathLike | None = None) -> dict[str, Path]:
    """What goes into the zip: ``{path inside <BUNDLE_ID>/: source file}``.

    Raises ``FileNotFoundError`` naming the file when a required part (LICENSE, large_files.yml, the model card,
    the weights asked for) is missing.
    """
    bundle_dir, package_dir = _bundle_dir(), _package_dir()
    files: dict[str, Path] = {}
    for name in ("LICENSE", "large_files.yml"):
        source = bundle_dir / name
        if not _regular_file(source):
            raise FileNotFoundError(f"{source} is missing (or a symbolic link): every bundle zip ships it as a file.")
        files[name] = source
    for name in BUNDLE_CONFIGS:
        source = bundle_dir / "configs" / name
        if not _regular_file(source):
            raise FileNotFoundError(
                f"{source} is missing (or a symbolic link): it is one of the bundle's configs (BUNDLE_CONFIGS of "
                "custom/tools/package.py); restore it, or take it off that list."
            )
        files[f"configs/{name}"] = source
    if not _regular_file(bundle_dir / "docs" / "README.md"):
        raise FileNotFoundError(f"{bundle_dir / 'docs' / 'README.md'} (the model card) is missing.")
    for relative in _tree(bundle_dir / "docs"):
        files[f"docs/{relative.as_posix()}"] = bundle_dir / "docs" / relative
    if _regular_file(bundle_dir / "models" / "README.md"):  # how to get model.pt, as model-zoo bundles have it
        files["models/README.md"] = bundle_dir / "models" / "README.md"
    for relative in _tree(package_dir, (".py",)):
        files[f"custom/{relative.as_posix()}"] = package_dir / relative
    if with_weights or weights is not None:
        source = Path(weights) if weights is not None else bundle_dir / "models" / "model.pt"
        if not source.is_file():
            raise FileNotFoundError(
                f"weights {source} do not exist: train first (the best model is written to <output_dir>/models/"
                "model.pt; copy it to bundle/models/model.pt) or pass --weights PATH."
            )
        _check_weights(bundle_dir, source)
        files["models/model.pt"] = source
    return files


def _check_weights(bundle_dir: Path, weights: Path) -> None:
    """The weights must load strictly into ``network_def`` of configs/inference.json, as the bundle's users will load them."""
    from custom.model.checkpoints import load_state_dict
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    try:
        network.load_state_dict(load_state_dict(str(weights)), strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:300]
        raise ValueError(
            f"weights {weights} do not fit `network_def` of {bundle_dir / 'configs' / 'inference.json'} "
            f"({detail}): set network_def there to the settings the weights were trained with "
            "(init_filters, blocks_down, blocks_up), or give the inference model that training writes "
            "(<output_dir>/models/model.pt, without the training-only trilinear decoder)."
        ) from e


def _add(archive: zipfile.ZipFile, arcname: str, source: Path | None) -> None:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
    if source is None:  # a folder entry
        info.external_attr = (0o40755 << 16) | 0x10
        archive.writestr(info, b"")
        return
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_STORED if source.suffix in (".pt", ".ts", ".onnx") else zipfile.ZIP_DEFLATED
    with open(source, "rb") as src, archive.open(info, "w", force_zip64=True) as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)


def package(
    output: str | os.PathLike | None = None, with_weights: bool = False, weights: str | os.PathLike | None = None
) -> str:
    """Writes the bundle zip and returns its path.

    Args:
        output: the zip to write; default ``dist/<BUNDLE_ID>_v<version>.zip`` (``version`` from
            ``configs/metadata.json``). Its folders are created.
        with_weights: include ``models/model.pt`` of the bundle (``bundle/models/model.pt``).
        weights: include this file as ``models/model.pt`` instead (implies ``with_weights``).
    """
    bundle_dir = _bundle_dir()
    _metadata(bundle_dir)  # a version to name the zip by
    name = BUNDLE_ID
    output = Path(output if output is not None else default_output()).resolve()
    files = bundle_files(with_weights=with_weights, weights=weights)
    folders = sorted({f"{name}/{os.path.dirname(k)}/" for k in files if "/" in k} | {f"{name}/", f"{name}/models/"})

    with atomic_path(output) as tmp, zipfile.ZipFile(
        tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True
    ) as archive:
        for folder in folders:
            _add(archive, folder, None)
        for arcname in sorted(files):
            _add(archive, f"{name}/{arcname}", files[arcname])
    size = output.stat().st_size / 2**20
    weights_note = f"with weights {files['models/model.pt']}" if "models/model.pt" in files else "without weights"
    print(f"wrote {output} ({len(files)} files, {size:.1f} MiB, {weights_note}); it unpacks to {name}/")
    left_out = sorted(p.name for p in (bundle_dir / "configs").iterdir() if p.name not in BUNDLE_CONFIGS)
    if left_out:
        print(f"left out of configs/ (not in BUNDLE_CONFIGS of custom/tools/package.py): {', '.join(left_out)}")
    return str(output)
