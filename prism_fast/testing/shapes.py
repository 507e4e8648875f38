"""The projection shapes of the decoder architectures that the benchmarks and the kernel resource
check use (Llama-3-8B, Qwen2.5-7B, SmolLM2-135M, and a CPU-sized stand-in)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The projection sizes of one decoder architecture (and enough to build it with HF)."""

    name: str
    hidden: int
    kv: int           # width of k_proj / v_proj = kv_heads · head_dim
    inter: int        # MLP intermediate size
    qkv_bias: bool    # Qwen2 has biases on q/k/v, Llama has none
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def groups(self, proj: str) -> list[tuple[int, list[int], bool]]:
        """The op calls a projection name stands for: [(K, [N_s per slice], bias)]; "layer" is
        one decoder layer's qkv, o, gate_up and down calls."""
        h, kv, i, qb = self.hidden, self.kv, self.inter, self.qkv_bias
        table = {
            "q": [(h, [h], qb)], "k": [(h, [kv], qb)], "v": [(h, [kv], qb)], "o": [(h, [h], False)],
            "gate": [(h, [i], False)], "up": [(h, [i], False)], "down": [(i, [h], False)],
            "qkv": [(h, [h, kv, kv], qb)], "gate_up": [(h, [i, i], False)],
        }
        table["layer"] = table["qkv"] + table["o"] + table["gate_up"] + table["down"]
        return table[proj]


MODELS = {
    "llama3-8b": ModelShape("llama3-8b", 4096, 1024, 14336, False, 32, 32, 8, 128256),
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 3584, 512, 18944, True, 28, 28, 4, 152064),
    "smollm2-135m": ModelShape("smollm2-135m", 576, 192, 1536, False, 30, 9, 3, 49152),
    "tiny": ModelShape("tiny", 256, 64, 704, False, 4, 4, 1, 1024),   # CPU-sized, same structure
}
