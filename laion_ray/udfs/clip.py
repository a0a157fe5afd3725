"""``clip-embed`` and ``moderation-clip``: open_clip embeddings and zero-shot labels.

``clip-embed`` is two stages, so decoding scales on CPUs apart from the model:

1. ``clip-preprocess`` (function, 0.5 CPU): image bytes -> ``_clip_pixels_<h>x<w>``,
   uint8 pixels resized and cropped like open_clip's ``preprocess`` (see
   :mod:`laion_ray.preprocess`). Its identity holds only the geometry, not the
   model, so two CLIP UDFs with the same image size in one run decode once.
2. ``clip-embed`` (actor; one GPU, or one CPU): normalises the pixels on the
   model's device and writes L2-normalised float32 embeddings, and optionally
   caption embeddings.

``moderation-clip`` labels an image embedding with the closest of a few text
prompts, embedded once per actor with the same model.

torch and open_clip are imported inside functions, so importing this module
(``laion-ray info``) stays fast.

Examples:
    >>> stages = make_clip_embed(model="ViT-B-32", pretrained="laion2b_s34b_b79k")  # doctest: +SKIP
    >>> [s.name for s in stages]  # doctest: +SKIP
    ['clip-preprocess', 'clip-embed']
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.errors import LaionRayError
from laion_ray.preprocess import PixelSpec, preprocess_images
from laion_ray.udf import UDF, register

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PROMPTS: dict[str, str] = {
    "safe": "a safe photo",
    "nsfw": "an explicit nsfw photo",
    "violence": "a violent photo",
    "medical": "a medical photo",
}
PRECISIONS = ("fp32", "fp16", "bf16")
# Rows per preprocess task. Fixed (not the model's batch size) so the stage is
# identical, and so run once, for every CLIP UDF of a run with the same image size.
PREPROCESS_BATCH_SIZE = 256
_HUB_PROBE_TIMEOUT_S = 3.0


# --- names and specs ------------------------------------------------------------


def model_slug(model: str) -> str:
    """``ViT-B-32`` -> ``vit_b_32``; ``hf-hub:org/CLIP-ViT-L-14`` -> ``clip_vit_l_14``."""
    name = model.split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def default_embedding_column(model: str) -> str:
    """The column ``clip-embed`` writes by default, e.g. ``img_emb_vit_b_32``."""
    return f"img_emb_{model_slug(model)}"


def pixel_column(spec: PixelSpec) -> str:
    """Intermediate pixel column, named by geometry so different sizes never clash."""
    h, w = spec.size
    return f"_clip_pixels_{h}x{w}"


def clip_spec(
    model: str, pretrained: str | None = None, *, cache_dir: str | None = None
) -> tuple[int, dict[str, Any]]:
    """Embedding width and preprocess config of a model, without loading weights.

    Returns:
        ``(embed_dim, preprocess_cfg)`` where ``preprocess_cfg`` has open_clip's
        keys (``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``,
        ``fill_color``).

    Raises:
        LaionRayError: unknown model or tag, or an ``hf-hub:`` config that cannot
            be fetched.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg: dict[str, Any] = dict(PreprocessCfg().__dict__)
    if model.startswith("hf-hub:"):
        with _hub_guard():
            try:
                hf_config = open_clip.factory._get_hf_config(model[7:], cache_dir=cache_dir)
            except Exception as exc:
                raise LaionRayError(_fetch_error(model, None, exc)) from exc
        model_cfg = hf_config["model_cfg"]
        cfg = merge_preprocess_dict(cfg, hf_config.get("preprocess_cfg", {}))
    elif model.startswith("local-dir:"):
        path = Path(model[10:]) / "open_clip_config.json"
        if not path.is_file():
            raise LaionRayError(f"no open_clip_config.json in {model!r}")
        local = json.loads(path.read_text())
        model_cfg = local["model_cfg"]
        cfg = merge_preprocess_dict(cfg, local.get("preprocess_cfg", {}))
    else:
        model_cfg = open_clip.get_model_config(model.replace("/", "-"))
        if model_cfg is None:
            raise LaionRayError(
                f"unknown open_clip model {model!r}; see open_clip.list_models() "
                "(or use an 'hf-hub:org/repo' or 'local-dir:/path' name)"
            )
        tag_cfg = _tag_cfg(model, pretrained)
        if tag_cfg:
            cfg = merge_preprocess_dict(cfg, tag_cfg)
    cfg["size"] = model_cfg["vision_cfg"].get("image_size", cfg["size"])
    return int(model_cfg["embed_dim"]), cfg


