"""Configs are validated before anything compiles: one clear line per impossible value."""

import importlib.util
import pathlib

import ml_collections
import pytest
from toy_family import toy_config

from unified_mm import families
from unified_mm.config.args import parse_arg
from unified_mm.config.validation import validate_config
from unified_mm.parallel.mesh import MeshError, build_mesh
from unified_mm.train.stages import stages_from_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _validate(config):
    family = families.build(config)
    stages = stages_from_config(config)
    validate_config(config, family, stages, build_mesh(config.mesh))


def test_toy_config_is_valid():
    _validate(toy_config())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda c: c.stages.head_only.task_batch.update(dict(t2i=6)),
            "not divisible by the data-parallel size 4",
        ),
        (lambda c: setattr(c, "stage_order", ("head_only", "nope")), "unknown stage"),
        (
            lambda c: setattr(c.stages.all, "trainable", ("encoder", "decoder")),
            "unknown parameter group",
        ),
        (lambda c: setattr(c.stages.all, "schedule", "linear"), "schedule 'linear'"),
        (lambda c: setattr(c.stages.all, "warmup_steps", 100), "warmup_steps 100 exceed"),
        (lambda c: c.stages.all.task_batch.update(dict(i2t=8)), "unknown task"),
        (lambda c: setattr(c.ema, "decay", 1.5), "ema.decay"),
        (lambda c: setattr(c.checkpoint, "every_steps", 0), "every_steps must be positive"),
    ],
)
def test_impossible_values_fail_in_one_line(mutate, message):
    config = toy_config()
    with config.unlocked():
        mutate(config)
    with pytest.raises(ValueError, match=message) as err:
        _validate(config)
    assert "\n" not in str(err.value)


def test_mesh_larger_than_the_devices():
    config = toy_config()
    config.mesh.data = 4  # 4 x 2 x 2 = 16 > 8 devices
    with pytest.raises(MeshError, match="use 16 devices but 8 are available"):
        build_mesh(config.mesh)


def test_locked_config_rejects_a_misspelt_key():
    config = toy_config()
    config.lock()
    with pytest.raises(AttributeError, match="lerning_rate"):
        config.lerning_rate = 1.0


def test_parse_arg_types_and_unknown_keys():
    a = parse_arg("smoke,size=0p5b,steps=3", smoke=False, size="1p5b", steps=10)
    assert a.smoke is True and a.size == "0p5b" and a.steps == 3
    with pytest.raises(ValueError, match="'bogus' is unknown"):
        parse_arg("bogus=1", smoke=False)
    with pytest.raises(ValueError, match="is not a int"):
        parse_arg("steps=x", steps=1)


@pytest.mark.parametrize(
    "name",
    [
        "shapes_harmon",
        "shapes_harmon_ablation",
        "shapes_vqrae",
        "harmon_0p5b",
        "harmon_1p5b",
        "vqrae_siglip2",
    ],
)
@pytest.mark.parametrize("arg", ["", "smoke"])
def test_every_config_builds_and_validates(name, arg):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    assert config.get_config_docstring() if hasattr(config, "get_config_docstring") else True
    assert "python -m unified_mm.main" in module.__doc__
    family = families.build(config)
    stages = stages_from_config(config)
    mesh_cfg = ml_collections.ConfigDict(config.mesh.to_dict())
    mesh_cfg.update(dict(data=-1, fsdp=1, tensor=1, num_slices=1))
    # Paper batch sizes are for pods: validate the stage table against its own groups and tasks.
    family.validate(stages)
    for s in stages:
        assert set(s.trainable) <= set(family.param_groups()), s.name
        assert set(s.task_batch) <= set(family.tasks), s.name


def _ablation(arg: str) -> ml_collections.ConfigDict:
    path = ROOT / "configs" / "shapes_harmon_ablation.py"
    spec = importlib.util.spec_from_file_location("shapes_harmon_ablation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_ablation_config_changes_one_thing_at_a_time():
    base = _ablation("")
    assert base.stage_order == ("full",) and base.stages.full.steps == 800
    assert dict(base.stages.full.task_batch) == {"i2t": 32, "t2i": 32}
    assert base.model.mar.diffusion_prediction == "v" and base.model.pixel_patch == 8
    c = _ablation("steps=300,t2i=0,patch=4,llm_depth=4,turns=1,lr=5e-3,prediction=epsilon,ema=0")
    assert c.stages.full.steps == 300 and dict(c.stages.full.task_batch) == {"i2t": 32}
    assert (c.model.mar.seq_h, c.model.mar.vae_embed_dim, c.model.vae.stride) == (8, 48, 4)
    assert c.model.llm.num_hidden_layers == 4 and c.data.qa_turns == 1
    assert c.stages.full.lr == 5e-3 and c.ema.decay == 0.0
    assert c.model.mar.diffusion_prediction == "epsilon"
    _validate(c)
    assert "mar_encoder" in base.stages.full.trainable and "init" not in base
    started = _ablation("init=/x/harmon_official.safetensors,freeze_encoder=true")
    assert started.init.harmon_checkpoint == "/x/harmon_official.safetensors"
    assert "mar_encoder" not in started.stages.full.trainable
    assert "llm" in started.stages.full.trainable
    coarse = _ablation("patch=16")
    assert coarse.model.mar.seq_h == 2 and coarse.eval.num_iter == 4
    _validate(coarse)
    with coarse.unlocked():
        coarse.eval.num_iter = 5
    with pytest.raises(ValueError, match="eval.num_iter 5 exceeds the 4 tokens of a 32 px image"):
        _validate(coarse)
    factorised = _ablation("colour_cell=4")
    assert factorised.model.pixel_colour_cell == 4
    assert factorised.model.mar.vae_embed_dim == 64 + 3 * 4
    _validate(factorised)
    unmasked = _ablation("mask_min=0.0")
    assert unmasked.model.mar.mask_ratio_min == 0.0 and base.model.mar.mask_ratio_min == 0.7
    _validate(unmasked)
    assert tuple(base.model.mar.conv_stem) == ()
    stem = _ablation("stem=16")
    assert tuple(stem.model.mar.conv_stem) == (16, 32, 64) and stem.model.mar.conv_stem_patch == 8
    _validate(stem)
    fine_stem = _ablation("stem=8,patch=4")
    assert tuple(fine_stem.model.mar.conv_stem) == (8, 16)
    _validate(fine_stem)
    assert dict(base.data.question_weights) == {}
    counting = _ablation("count_weight=4")
    assert dict(counting.data.question_weights) == {"count": 4.0}
    _validate(counting)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("i2t=0,t2i=0", "nothing would train"),
        ("patch=5", "patch=5 does not divide 32"),
        ("geneval=0", "at least 1 prompt per category"),
        ("colour_cell=3", "colour_cell 3 must be 0 or divide the patch 8"),
        ("stem=-1", "stem=-1; 0 \\(off\\) or the first channels"),
        ("count_weight=0", "count_weight=0.0; it must be > 0"),
    ],
)
def test_ablation_config_refuses_impossible_arguments(arg, message):
    with pytest.raises(ValueError, match=message):
        _ablation(arg)
