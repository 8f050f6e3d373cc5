"""Loading checkpoint files without running code from them: safetensors, and ``torch.load`` forced to tensors and
plain data (DeepSpeed's own loads included), each failure a CheckpointError that names the file."""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from hpdm.errors import CheckpointError


def allow_deepspeed_globals() -> None:
    """Allow the plain-data classes that DeepSpeed puts in its state files through ``weights_only`` loads."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: PLC0415
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    torch.serialization.add_safe_globals([LossScaler, ZeroStageEnum, fragment_address])


@contextlib.contextmanager
def no_pickle():
    """Within: every ``torch.load`` (DeepSpeed's too, which passes ``weights_only=False``) loads tensors and plain
    data only, and a file that fails to load is named in a CheckpointError."""
    allow_deepspeed_globals()
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{f}: refused: it is corrupt, or holds objects other than tensors and plain data, "
                                  "which loading could run as code (hpdm never writes such files)") from exc
        except Exception as exc:  # noqa: BLE001 (any unreadable file is a checkpoint error naming it)
            raise CheckpointError(f"{f}: cannot be read ({type(exc).__name__}: {exc})") from exc

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def load_safetensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except Exception as exc:  # noqa: BLE001 (missing, truncated or not safetensors)
        raise CheckpointError(f"{f}: cannot be read ({exc})") from exc
