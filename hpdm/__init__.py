"""Hierarchical Patch Diffusion Models: model, diffusion, pyramid geometry, trainer, sampling, CLI."""
import importlib.util
from pathlib import Path


def _check_kernels_package() -> None:
    """Fail at once, with the fix, when `import kernels` would not load hpdm's fused kernels.

    Hugging Face's `kernels` distribution (a dependency of transformers >= 5.25) has the same import name; whichever
    comes first on sys.path wins, and the loser fails later with an obscure ImportError or TypeError.
    """
    spec = importlib.util.find_spec("kernels")
    origin = spec.origin if spec is not None else None
    if origin is None or not Path(origin).with_name("context_fusion.py").is_file():
        raise ImportError(
            f"`import kernels` finds {origin or 'nothing'}, not hpdm's fused kernels (kernels/context_fusion.py). "
            "Hugging Face's `kernels` package, which transformers >= 5.25 requires, takes the same name: "
            "`pip uninstall kernels` and `pip install 'transformers<5.25'` (hpdm's [text] extra pins it)")


_check_kernels_package()