def _tag_cfg(model: str, pretrained: str | None) -> dict[str, Any] | None:
    """open_clip's config for a pretrained tag; None for no tag or a file path."""
    import open_clip

    if not pretrained or os.path.isfile(pretrained):
        return None
    name = model.replace("/", "-")
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise LaionRayError(
            f"unknown pretrained tag {pretrained!r} for {model!r}; "
            f"known: {', '.join(tags) or 'none'}"
        )
    return cfg


# --- loading --------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    """A quick TCP probe of the Hugging Face endpoint (cached per process)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), _HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_guard() -> Iterator[None]:
    """Offline mode for huggingface_hub while the hub is unreachable.

    Without it a missing file costs ~45 s of retries before failing; with it,
    cached files still load and missing ones fail at once.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # open_clip then cannot use the hub at all
        yield
        return
    if constants.HF_HUB_OFFLINE or _hub_reachable():
        yield
        return
    # huggingface_hub reads the variable at import; the constant is what it checks.
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _fetch_error(model: str, pretrained: str | None, exc: BaseException) -> str:
    what = f"model {model!r}" + (f" pretrained tag {pretrained!r}" if pretrained else "")
    cause = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return (
        f"cannot fetch the weights of {what} (hub unreachable or not cached: {cause}); "
        "download them where there is a network and pass the file with "
        "--checkpoint /path/to/open_clip_model.safetensors (checkpoint=...), "
        "or use --random-weights for a test run"
    )


def _resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LaionRayError(f"device {device!r} requested but CUDA is not available")
    return device


def _resolve_precision(precision: str | None, device: str) -> str:
    if precision is None:
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision not in PRECISIONS:
        raise LaionRayError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and not device.startswith("cuda"):
        raise LaionRayError("precision 'fp16' needs a CUDA device; use 'fp32' or 'bf16' on CPU")
    return precision


def _check_source(
    model: str, pretrained: str | None, checkpoint: str | None, allow_random: bool
) -> None:
    """Fail before any work when no weights are named or the checkpoint is missing."""
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise LaionRayError(f"checkpoint {checkpoint!r} is not a file")
    has_source = checkpoint or pretrained or model.startswith(("hf-hub:", "local-dir:"))
    if not has_source and not allow_random:
        raise LaionRayError(
            f"no weights for model {model!r}: pass a pretrained tag (e.g. pretrained="
            "'laion2b_s34b_b79k'), --checkpoint /path/to/open_clip_model.safetensors, or "
            "--random-weights (random_weights=True) for a test run"
        )


def load_clip(
    model: str,
    *,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    allow_random: bool = False,
    device: str | None = None,
    precision: str | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    cache_dir: str | None = None,
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Load an open_clip model, in eval mode, on ``device``.

    Weights come from, in this order: ``checkpoint`` (a state_dict saved from
    open_clip, ``.pt``/``.bin``/``.safetensors``; ``pretrained`` then only picks
    the tag's preprocessing), a ``pretrained`` tag or file (fetched from the
    hub, or its cache), an ``hf-hub:``/``local-dir:`` model name, or, only with
    ``allow_random``, a random initialisation seeded by ``seed`` (so every actor
    of a run builds the same model).

    Args:
        model: open_clip model name (``ViT-B-32``), ``hf-hub:org/repo`` or
            ``local-dir:/path``.
        pretrained: open_clip pretrained tag, e.g. ``laion2b_s34b_b79k``.
        checkpoint: Local weights file.
        allow_random: Permit random weights when no source is given.
        device: ``cpu``, ``cuda`` or ``cuda:N``; default CUDA when available.
        precision: ``fp32``, ``fp16`` or ``bf16``: the autocast dtype used at
            inference (weights stay fp32). Default fp16 on CUDA, fp32 on CPU.
        seed: torch seed for random weights.
        num_threads: torch CPU threads (default: leave torch's setting).
        cache_dir: Download cache (default: the Hugging Face cache).

    Returns:
        ``(model, preprocess_reference, tokenizer, info)``: open_clip's own
        inference transform (the parity reference) and ``info`` with ``model``,
        ``pretrained``, ``checkpoint``, ``random``, ``device``, ``precision``,
        ``embed_dim`` and ``preprocess_cfg``.

    Raises:
        LaionRayError: no weights named, weights that cannot be fetched (one line
            naming the model and tag and how to pass ``--checkpoint``), a
            checkpoint that does not fit the model, or a bad device/precision.
    """
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    device = _resolve_device(device)
    precision = _resolve_precision(precision, device)
    if pretrained and os.path.isfile(pretrained) and checkpoint is None:
        pretrained, checkpoint = None, pretrained
    _check_source(model, pretrained, checkpoint, allow_random)
    embed_dim, preprocess_cfg = clip_spec(model, pretrained, cache_dir=cache_dir)
    is_random = False
    common = dict(device="cpu", pretrained_text=False, pretrained_image=False, cache_dir=cache_dir)

    with _hub_guard():
        if checkpoint is not None:
            try:
                tag_cfg = (
                    None
                    if model.startswith(("hf-hub:", "local-dir:"))
                    else _tag_cfg(model, pretrained)
                )
                net = open_clip.create_model(
                    model,
                    None,
                    load_weights=False,
                    force_quick_gelu=bool(tag_cfg and tag_cfg.get("quick_gelu")),
                    force_preprocess_cfg=preprocess_cfg,
                    **common,
                )
            except Exception as exc:
                raise LaionRayError(_fetch_error(model, None, exc)) from exc
            try:
                open_clip.load_checkpoint(net, checkpoint, strict=True)
            except Exception as exc:
                first = str(exc).splitlines()[0][:300]
                raise LaionRayError(
                    f"checkpoint {checkpoint!r} does not fit model {model!r}: {first}"
                ) from exc
        elif pretrained or model.startswith(("hf-hub:", "local-dir:")):
            try:
                net = open_clip.create_model(model, pretrained, require_pretrained=True, **common)
            except Exception as exc:
                raise LaionRayError(_fetch_error(model, pretrained, exc)) from exc
        else:
            logger.warning(
                "model %s uses RANDOM weights (seed %d): embeddings are for testing only",
                model,
                seed,
            )
            is_random = True
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = open_clip.create_model(model, None, **common)
        try:
            tokenizer = open_clip.get_tokenizer(model, cache_dir=cache_dir)
        except Exception as exc:
            raise LaionRayError(_fetch_error(model, pretrained, exc)) from exc

    if device == "cpu" and num_threads:
        torch.set_num_threads(int(num_threads))
    net = net.to(device).eval().requires_grad_(False)
    cfg = dict(net.visual.preprocess_cfg)
    reference = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    info = {
        "model": model,
        "pretrained": pretrained,
        "checkpoint": checkpoint,
        "random": is_random,
        "device": device,
        "precision": precision,
        "embed_dim": embed_dim,
        "preprocess_cfg": cfg,
    }
    return net, reference, tokenizer, info


