"""Reading an export back into torch: the student rebuilt from ``model_spec.json`` and
``model.safetensors`` (:func:`load_exported`; no pickles).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rkd.deploy.files import SPEC_FILE, WEIGHTS_FILE, read_spec
from rkd.errors import RkdError
from rkd.models import Classifier
from rkd.models.detector import Detector
from rkd.train.tasks import TASK_OF_KIND


def load_exported(folder: Path) -> tuple[Detector | Classifier, dict[str, Any]]:
    """Rebuild the exported student from ``model_spec.json`` + ``model.safetensors`` (no pickles).

    Returns the model in eval mode and the spec document (:func:`read_spec`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    spec_path, weights_path = folder / SPEC_FILE, folder / WEIGHTS_FILE
    spec = read_spec(folder)
    if not weights_path.is_file():
        raise RkdError(f"{weights_path}: missing; is {folder} a folder written by 'rkd export --format safetensors'?")
    try:
        model = TASK_OF_KIND[spec["kind"]].build_model(spec["model_spec"], int(spec["num_classes"]))
    except (KeyError, TypeError, ValueError, RkdError) as exc:
        raise RkdError(f"{spec_path}: not an rkd model spec ({type(exc).__name__}: {exc})") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise RkdError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RkdError(f"{weights_path}: weights do not fit {spec_path.name}: {exc}") from None
    return model.eval(), spec
