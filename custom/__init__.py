"""Two-stage cascaded U-Net (Jiang et al., BraTS 2019 winner) as a MONAI bundle: the code the configs import."""

from __future__ import annotations

__version__ = "0.1.0"
MIN_MONAI_VERSION = "1.5.0"


def check_monai_version(minimum: str = MIN_MONAI_VERSION) -> str:
    """Raises a clear error when the installed MONAI is older than the bundle needs; returns its version."""
    import monai
    from monai.utils import version_leq

    if not version_leq(minimum, monai.__version__):
        raise RuntimeError(
            f"This bundle needs MONAI >= {minimum} (found {monai.__version__}): "
            "`pip install -U 'monai>=1.5'`. Older versions lack ConvertToMultiChannelBasedOnBratsClassesd(et_label=...)."
        )
    return monai.__version__
