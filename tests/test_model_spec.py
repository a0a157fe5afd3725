"""One ``ModelSpec`` for the three CLIP UDFs (issue 24, item 7): same keys, same checks.

No model is loaded: the factories only read open_clip's configs.
"""

from __future__ import annotations

import inspect
import typing

import pytest

from laion_ray.clip_model import ModelSpec
from laion_ray.errors import LaionRayError
from laion_ray.udf import UDF
from laion_ray.udfs.clip import ClipEmbed, make_clip_embed
from laion_ray.udfs.clip_score import ClipScore, make_clip_score
from laion_ray.udfs.moderation_clip import ClipModeration, make_moderation_clip

FACTORIES = {
    "clip-embed": make_clip_embed,
    "clip-score": make_clip_score,
    "moderation-clip": make_moderation_clip,
}
# Model parameters every CLIP factory takes; moderation-clip's precision is fixed.
MODEL_PARAMETERS = {
    "model": str,
    "pretrained": str | None,
    "checkpoint": str | None,
    "random_weights": bool,
    "seed": int,
}

# The keys these factories made before the refactor: a UDF key is the identity of
# checkpoints and the producer metadata of stored columns, so it must not move.
GOLDEN_KEYS = [
    (
        "clip-embed",
        {"model": "ViT-B-32", "random_weights": True},
        'clip-embed@1:{"caption_column": null, "caption_input": null, "checkpoint": null, '
        '"column": "img_emb_vit_b_32", "device": null, "model": "ViT-B-32", "num_threads": null, '
        '"pixel_column": "_clip_pixels_224x224", "precision": null, "pretrained": null, '
        '"random_weights": true, "seed": 0, "size": [224, 224]}',
    ),
    (
        "clip-embed",
        {
            "model": "ViT-B-32",
            "random_weights": True,
            "captions": True,
            "seed": 3,
            "precision": "bf16",
            "device": "cpu",
            "num_threads": 2,
            "column": "img_emb",
        },
        'clip-embed@1:{"caption_column": "caption_emb_vit_b_32", "caption_input": "caption", '
        '"checkpoint": null, "column": "img_emb", "device": "cpu", "model": "ViT-B-32", '
        '"num_threads": 2, "pixel_column": "_clip_pixels_224x224", "precision": "bf16", '
        '"pretrained": null, "random_weights": true, "seed": 3, "size": [224, 224]}',
    ),
    (
        "clip-embed",
        {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
        'clip-embed@1:{"caption_column": null, "caption_input": null, "checkpoint": null, '
        '"column": "img_emb_vit_b_32", "device": null, "model": "ViT-B-32", "num_threads": null, '
        '"pixel_column": "_clip_pixels_224x224", "precision": null, '
        '"pretrained": "laion2b_s34b_b79k", "random_weights": false, "seed": 0, '
        '"size": [224, 224]}',
    ),
    (
        "clip-score",
        {"model": "ViT-B-32", "random_weights": True},
        'clip-score@1:{"caption_column": "caption", "checkpoint": null, "column": "similarity", '
        '"device": null, "embedding_column": "img_emb_vit_b_32", "model": "ViT-B-32", '
        '"num_threads": null, "precision": null, "pretrained": null, "random_weights": true, '
        '"seed": 0}',
    ),
    (
        "clip-score",
        {
            "model": "ViT-B-32",
            "pretrained": "laion2b_s34b_b79k",
            "precision": "fp16",
            "column": "sim2",
        },
        'clip-score@1:{"caption_column": "caption", "checkpoint": null, "column": "sim2", '
        '"device": null, "embedding_column": "img_emb_vit_b_32", "model": "ViT-B-32", '
        '"num_threads": null, "precision": "fp16", "pretrained": "laion2b_s34b_b79k", '
        '"random_weights": false, "seed": 0}',
    ),
    (
        "moderation-clip",
        {"model": "ViT-B-32", "random_weights": True, "seed": 5, "use_nsfw_flag": True},
        'moderation-clip@1:{"checkpoint": null, "column": "moderation_clip_label", '
        '"device": null, "embedding_column": "img_emb_vit_b_32", "model": "ViT-B-32", '
        '"nsfw_label": "nsfw", "nsfw_threshold": 0.5, "pretrained": null, "prompts": '
        '{"medical": "a medical photo", "nsfw": "an explicit nsfw photo", '
        '"safe": "a safe photo", "violence": "a violent photo"}, "random_weights": true, '
        '"score_column": "moderation_clip_score", "seed": 5, "use_nsfw_flag": true}',
    ),
]


def _model_stage(name: str, params: dict) -> UDF:
    return [s for s in FACTORIES[name](**params) if s.name == name][0]


@pytest.mark.parametrize("name, params, key", GOLDEN_KEYS)
def test_keys_are_the_same_as_before_the_spec(name, params, key):
    assert _model_stage(name, params).key == key


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_each_factory_builds_its_model_from_one_spec(name):
    params = {"model": "ViT-B-32", "random_weights": True, "seed": 7}
    if name != "moderation-clip":
        params["precision"] = "bf16"
    stage = _model_stage(name, params)
    spec = ModelSpec.from_params(stage.params)
    assert spec == ModelSpec(**params)
    # moderation-clip embeds its prompts in fp32: no precision parameter to key on.
    assert ("precision" in stage.params) == (name != "moderation-clip")
    assert {k: stage.params[k] for k in spec.params(precision=False)} == spec.params(
        precision=False
    )


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factory_signatures_stay_explicit_and_typed(name):
    """``--param`` is typed from the factory's signature: every model parameter is
    an explicit keyword with a plain annotation, and nothing hides in ``**kwargs``
    except the stage's resource overrides."""
    factory = FACTORIES[name]
    signature = inspect.signature(factory)
    hints = typing.get_type_hints(factory)
    for parameter, annotation in MODEL_PARAMETERS.items():
        assert signature.parameters[parameter].kind is inspect.Parameter.KEYWORD_ONLY
        assert hints[parameter] == annotation, (name, parameter)
    if name != "moderation-clip":
        assert hints["precision"] == str | None


def test_clip_score_checks_producers_by_the_spec_identity():
    """What clip-score compares with a column's producer is the spec's identity:
    the weights, plus the seed only for random weights."""
    random = ModelSpec("ViT-B-32", random_weights=True, seed=2, precision="fp16")
    real = ModelSpec("ViT-B-32", pretrained="laion2b_s34b_b79k", seed=2)
    assert random.identity() == {
        "model": "ViT-B-32",
        "pretrained": None,
        "checkpoint": None,
        "random_weights": True,
        "seed": 2,
    }
    assert "seed" not in real.identity()
    [score] = make_clip_score(model="ViT-B-32", random_weights=True, seed=2)
    assert score.validate.keywords["model"] == random.identity()


def test_one_set_of_checks_for_the_three():
    for factory in FACTORIES.values():
        with pytest.raises(LaionRayError, match="no weights"):
            factory(model="ViT-B-32")
        for bad in ("", None, 32):
            with pytest.raises(LaionRayError, match="model must be an open_clip model name") as e:
                factory(model=bad, random_weights=True)
            assert "column" not in str(e.value) and f"got {bad!r}" in str(e.value)
        with pytest.raises(LaionRayError, match="unknown open_clip model"):
            factory(model="ViT-Nope", random_weights=True)
    for factory in (make_clip_embed, make_clip_score):
        with pytest.raises(LaionRayError, match="fp16"):
            factory(random_weights=True, device="cpu", precision="fp16")
        with pytest.raises(LaionRayError, match="device must be"):
            factory(random_weights=True, device="tpu")
    assert ModelSpec(random_weights=1, seed="3").checked() == ModelSpec(random_weights=True, seed=3)


def test_actors_take_the_spec_parameters_flat():
    """The actors get the stage's params as they are (flat keys), and read the
    model from them through the spec: no actor lists the six parameters itself."""
    for actor in (ClipEmbed, ClipScore, ClipModeration):
        names = set(inspect.signature(actor).parameters)
        assert not names & {"model", "pretrained", "checkpoint", "random_weights", "seed"}
