"""open_clip models: names, preprocess specs and loading (weights or random init).

A model is an open_clip name plus either a pretrained tag (fetched from the hub
where there is a network; ``hf-hub:`` names too) or a local checkpoint file.
Random weights only on request. torch and open_clip are imported inside
functions, so importing this module stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from laion_ray.errors import LaionRayError
from laion_ray.preprocess import PixelSpec

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
PRECISIONS = ("fp32", "fp16", "bf16")
# The fields of open_clip's PreprocessCfg: a local config giving all of them is complete.
PREPROCESS_KEYS = frozenset(
    {"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"}
)
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
    if model.startswith("local-dir:"):
        model_cfg, cfg = _local_cfg(model)
    else:
        model_cfg, cfg = _open_clip_cfg(model, pretrained, cache_dir)
    cfg["size"] = model_cfg["vision_cfg"].get("image_size", cfg["size"])
    return int(model_cfg["embed_dim"]), cfg


def _local_cfg(model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and preprocess config of a ``local-dir:`` checkpoint."""
    path = Path(model[10:]) / "open_clip_config.json"
    if not path.is_file():
        raise LaionRayError(f"no open_clip_config.json in {model!r}")
    local = json.loads(path.read_text())
    given = local.get("preprocess_cfg", {})
    if given.keys() >= PREPROCESS_KEYS:
        # Complete settings plan without importing open_clip and torch: ~9 s of
        # CPU that the driver never needs.
        return local["model_cfg"], dict(given)
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    return local["model_cfg"], merge_preprocess_dict(PreprocessCfg().__dict__, given)


def _open_clip_cfg(
    model: str, pretrained: str | None, cache_dir: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and preprocess config of an open_clip or ``hf-hub:`` name."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg: dict[str, Any] = dict(PreprocessCfg().__dict__)
    if model.startswith("hf-hub:"):
        with _hub_guard():
            try:
                hf_config = open_clip.factory._get_hf_config(model[7:], cache_dir=cache_dir)
            except Exception as exc:
                raise LaionRayError(_fetch_error(model, None, exc)) from exc
        return hf_config["model_cfg"], merge_preprocess_dict(
            cfg, hf_config.get("preprocess_cfg", {})
        )
    model_cfg = open_clip.get_model_config(model.replace("/", "-"))
    if model_cfg is None:
        raise LaionRayError(
            f"unknown open_clip model {model!r}; see open_clip.list_models() "
            "(or use an 'hf-hub:org/repo' or 'local-dir:/path' name)"
        )
    tag_cfg = _tag_cfg(model, pretrained)
    return model_cfg, merge_preprocess_dict(cfg, tag_cfg) if tag_cfg else cfg


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


# --- the model a UDF uses ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The open_clip model of a CLIP UDF (``clip-embed``, ``clip-score``,
    ``moderation-clip``): which weights, and the precision it runs in.

    The factories keep these as explicit keyword parameters (their signatures
    type ``--param``) and build a spec from them; the stage's ``params`` hold
    the same flat keys as before (:meth:`params`), so UDF keys, and with them
    checkpoints and the producer metadata of stored columns, do not change.

    Attributes:
        model: open_clip name, ``hf-hub:org/repo`` or ``local-dir:/path``.
        pretrained: Pretrained tag (or a weights file, taken as ``checkpoint``).
        checkpoint: Local open_clip state_dict.
        random_weights: Allow a random initialisation (testing only).
        seed: Seed of random weights: every actor builds the same model.
        precision: Autocast dtype ``fp32``/``fp16``/``bf16``; None: fp16 on
            CUDA, fp32 on CPU.

    Examples:
        >>> spec = ModelSpec("ViT-B-32", random_weights=True)
        >>> spec.identity()
        {'model': 'ViT-B-32', 'pretrained': None, 'checkpoint': None, 'random_weights': True, 'seed': 0}
    """

    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    checkpoint: str | None = None
    random_weights: bool = False
    seed: int = 0
    precision: str | None = None

    def checked(self) -> ModelSpec:
        """Validated on the driver, before any work, with plain types.

        Raises:
            LaionRayError: a bad model name, a missing checkpoint, or no weights
                named without ``random_weights``.
        """
        if not isinstance(self.model, str) or not self.model:
            raise LaionRayError(
                "model must be an open_clip model name ('ViT-B-32', 'hf-hub:org/repo' or "
                f"'local-dir:/path'), got {self.model!r}"
            )
        check_source(self.model, self.pretrained, self.checkpoint, bool(self.random_weights))
        return dataclasses.replace(
            self, random_weights=bool(self.random_weights), seed=int(self.seed)
        )

    def check_precision(self, device: str | None) -> None:
        """Refuse a precision the device cannot run (fp16 needs CUDA; None: a GPU actor).

        Raises:
            LaionRayError: an unknown precision, or fp16 with ``device="cpu"``.
        """
        resolve_precision(self.precision, device or "cuda")

    def config(self) -> tuple[int, dict[str, Any]]:
        """``(embed_dim, preprocess_cfg)`` without loading weights (:func:`clip_spec`)."""
        return clip_spec(self.model, self.pretrained)

    def params(self, *, precision: bool = True) -> dict[str, Any]:
        """The stage parameters that name the model (flat, as the actors take them).

        Args:
            precision: Include ``precision``; a UDF whose precision is fixed
                (``moderation-clip`` embeds its prompts in fp32) leaves it out.
        """
        out = dataclasses.asdict(self)
        if not precision:
            del out["precision"]
        return out

    def identity(self) -> dict[str, Any]:
        """What makes two embeddings comparable: the weights (real weights do
        not depend on the seed; random ones do). Device and precision do not
        change the embedding space."""
        out = {k: getattr(self, k) for k in ("model", "pretrained", "checkpoint", "random_weights")}
        if self.random_weights:
            out["seed"] = self.seed
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ModelSpec:
        """The spec in a stage's ``params`` (see :meth:`params`); other keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def load_in_actor(
        self, *, device: str | None, num_threads: int | None = None
    ) -> tuple[Any, Any, Any, dict[str, Any]]:
        """:func:`load_clip_in_actor` of this model (the device decided where it runs)."""
        return load_clip_in_actor(
            self.model,
            pretrained=self.pretrained,
            checkpoint=self.checkpoint,
            allow_random=self.random_weights,
            device=device,
            precision=self.precision,
            seed=self.seed,
            num_threads=num_threads,
        )