# --- arrow helpers ----------------------------------------------------------------


def _embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def _fixed_list(values: np.ndarray, valid: np.ndarray, dim: int) -> pa.Array:
    """``(n_valid, dim)`` values scattered into ``len(valid)`` rows, null where invalid."""
    n = len(valid)
    full = np.zeros((n, dim), dtype=np.float32)
    full[valid] = values
    mask = None if valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), dim, mask=mask)


def _valid_mask(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.is_valid(column).to_numpy(zero_copy_only=False), dtype=bool)


def _list_to_numpy(column: pa.ChunkedArray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Valid rows of a (fixed-size or variable) list column as a 2-D array, and the mask."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = _valid_mask(array)
    kind = array.type
    if not (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    ):
        raise LaionRayError(f"column {name!r} must be a list of numbers, got {array.type}")
    present = array.filter(pa.array(valid)) if not valid.all() else array
    n = len(present)
    flat = present.flatten().to_numpy(zero_copy_only=False)
    if n and flat.size % n:
        raise LaionRayError(f"column {name!r} has lists of different lengths")
    return flat.reshape(n, -1 if n else 0), valid


# --- torch helpers (torch imported lazily) ------------------------------------------


def _autocast(device: Any, dtype: Any) -> contextlib.AbstractContextManager:
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _unit_float32(features: Any) -> np.ndarray:
    """L2-normalise in fp32 (whatever the autocast dtype) and move to numpy."""
    import torch

    features = torch.nn.functional.normalize(features.float(), dim=-1)
    return features.cpu().numpy().astype(np.float32, copy=False)


def _embed_texts(
    net: Any, tokenizer: Any, texts: Sequence[str], device: Any, dtype: Any
) -> np.ndarray:
    import torch

    tokens = tokenizer(list(texts)).to(device)
    with torch.inference_mode(), _autocast(device, dtype):
        return _unit_float32(net.encode_text(tokens))


# --- stage 1: preprocess ----------------------------------------------------------


def clip_preprocess(
    batch: pa.Table,
    *,
    size: Sequence[int],
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill_color: int = 0,
) -> pa.Table:
    """``image`` bytes -> uint8 pixels (``fixed_size_list<uint8, h*w*3>``, HWC order).

    Raises:
        ImageDecodeError: on the first image that cannot be decoded; the engine
            bisects the batch to find it.
    """
    spec = PixelSpec(tuple(size), resize_mode, interpolation, fill_color)
    pixels = preprocess_images(batch["image"].to_pylist(), spec)
    array = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), spec.num_values)
    return pa.Table.from_arrays([array], names=[pixel_column(spec)])


