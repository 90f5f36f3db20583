"""ArcScale: giant face-recognition backbones and identity classifiers on one machine or many."""
from setuptools import find_packages, setup

# torch is pinned: an unpinned torch pulls a multi-GB CUDA build on machines without one on disk.
TORCH = "torch==2.13.0"

setup(
    name="arcscale",
    version="0.1.0",
    description="Train giant face-recognition backbones with Partial FC under DeepSpeed ZeRO / FSDP",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "backbones*", "heads*", "dali_pipes*"]),
    install_requires=[
        TORCH,
        "deepspeed==0.19.8",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tensorboard>=2.15",
        "pillow>=10.0",
        "matplotlib>=3.8",  # engine.profile's profile.png
        "tqdm==4.70.1",  # progress bars of the command-line tools (engine.runtime.progress, dali_pipes.pack)
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120==2.4.0"],
        # ruff: scripts/test.sh lints with ruff.toml; pytest-xdist: its --fast tier runs on every core
        "test": ["pytest>=8.0", "pytest-timeout>=2.3", "ruff==0.17.5", "pytest-xdist==3.8.0"],
        # python -m engine.export: torch 2.13's default (dynamo) ONNX exporter needs onnxscript; onnxruntime
        # checks every export against PyTorch. Versions checked together on Python 3.11 with torch 2.13.
        "export": ["onnx==1.23.2", "onnxruntime==1.32.0", "onnxscript==0.7.2"],
        # engine.train.wandb / engine.train.mlflow (engine/train/trackers.py); mlflow-skinny: the tracking client
        # and its local file store, without MLflow's server and UI dependencies
        "wandb": ["wandb==0.31.0"],
        "mlflow": ["mlflow-skinny==3.17.2"],
    },
)