def check_device(device: str | None) -> str | None:
    """A UDF's ``device`` parameter: None (the actor decides), ``cpu`` or ``cuda[:N]``.

    Raises:
        LaionRayError: any other value.
    """
    if device is not None and device != "cpu" and not device.startswith("cuda"):
        raise LaionRayError(f"device must be cpu or cuda, got {device!r}")
    return device


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


def resolve_precision(precision: str | None, device: str) -> str:
    if precision is None:
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision not in PRECISIONS:
        raise LaionRayError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and not device.startswith("cuda"):
        raise LaionRayError("precision 'fp16' needs a CUDA device; use 'fp32' or 'bf16' on CPU")
    return precision


def _names_weights(model: str, pretrained: str | None) -> bool:
    """Whether the model name or tag gives weights (a checkpoint aside).

    A ``local-dir:`` holding only ``open_clip_config.json`` gives none: it
    names an architecture, which ``allow_random`` may initialise. Weight files
    are found as open_clip finds them (``*.safetensors``, ``*.bin``, ``*.pth``).
    """
    if pretrained or model.startswith("hf-hub:"):
        return True
    if model.startswith("local-dir:"):
        directory = Path(model[10:])
        return any(any(directory.glob(f"*.{ext}")) for ext in ("safetensors", "bin", "pth"))
    return False


def check_source(
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


def load_clip_in_actor(
    model: str, *, device: str | None, precision: str | None, **options: Any
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """:func:`load_clip` on the device Ray gave this actor.

    Decided here, on the worker (:func:`laion_ray.cluster.actor_device`): the
    driver's hardware says nothing about it. A GPU actor that finds no CUDA
    device runs on the CPU, in fp32.
    """
    from laion_ray.cluster import actor_device

    device = actor_device(device)
    if device == "cpu" and precision == "fp16":
        precision = None
    return load_clip(model, device=device, precision=precision, **options)


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
    of a run builds the same model) of a built-in name or of a ``local-dir:``
    that holds only its config.

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
    precision = resolve_precision(precision, device)
    if pretrained and os.path.isfile(pretrained) and checkpoint is None:
        pretrained, checkpoint = None, pretrained
    check_source(model, pretrained, checkpoint, allow_random)
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
        elif _names_weights(model, pretrained) or not allow_random:
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
                net = open_clip.create_model(model, None, load_weights=False, **common)
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


# --- torch helpers (torch imported lazily) ------------------------------------------


def autocast(device: Any, dtype: Any) -> contextlib.AbstractContextManager:
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def unit_float32(features: Any) -> np.ndarray:
    """L2-normalise in fp32 (whatever the autocast dtype) and move to numpy."""
    import torch

    features = torch.nn.functional.normalize(features.float(), dim=-1)
    return features.cpu().numpy().astype(np.float32, copy=False)


def embed_texts(
    net: Any, tokenizer: Any, texts: Sequence[str], device: Any, dtype: Any
) -> np.ndarray:
    import torch

    tokens = tokenizer(list(texts)).to(device)
    with torch.inference_mode(), autocast(device, dtype):
        return unit_float32(encode_text_unpadded(net, tokens))


def encode_text_unpadded(net: Any, tokens: Any) -> Any:
    """``net.encode_text`` without the padding after the batch's longest caption.

    Under CLIP's causal mask no position attends to a later one, so the pooled
    (end-of-text) feature of each caption does not depend on the columns after
    it: cutting them gives the same features, and LAION captions (~15 of the 77
    context tokens) cost about a quarter of the text tower's work. Models
    without a causal mask or with another pooling keep open_clip's own path.
    """
    import open_clip
    import torch
    from open_clip.transformer import text_global_pool

    pool = getattr(net, "text_pool_type", None)
    if type(net) is not open_clip.CLIP or net.attn_mask is None or pool not in ("argmax", "eos"):
        return net.encode_text(tokens)
    if pool == "argmax":
        pooled_at = tokens.argmax(dim=-1)
    else:
        pooled_at = (tokens == net.text_eos_id).int().argmax(dim=-1)
    length = int(pooled_at.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = net.transformer.get_cast_dtype()
    x = net.token_embedding(tokens).to(cast_dtype)
    x = x + net.positional_embedding[:length].to(cast_dtype)
    x = net.transformer(x, attn_mask=net.attn_mask[:length, :length])
    x = text_global_pool(net.ln_final(x), tokens, pool, eos_token_id=net.text_eos_id)
    if isinstance(net.text_projection, torch.nn.Linear):
        return net.text_projection(x)
    return x @ net.text_projection if net.text_projection is not None else x