def preprocess_stage(spec: PixelSpec, **resources: Any) -> UDF:
    """The decode stage: equal for every model with the same geometry."""
    field = pa.field(pixel_column(spec), pa.list_(pa.uint8(), spec.num_values))
    return UDF(
        name="clip-preprocess",
        version="1",
        inputs=("image",),
        output_schema=pa.schema([field]),
        compute=clip_preprocess,
        params=spec.as_params(),
        batch_size=PREPROCESS_BATCH_SIZE,
    ).with_options(**resources)


# --- stage 2: the model -----------------------------------------------------------


class ClipEmbed:
    """Actor: pixels (and captions) -> L2-normalised float32 embeddings.

    Constructed once per actor with the stage's ``params``; loads the model then.
    Rows with null pixels or captions (normally skipped by the engine) give nulls.
    """

    def __init__(
        self,
        *,
        model: str,
        pretrained: str | None,
        checkpoint: str | None,
        random_weights: bool,
        seed: int,
        device: str | None,
        precision: str | None,
        num_threads: int | None,
        pixel_column: str,
        size: Sequence[int],
        column: str,
        caption_input: str | None = None,
        caption_column: str | None = None,
    ) -> None:
        import torch

        self.net, _, self.tokenizer, self.info = load_clip(
            model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            allow_random=random_weights,
            device=device,
            precision=precision,
            seed=seed,
            num_threads=num_threads,
        )
        cfg = self.info["preprocess_cfg"]
        loaded = PixelSpec.from_preprocess_cfg(cfg).size
        if loaded != tuple(size):
            raise LaionRayError(
                f"model {model!r} expects {loaded} pixels but the stage was planned for {size}"
            )
        self.device = torch.device(self.info["device"])
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.info["precision"])
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        self.size = tuple(size)
        self.dim = self.info["embed_dim"]
        self.pixel_column = pixel_column
        self.column = column
        self.caption_input = caption_input
        self.caption_column = caption_column

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """``(n, h, w, 3)`` uint8 -> ``(n, dim)`` float32; normalised on the device."""
        import torch

        if not pixels.flags.writeable:
            pixels = pixels.copy()  # torch wants writable memory; 150 KB per image
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self.mean).div_(self.std)
        with torch.inference_mode(), _autocast(self.device, self.dtype):
            return _unit_float32(self.net.encode_image(x))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> ``(n, dim)`` float32."""
        return _embed_texts(self.net, self.tokenizer, texts, self.device, self.dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        h, w = self.size
        flat, valid = _list_to_numpy(batch[self.pixel_column], self.pixel_column)
        pixels = flat.reshape(-1, h, w, 3)
        emb = self.embed_pixels(pixels) if len(pixels) else np.zeros((0, self.dim), np.float32)
        columns = {self.column: _fixed_list(emb, valid, self.dim)}
        if self.caption_input is not None:
            captions = batch[self.caption_input]
            cap_valid = _valid_mask(captions)
            texts = [t for t in captions.to_pylist() if t is not None]
            cap = self.embed_texts(texts) if texts else np.zeros((0, self.dim), np.float32)
            columns[self.caption_column] = _fixed_list(cap, cap_valid, self.dim)
        return pa.table(columns)


def _model_resources(device: str | None) -> tuple[str, dict[str, Any]]:
    """Device to plan for, and the actor resources that go with it."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        gpus = max(1, torch.cuda.device_count())
        return device, {"num_gpus": 1.0, "num_cpus": 1.0, "concurrency": (1, gpus)}
    # One actor using the node's torch threads; fractional CPUs so read and decode
    # tasks still get scheduled on a small node.
    return device, {"num_gpus": 0.0, "num_cpus": 1.0, "concurrency": 1}


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise LaionRayError(f"{what} must be a non-empty column name, got {value!r}")
    return value


