"""Harmon through the real trainer: the three-stage schedule on a 2x2x2 mesh, and the paper configs."""

import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from unified_mm import families
from unified_mm.parallel.mesh import build_mesh
from unified_mm.parallel.sharding import rules_from_config
from unified_mm.train.init import model_layout
from unified_mm.train.jsonl_writer import read_metrics
from unified_mm.train.train import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, arg=""):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _params_at(workdir, step):
    mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    out = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    mgr.close()
    return jax.tree.map(np.asarray, out["params"])


@pytest.mark.slow  # about 4 minutes on 2 cores (three stage compiles plus the final evaluation)
def test_three_stage_run_on_a_2x2x2_mesh(tmp_path):
    config = load_config("shapes_harmon", "smoke")
    with config.unlocked():
        config.mesh.update(dict(data=2, fsdp=2, tensor=2))
        config.stages.align.steps = 4  # two checkpoints inside stage I
        config.checkpoint.keep_last = 10
        config.evaluate_after_each_stage = False
        config.eval.geneval_prompts_per_category = 1
        config.eval.vqa_questions = 6
    report = train_and_evaluate(config, str(tmp_path))
    assert report["global_step"] == 8
    rows = {r["step"]: r for r in read_metrics(str(tmp_path))}
    assert all(np.isfinite(rows[s]["loss"]) for s in rows)
    # Stage I trains MAR, the diffusion head and the projectors; the LLM stays frozen.
    p2, p4 = _params_at(str(tmp_path), 2), _params_at(str(tmp_path), 4)
    for a, b in zip(jax.tree.leaves(p2["llm"]), jax.tree.leaves(p4["llm"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(p2["mar"]["z_proj"]["kernel"], p4["mar"]["z_proj"]["kernel"])
    # Stage II unfreezes the LLM.
    p6 = _params_at(str(tmp_path), 6)
    assert not np.array_equal(p4["llm"]["norm"]["scale"], p6["llm"]["norm"]["scale"])
    # Stage III runs at the higher resolution (positional embeddings interpolated on the fly:
    # the learned grid keeps its shape).
    meta = json.load(open(tmp_path / "checkpoints" / "8" / "meta" / "metadata"))
    assert meta["stage"] == "hires"
    assert (
        p6["mar"]["encoder_pos_embed_learned"].shape
        == _params_at(str(tmp_path), 8)["mar"]["encoder_pos_embed_learned"].shape
    )
    assert rows[7]["stage"] == 2 and report["final"]["image_size"] == 64
    assert "geneval" in report["final"] and "vqa" in report["final"]


@pytest.mark.parametrize(
    "name, expected_millions",
    # harmon_mar.md section 4 (measured by instantiating the official modules): total excluding
    # the VAE, including MAR's unused class embedding.
    [("harmon_0p5b", 704.9), ("harmon_1p5b", 2494.8)],
)
def test_paper_configs_have_the_official_parameter_counts(name, expected_millions):
    config = load_config(name)
    family = families.build(config)
    abstract = nnx.eval_shape(lambda: family.build_model(nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    vae = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract.vae, nnx.Param)))
    assert abs(vae / 1e6 - 66.46) < 0.01, vae
    assert abs((total - vae) / 1e6 - expected_millions) < 0.1, (total - vae) / 1e6
    # Logical axis names resolve to FSDP shardings on a mesh.
    layout = model_layout(family, build_mesh(config.mesh), rules_from_config(config.sharding_rules))
    spec = layout.param_shardings["llm"]["layers"]["mlp"]["gate_proj"]["kernel"].get_value().spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # layers, embed, mlp


@pytest.mark.slow
@pytest.mark.parametrize("name", ["harmon_0p5b", "harmon_1p5b"])
def test_paper_configs_train_a_few_steps_at_reduced_width(name, tmp_path):
    config = load_config(name, "smoke")
    report = train_and_evaluate(config, str(tmp_path))
    assert report["global_step"] == 6
    rows = read_metrics(str(tmp_path))
    assert rows and all(np.isfinite(r["loss"]) for r in rows)


def test_understanding_logits_only_on_rows_that_can_carry_labels():
    """The family takes logits on `label_rows` per sample (the image span never carries a label):
    real packed batches of the main config never exceed it, and the bounded loss is the full one."""
    from unified_mm.families.harmon import label_rows
    from unified_mm.train.stages import stages_from_config

    config = load_config("shapes_harmon", "smoke")
    family = families.build(config)
    (stage,) = [s for s in stages_from_config(config) if s.name == "full"]
    it = family.make_train_iterator(stage, seed=0, process_index=0, process_count=1)
    batch = next(it)["i2t"]
    it.close()
    rows, und_len = batch["labels"].shape
    bound = label_rows(und_len, family.image_tokens(stage.image_size))
    valid = (batch["labels"][:, 1:] >= 0).sum(axis=1)
    assert bound < und_len - 1 and 0 < valid.max() <= bound

    model = family.build_model(nnx.Rngs(0))
    key = jax.random.key(0)
    loss, metrics = family.loss(model, {"i2t": batch}, key, step=0, stage=stage)
    k_i2t = jax.random.split(key)[1]  # the key family.loss hands the understanding loss
    full, m = model.i2t_loss(
        batch["image"],
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        k_i2t,
        deterministic=False,
        grad_scale=family.model_cfg.grad_scale,
    )
    np.testing.assert_allclose(float(metrics["loss/i2t"]), float(full), rtol=1e-6)
    assert int(m["label_tokens"]) == int(valid.sum())
