"""The shapes and dtypes of one training batch, per task, as the pipeline produces them.

Used wherever a batch must exist before data does: sharded initialisation, ahead-of-time
compilation for a topology, benchmarks. Keys and static lengths match `pipeline.make_train_iterator`
(t2i: `max_text_len`; i2t: `max_und_len`, image span included; image: pixels only).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections


def abstract_task_batch(
    data_cfg: ml_collections.ConfigDict, image_size: int, batch_per_task: Mapping[str, int]
) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """{task: {field: ShapeDtypeStruct}} for `batch_per_task` examples of each task."""
    sds, f32, i32 = jax.ShapeDtypeStruct, jnp.float32, jnp.int32
    out = {}
    for task, n in batch_per_task.items():
        image = sds((n, image_size, image_size, 3), f32)
        if task == "image":
            out[task] = {"image": image}
        elif task == "t2i":
            t = int(data_cfg.max_text_len)
            out[task] = {
                "image": image,
                "input_ids": sds((n, t), i32),
                "attention_mask": sds((n, t), i32),
            }
        elif task == "i2t":
            t = int(data_cfg.max_und_len)
            out[task] = {
                "image": image,
                "input_ids": sds((n, t), i32),
                "attention_mask": sds((n, t), i32),
                "labels": sds((n, t), i32),
            }
        else:
            raise ValueError(f"unknown task {task!r}; known: image, t2i, i2t")
    return out