@register("clip-embed")
def make_clip_embed(
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    random_weights: bool = False,
    column: str | None = None,
    captions: bool = False,
    caption_column: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    **resources: Any,
) -> list[UDF]:
    """Image (and caption) embeddings with an open_clip model.

    Args:
        model: open_clip name, ``hf-hub:org/repo`` or ``local-dir:/path``.
        pretrained: Pretrained tag, fetched from the hub or its cache.
        checkpoint: Local open_clip state_dict (``.pt``/``.bin``/``.safetensors``);
            must be readable on every worker node.
        random_weights: Allow random weights (testing only; logs a warning).
        column: Output column; default ``img_emb_<model>`` (``column="img_emb"``
            overwrites LAION's column in place).
        captions: Also embed ``caption`` into ``caption_column``.
        caption_column: Default ``caption_emb_<model>``.
        batch_size: Rows per model call; default 256 on CUDA, 32 on CPU.
        device: ``cpu``/``cuda``; default CUDA when the driver sees one.
        precision: Autocast dtype ``fp32``/``fp16``/``bf16``; default fp16 on CUDA.
        seed: Seed of random weights.
        num_threads: torch threads per CPU actor.
        **resources: Overrides for the model stage (``num_cpus``, ``concurrency``...).

    Returns:
        ``[clip-preprocess, clip-embed]``.

    Raises:
        LaionRayError: a bad argument, unknown model or tag, missing checkpoint,
            or no weights named without ``random_weights``.
    """
    model = _check_name(model, "model")
    _check_source(model, pretrained, checkpoint, bool(random_weights))
    embed_dim, cfg = clip_spec(model, pretrained)
    spec = PixelSpec.from_preprocess_cfg(cfg)
    column = _check_name(column or default_embedding_column(model), "column")
    if captions:
        caption_column = _check_name(
            caption_column or f"caption_emb_{model_slug(model)}", "caption_column"
        )
        if caption_column == column:
            raise LaionRayError(f"caption_column and column are both {column!r}")
    device, model_resources = _model_resources(device)
    _resolve_precision(precision, device)
    if batch_size is None:
        batch_size = 256 if device.startswith("cuda") else 32
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LaionRayError(f"batch_size must be a positive integer, got {batch_size!r}")

    fields = [pa.field(column, _embedding_type(embed_dim))]
    inputs = [pixel_column(spec)]
    if captions:
        fields.append(pa.field(caption_column, _embedding_type(embed_dim)))
        inputs.append("caption")
    params = {
        "model": model,
        "pretrained": pretrained,
        "checkpoint": checkpoint,
        "random_weights": bool(random_weights),
        "seed": int(seed),
        "device": device,
        "precision": precision,
        "num_threads": num_threads,
        "pixel_column": pixel_column(spec),
        "size": list(spec.size),
        "column": column,
        "caption_input": "caption" if captions else None,
        "caption_column": caption_column if captions else None,
    }
    embed = UDF(
        name="clip-embed",
        version="1",
        inputs=tuple(inputs),
        output_schema=pa.schema(fields),
        compute=ClipEmbed,
        params=params,
        batch_size=batch_size,
        **model_resources,
    ).with_options(**resources)
    return [preprocess_stage(spec), embed]


