"""Analytic forward FLOPs of the layers both families share (ViT blocks, Qwen2 decoder layers,
convolutions), for the families' MFU models (harmon/flops.py, vqrae/flops.py).

Convention (MaxText's): 2 FLOPs per multiply-add of a matmul; attention scores and values
included, causal attention halved (the masked half is not model work, even where this code
computes it under a mask); elementwise ops, norms, softmax and embedding gathers not counted.
XLA's cost analysis cannot replace these counts: it counts a ``lax.scan``-ned layer body once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unified_mm.models.llm.qwen2 import Qwen2Config


# How many times training runs a part's forward FLOPs (the MaxText / PaLM model-FLOPs rule):
# trained (forward, input and weight gradients), frozen with the gradient of a trained part
# passing through it (forward, input gradient), frozen and off the gradient path (forward).
TRAINED, THROUGH, FORWARD = 3, 2, 1


@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of a step: forward FLOPs per example and how many times training runs them."""

    name: str
    forward: float
    passes: int

    @property
    def training(self) -> float:
        return self.passes * self.forward


def dense_flops(rows: int, d_in: int, d_out: int) -> float:
    """One ``[rows, d_in] @ [d_in, d_out]`` matmul."""
    return 2.0 * rows * d_in * d_out


def vit_block_flops(tokens: int, width: int, mlp: int) -> float:
    """One pre-LN ViT block over ``tokens`` rows (bidirectional attention)."""
    dense = 2 * tokens * (3 * width * width + width * width + 2 * width * mlp)
    attention = 4 * tokens * tokens * width
    return float(dense + attention)


def qwen2_layer_flops(tokens: int, cfg: Qwen2Config) -> float:
    """One Qwen2 decoder layer over ``tokens`` rows (causal attention: half the score matrix)."""
    h, q, kv = (
        cfg.hidden_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    )
    dense = 2 * tokens * (h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size)
    attention = 4 * tokens * tokens * q / 2
    return float(dense + attention)


def conv_taps(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    """Kernel taps along one axis that land on real input (not zero padding), summed over the
    output positions: XLA counts a convolution's multiply-adds this way, so the conv models below
    agree with its cost analysis exactly (the full-kernel count differs by a few per cent at the
    small maps of VGG's last blocks)."""
    out = (size + pad[0] + pad[1] - kernel) // stride + 1
    return sum(
        sum(1 for t in range(kernel) if 0 <= o * stride - pad[0] + t < size) for o in range(out)
    )


def conv2d_flops(
    size: tuple[int, int],
    kernel: int,
    c_in: int,
    c_out: int,
    *,
    stride: int = 1,
    pad: tuple[int, int] = (0, 0),
) -> float:
    """One square-kernel 2D convolution of an ``size`` (H, W) map, the same padding on both axes."""
    taps = conv_taps(size[0], kernel, stride, pad) * conv_taps(size[1], kernel, stride, pad)
    return 2.0 * taps * c_in * c_out


def xla_flops(fn: Callable, *args: Any) -> float:
    """XLA's cost-analysis FLOPs of ``jit(fn)(*args)`` after compilation (``args`` may be
    ``ShapeDtypeStruct``s). Exact for loop-free functions (the VAE); a scanned stack's body is
    counted once, so it checks the analytic models only at depth 1 (tests/test_flops.py)."""
    import jax

    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", 0.0))
