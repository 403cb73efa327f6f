"""Does the text-to-image path use its conditions? Paired loss probes on real image-caption pairs.

A generator can reach a low diffusion loss while ignoring its prompt and the visible tokens
(every pixel-patch token is nearly readable from its own noisy copy), and then samples scattered
colour blobs whatever it is asked. The probe computes the Harmon text-to-image loss (masked
tokens, `mask_ratio` of them) on held-out pairs three ways with the same masks, diffusion steps
and noise, so the differences are paired:

* ``loss``: own caption, own visible tokens;
* ``shuffled_text``: every image with another row's caption;
* ``shuffled_context``: own caption, but the visible tokens (the MAR encoder's input) of
  another row's image, the targets unchanged;

and reports ``text_gap = shuffled_text / loss - 1`` and ``context_gap = shuffled_context /
loss - 1``: ~0 means that condition is ignored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unified_mm.data.transforms import encode_generation_prompt
from unified_mm.models.harmon.mar import mask_by_order, num_masked_tokens, sample_orders


def t2i_conditioning_probe(
    model,
    tokenizer,
    images: np.ndarray,
    captions: list[str],
    *,
    max_text_len: int,
    key: jax.Array,
    mask_ratio: float = 0.7,
    repeats: int = 4,
) -> dict[str, float]:
    """images uint8 [N, H, W, 3] (N >= 2, distinct captions somewhere in the batch)."""
    if len(images) != len(captions) or len(images) < 2:
        raise ValueError(
            f"the conditioning probe needs >= 2 image-caption pairs, got {len(images)} images "
            f"and {len(captions)} captions"
        )
    x = jnp.asarray(np.asarray(images, np.float32) / 127.5 - 1.0)
    enc = [encode_generation_prompt(tokenizer, c, max_text_len) for c in captions]
    ids = jnp.asarray(np.stack([e[0] for e in enc]))
    am = jnp.asarray(np.stack([e[1] for e in enc]))
    # The next row's caption / image; rows whose neighbour has the same caption keep a zero gap.
    perm = np.roll(np.arange(len(captions)), 1)

    graphdef, state = nnx.split(model)

    @jax.jit
    def paired_losses(state, key):
        m = nnx.merge(graphdef, state)
        tokens = m.encode(x)
        b, h, w, c = tokens.shape
        k_ord, k_diff = jax.random.split(key)
        n_masked = num_masked_tokens(mask_ratio, h * w, 0.0)
        mask = mask_by_order(sample_orders(k_ord, b, h * w), n_masked)

        def loss(visible_tokens, text_ids, text_mask):
            x_enc, _ = m.forward_mae_encoder(
                visible_tokens, mask, input_ids=text_ids, attention_mask=text_mask
            )
            z = m.forward_mae_decoder(x_enc, mask, image_shape=(h, w))
            return m.mar.forward_loss(z, tokens.reshape(b, h * w, c), mask, key=k_diff)[0]

        return jnp.stack(
            [loss(tokens, ids, am), loss(tokens, ids[perm], am[perm]), loss(tokens[perm], ids, am)]
        )

    own, shuffled_text, shuffled_context = np.mean(
        [np.asarray(paired_losses(state, k)) for k in jax.random.split(key, repeats)], axis=0
    )
    return {
        "loss": float(own),
        "shuffled_text": float(shuffled_text),
        "shuffled_context": float(shuffled_context),
        "text_gap": float(shuffled_text / own - 1.0),
        "context_gap": float(shuffled_context / own - 1.0),
        "mask_ratio": float(mask_ratio),
        "pairs": len(captions),
    }