# --- moderation ---------------------------------------------------------------------


class ClipModeration:
    """Actor: image embedding -> the label of the closest prompt, and its cosine.

    The prompts are embedded once, at construction; the model is then dropped,
    so a batch is one matrix product.
    """

    def __init__(
        self,
        *,
        model: str,
        pretrained: str | None,
        checkpoint: str | None,
        random_weights: bool,
        seed: int,
        device: str | None,
        prompts: Mapping[str, str | Sequence[str]],
        embedding_column: str,
        column: str,
        score_column: str,
        use_nsfw_flag: bool,
        nsfw_label: str,
        nsfw_threshold: float,
    ) -> None:
        import torch

        net, _, tokenizer, info = load_clip(
            model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            allow_random=random_weights,
            device=device or "cpu",
            precision="fp32",
            seed=seed,
        )
        device = torch.device(info["device"])
        self.labels = list(prompts)
        rows = []
        for label in self.labels:
            texts = prompts[label]
            texts = [texts] if isinstance(texts, str) else list(texts)
            mean = _embed_texts(net, tokenizer, texts, device, None).mean(axis=0)  # ensemble
            rows.append(mean / np.linalg.norm(mean))
        self.text_emb = np.stack(rows).astype(np.float32)
        del net  # only the prompt embeddings are needed from here on
        self.embedding_column = embedding_column
        self.column = column
        self.score_column = score_column
        self.use_nsfw_flag = use_nsfw_flag
        self.nsfw_index = self.labels.index(nsfw_label) if use_nsfw_flag else None
        self.nsfw_threshold = nsfw_threshold

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n, dim)`` embeddings -> ``(n, labels)`` cosines."""
        if embeddings.shape[1] != self.text_emb.shape[1]:
            raise LaionRayError(
                f"column {self.embedding_column!r} has {embeddings.shape[1]}-d embeddings "
                f"but the model's are {self.text_emb.shape[1]}-d; embed with the same model"
            )
        emb = embeddings.astype(np.float32)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return (emb / np.where(norms > 0, norms, 1)) @ self.text_emb.T

    def _flagged(self, batch: pa.Table) -> np.ndarray:
        """NSFW flag per row: numeric >= threshold, or LAION's string ``"NSFW"``."""
        flag = batch["NSFW"]
        if pa.types.is_string(flag.type) or pa.types.is_large_string(flag.type):
            values = pc.fill_null(pc.utf8_upper(flag), "").to_numpy(zero_copy_only=False)
            return values == "NSFW"
        values = pc.cast(flag, pa.float64()).to_numpy(zero_copy_only=False)
        return np.nan_to_num(values, nan=-np.inf) >= self.nsfw_threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        emb, valid = _list_to_numpy(batch[self.embedding_column], self.embedding_column)
        n = batch.num_rows
        sims = self.scores(emb) if len(emb) else np.zeros((0, len(self.labels)), np.float32)
        top = sims.argmax(axis=1) if len(emb) else np.zeros(0, np.int64)
        index = np.zeros(n, dtype=np.int64)
        score = np.zeros(n, dtype=np.float32)
        index[valid] = top
        score[valid] = sims[np.arange(len(top)), top]
        if self.use_nsfw_flag:
            forced = self._flagged(batch) & valid
            index[forced] = self.nsfw_index
            full = np.zeros((n, len(self.labels)), np.float32)
            full[valid] = sims
            score[forced] = full[forced, self.nsfw_index]
        labels = np.asarray(self.labels, dtype=object)[index]
        labels[~valid] = None
        mask = None if valid.all() else ~valid
        return pa.table(
            {
                self.column: pa.array(labels, pa.string()),
                self.score_column: pa.array(score, pa.float32(), mask=mask),
            }
        )


