"""Install the project in editable mode: ``pip install -e .`` (``make install`` does it in ``.venv``).

Runtime dependencies are pinned in ``requirements.lock``; torch is deliberately *not*
listed in ``install_requires`` ranges wider than the lock so that pip never resolves a
second torch build, and torchvision is never installed (DESIGN §8).
"""

from setuptools import find_packages, setup

setup(
    name="visual-preference-grpo",
    version="0.1.0",
    description="GRPO-trained Qwen2.5-VL reward models with soft scores (arXiv 2503.19948)",
    packages=find_packages(
        include=["grpo", "grpo.*", "models", "models.*", "data", "data.*", "eval", "eval.*"]
    ),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "transformers==5.23.0",
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "datasets==5.2.0",
        "peft==0.21.2",
        "pillow",
        "numpy",
        "pyarrow",
        "tqdm",
        "pyyaml",
    ],
    extras_require={"bench": ["trl==1.16.0"], "plot": ["matplotlib"]},
)
