"""Install the project in editable mode: ``pip install -e .`` (``make install`` does it in ``.venv``).

Runtime dependencies are pinned in ``requirements.lock``; torch is deliberately *not*
listed in ``install_requires`` ranges wider than the lock so that pip never resolves a
second torch build, and torchvision is never installed: on a CPU machine PyPI's torchvision breaks
beside torch 2.13.0 (docs/facts.md).
"""

from setuptools import find_packages, setup

PACKAGES = ("common", "data", "models", "eval", "grpo")  # bottom to top: each imports only those before it

setup(
    name="visual-preference-grpo",
    version="0.1.0",
    description="GRPO-trained Qwen2.5-VL reward models with soft scores (arXiv 2503.19948)",
    packages=find_packages(include=[p for top in PACKAGES for p in (top, f"{top}.*")]),
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
        "tensorboard",
    ],
    extras_require={
        "bench": ["trl==1.16.0"],
        "plot": ["matplotlib"],
        "serve": ["fastapi==0.163.2", "uvicorn==0.54.0"],  # python -m eval.serve
        "serve-test": [
            "httpx==0.28.1",
            "openai==3.51.0",
        ],  # the real clients tests/test_serve*.py call it with
        "wandb": ["wandb==0.31.0"],  # train.report_to=wandb
        "browser": ["playwright==1.65.2"],  # tests/test_report_html.py drives a real Chromium with it
    },
)