def _check_prompts(prompts: Any) -> dict[str, str | list[str]]:
    if not isinstance(prompts, Mapping) or not prompts:
        raise LaionRayError(
            f"prompts must be a non-empty {{label: prompt}} mapping, got {prompts!r}"
        )
    out: dict[str, str | list[str]] = {}
    for label, text in prompts.items():
        texts = [text] if isinstance(text, str) else text
        if (
            not isinstance(label, str)
            or not label
            or not isinstance(texts, Sequence)
            or not texts
            or not all(isinstance(t, str) and t for t in texts)
        ):
            raise LaionRayError(
                f"bad prompt {label!r}: {text!r} (want a string or list of strings)"
            )
        out[label] = text if isinstance(text, str) else list(text)
    return out


@register("moderation-clip")
def make_moderation_clip(
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    checkpoint: str | None = None,
    random_weights: bool = False,
    embedding_column: str | None = None,
    prompts: Mapping[str, str | Sequence[str]] | None = None,
    column: str = "moderation_clip_label",
    score_column: str = "moderation_clip_score",
    use_nsfw_flag: bool = False,
    nsfw_label: str = "nsfw",
    nsfw_threshold: float = 0.5,
    device: str | None = None,
    seed: int = 0,
    batch_size: int = 4096,
    **resources: Any,
) -> list[UDF]:
    """Zero-shot moderation label from an image-embedding column.

    Args:
        model, pretrained, checkpoint, random_weights, seed: The CLIP model whose
            text tower embeds the prompts; it must be the model that made
            ``embedding_column``.
        embedding_column: Image embeddings to label; default the column
            ``clip-embed`` writes for ``model`` (run both in one pass), or an
            existing column such as ``img_emb``.
        prompts: ``{label: prompt or [prompts]}``; several prompts are averaged.
            Default :data:`DEFAULT_PROMPTS`.
        column, score_column: Outputs: the label (string) and its cosine (float32).
            Not ``moderation_label``, which ``moderation-rules`` writes.
        use_nsfw_flag: Rows whose ``NSFW`` flag is set (``>= nsfw_threshold``, or
            the string ``"NSFW"``) get ``nsfw_label`` whatever the cosines say.
        nsfw_label: The label forced by the flag; must be one of ``prompts``.
        device: Device that embeds the prompts (default CPU: a handful of texts).

    Returns:
        ``[moderation-clip]``.
    """
    model = _check_name(model, "model")
    _check_source(model, pretrained, checkpoint, bool(random_weights))
    clip_spec(model, pretrained)  # unknown model or tag fails here, not in an actor
    prompts = _check_prompts(DEFAULT_PROMPTS if prompts is None else prompts)
    embedding_column = _check_name(
        embedding_column or default_embedding_column(model), "embedding_column"
    )
    column, score_column = _check_name(column, "column"), _check_name(score_column, "score_column")
    if column == score_column:
        raise LaionRayError(f"column and score_column are both {column!r}")
    if use_nsfw_flag and nsfw_label not in prompts:
        raise LaionRayError(f"nsfw_label {nsfw_label!r} is not a prompt label: {list(prompts)}")
    params = {
        "model": model,
        "pretrained": pretrained,
        "checkpoint": checkpoint,
        "random_weights": bool(random_weights),
        "seed": int(seed),
        "device": device,
        "prompts": prompts,
        "embedding_column": embedding_column,
        "column": column,
        "score_column": score_column,
        "use_nsfw_flag": bool(use_nsfw_flag),
        "nsfw_label": nsfw_label,
        "nsfw_threshold": float(nsfw_threshold),
    }
    schema = pa.schema([pa.field(column, pa.string()), pa.field(score_column, pa.float32())])
    inputs = [embedding_column] + (["NSFW"] if use_nsfw_flag else [])
    return [
        UDF(
            name="moderation-clip",
            version="1",
            inputs=tuple(inputs),
            output_schema=schema,
            compute=ClipModeration,
            params=params,
            num_cpus=0.5,
            batch_size=batch_size,
            concurrency=1,
        ).with_options(**resources)
    ]
