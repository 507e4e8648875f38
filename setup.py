from setuptools import setup

# `kernels/` is installed as `prism_fast.kernels`: a top-level package named `kernels` would
# shadow Hugging Face's `kernels` package, which transformers probes at import time.
setup(
    name="prism-fast",
    version="0.1.0",
    description="Fused gated multi-LoRA Triton kernels for PRISM persona routing",
    # The benchmarks (bench/) run from the checkout as `python -m bench`: no top-level `bench`
    # package is installed into site-packages.
    packages=["prism_fast", "prism_fast.kernels"],
    package_dir={"prism_fast": "prism_fast", "prism_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.2", "numpy"],
    extras_require={
        "hf": ["transformers>=4.46", "peft>=0.13", "safetensors"],
        "dev": [
            "transformers>=4.46",
            "peft>=0.13",
            "safetensors",
            "accelerate",
            "gguf",          # the real model of the benchmark and the `real` tests (GGUF file)
            "tqdm",
            "pytest",
            "pytest-benchmark",
            "matplotlib",
            "ruff",
        ],
    },
)
