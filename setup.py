from setuptools import setup

# The top-level `kernels/` folder is installed as `prism_fast.kernels` and has no __init__.py:
# run from a checkout (pytest, `python -m bench`), the checkout is on sys.path, and a regular
# package named `kernels` there would shadow Hugging Face's `kernels` package, which
# transformers imports. A folder without __init__.py is only a namespace portion, which any
# installed regular package of that name outranks. In the checkout, prism_fast/kernels is a
# link to ../kernels, so prism_fast.kernels imports without an install too.
setup(
    name="prism-fast",
    version="0.1.0",
    description="Fused gated multi-LoRA Triton kernels for PRISM persona routing",
    # The benchmarks (bench/) run from the checkout as `python -m bench`: no top-level `bench`
    # package is installed into site-packages.
    packages=["prism_fast", "prism_fast.kernels", "prism_fast.ops", "prism_fast.training",
              "prism_fast.bootstrap", "prism_fast.testing"],
    package_dir={"prism_fast": "prism_fast", "prism_fast.kernels": "kernels"},
    # The per-GPU tuned tables of the gated-LoRA kernels (kernels/configs/<GPU>.json, written by
    # bench/tune_gated_lora.py) ship with the package: the kernels' config reads them there.
    package_data={"prism_fast.kernels": ["configs/*.json"]},
    python_requires=">=3.10",
    # Minimums are the versions CI tests (.ci/run's second environment: the GPU machine's
    # triton, transformers and peft); torch 2.11 is the GPU machine's (bench/gpu_check.sh),
    # CI tests the CPU build of 2.13.
    install_requires=["torch>=2.11", "triton>=3.6", "numpy"],
    extras_require={
        "hf": ["transformers>=5.17", "peft>=0.21", "safetensors"],
        # python -m prism_fast.serve: an OpenAI-compatible server over continuous batching,
        # whose engine prism_fast hooks from transformers 5.25 on (prism_fast/batching.py)
        "serve": ["transformers>=5.25", "peft>=0.21", "safetensors", "fastapi", "uvicorn"],
        "dev": [
            "transformers>=5.17",
            "peft>=0.21",
            "safetensors",
            "accelerate",
            # Hugging Face's `kernels`: transformers ≥ 5.25 requires it; listed so that the
            # tests always run beside it (tests/test_layering.py checks it is not shadowed).
            "kernels",
            "fastapi",       # the server (prism_fast.serve) and its tests
            "uvicorn",
            "openai",        # the server's tests use the official client
            "httpx",
            "gguf",          # the real model of the benchmark and the `real` tests (GGUF file)
            "tqdm",
            "pytest",
            "pytest-benchmark",
            "matplotlib",
            "ruff",
        ],
    },
)
