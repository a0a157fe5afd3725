"""``embedding-head``: a small MLP over an embedding the table already stores.

LAION's aesthetic predictor and CLIP-based NSFW detector are such heads over
ViT-L/14 image embeddings (the card's 768-d ``img_emb``), so they need no image
decode at all. The layer sizes come from a local ``state_dict`` file:

- every 2-D ``<prefix>.weight`` (with its ``<prefix>.bias``) is a Linear layer,
  in the file's order (``.pt``/``.pth``: as saved; ``.safetensors`` sorts its
  keys, so the natural order of the names: ``layers.2`` before ``layers.10``);
- 1-D ``<prefix>.mean`` and ``<prefix>.variance`` of the input width are an
  input standardisation (the Keras ``Normalization`` of the NSFW detector);
- dropout has no weights and is the identity at inference.

The input is L2-normalised first, as the LAION heads were trained; ``activation``
goes between the layers and ``sigmoid`` after the last one. Presets:

- ``aesthetic`` -> ``aesthetic_score`` float32: LAION's improved aesthetic
  predictor, 768->1024->128->64->16->1 with no activation between the layers;
- ``nsfw`` -> ``nsfw_score`` float32 in [0, 1]: LAION's CLIP-based NSFW
  detector, Linear layers with ReLU and a sigmoid.

A stack of Linear layers with no activation is one affine map, so such a head
(the aesthetic one) is folded, in float64, into a single 768-vector dot product
per row: the same function, at about 1/1000 of the arithmetic, which is what
makes hundreds of thousands of rows per second on one core possible.

The stage is a function task (fused with the read and the checkpoint write, and
runnable by the local executor) that loads its head once per worker process:
a head is a few MB and loads in milliseconds.

Examples:
    >>> stages = make_embedding_head(preset="aesthetic", weights="sac+logos+ava1-l14-linearMSE.pth")  # doctest: +SKIP
    >>> stages[0].outputs  # doctest: +SKIP
    ['aesthetic_score']
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from laion_ray.errors import LaionRayError
from laion_ray.udf import TASK_CPUS, UDF, register
from laion_ray.udfs.clip import check_name, list_to_numpy

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
ACTIVATIONS = ("none", "relu", "gelu")
# LAION's Normalization divides by sqrt(variance) + 1e-10; the floor keeps a
# zero variance from dividing by zero the same way.
_MIN_STD = 1e-10
# Rows per forward pass of an unfolded head: bounds the hidden activations
# (16k rows x 512 floats = 32 MB) whatever the batch size.
_CHUNK_ROWS = 16384


@dataclasses.dataclass(frozen=True)
class Preset:
    """Defaults of a named head; ``random_layers`` only shape random weights."""

    column: str
    activation: str
    sigmoid: bool
    random_layers: tuple[int, ...]


PRESETS: dict[str, Preset] = {
    # LAION improved-aesthetic-predictor (sac+logos+ava1-l14-linearMSE): Linear
    # layers with dropout in between and no activation.
    "aesthetic": Preset("aesthetic_score", "none", False, (768, 1024, 128, 64, 16, 1)),
    # LAION CLIP-based-NSFW-Detector, ViT-L/14 (a Keras MLP; its PyTorch port
    # has norm.mean/variance, then Linear+ReLU layers and a sigmoid).
    "nsfw": Preset("nsfw_score", "relu", True, (768, 64, 512, 256, 1)),
}


# --- weights ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadWeights:
    """Linear layers ``[(weight (out, in), bias (out,))]`` and an optional input standardisation."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @property
    def sizes(self) -> list[int]:
        return [self.layers[0][0].shape[1]] + [w.shape[0] for w, _ in self.layers]

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole stack as one affine map ``x @ A + c`` (no activations), in float64."""
        a = np.eye(self.sizes[0])
        c = np.zeros(self.sizes[0])
        if self.mean is not None:
            a = a / self.std[:, None]
            c = -self.mean / self.std
        for weight, bias in self.layers:
            a = a @ weight.T.astype(np.float64)
            c = c @ weight.T.astype(np.float64) + bias
        return a, c


def _natural(key: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A ``.pt``/``.pth``/``.safetensors`` state_dict as float64 arrays, in layer order.

    Raises:
        LaionRayError: not a file, another suffix, or not a state_dict of tensors.
    """
    if not os.path.isfile(path):
        raise LaionRayError(f"embedding-head weights {path!r} is not a file")
    if not path.endswith(WEIGHT_SUFFIXES):
        raise LaionRayError(
            f"embedding-head weights {path!r} must be a {'/'.join(WEIGHT_SUFFIXES)} state_dict"
        )
    import torch

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            loaded = load_file(path, device="cpu")
            loaded = {k: loaded[k] for k in sorted(loaded, key=_natural)}
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise LaionRayError(
            f"cannot read embedding-head weights {path!r}: {first} "
            "(save the module's state_dict(), not the module)"
        ) from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise LaionRayError(f"embedding-head weights {path!r} is not a state_dict of tensors")
    return {k: v.detach().to(torch.float64).numpy() for k, v in loaded.items()}


def head_weights(state: Mapping[str, np.ndarray], *, source: str) -> HeadWeights:
    """Linear layers and input standardisation from a state_dict (see the module doc).

    Raises:
        LaionRayError: a tensor that is neither, no Linear layer, or layers that
            do not chain (each layer's input width is the previous one's output).
    """
    layers: list[tuple[np.ndarray, np.ndarray]] = []
    mean = variance = None
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if value.ndim == 0 or (leaf == "bias" and f"{prefix}.weight" in state):
            continue  # counters (Keras' count, BatchNorm's num_batches_tracked); biases below
        if leaf == "weight" and value.ndim == 2:
            bias = state.get(f"{prefix}.bias")
            bias = np.zeros(value.shape[0]) if bias is None else bias
            if bias.shape != (value.shape[0],):
                raise LaionRayError(f"{source}: {prefix}.bias has shape {bias.shape}")
            layers.append((value, bias))
        elif leaf in ("mean", "variance") and value.ndim == 1:  # anywhere: safetensors sorts
            mean, variance = (value, variance) if leaf == "mean" else (mean, value)
        else:
            raise LaionRayError(
                f"{source}: unsupported tensor {key!r} of shape {tuple(value.shape)}; "
                "embedding-head reads Linear layers (2-D weight + bias) and an optional "
                "input mean/variance"
            )
    if not layers:
        raise LaionRayError(f"{source}: no Linear layer (2-D '<name>.weight' tensor)")
    for i in range(1, len(layers)):
        if layers[i][0].shape[1] != layers[i - 1][0].shape[0]:
            shapes = [tuple(w.shape) for w, _ in layers]
            raise LaionRayError(f"{source}: Linear layers do not chain: weight shapes {shapes}")
    if (mean is None) != (variance is None):
        raise LaionRayError(f"{source}: an input mean needs a variance, and the other way round")
    std = None
    if mean is not None:
        width = layers[0][0].shape[1]
        if mean.shape != (width,) or variance.shape != (width,):
            raise LaionRayError(f"{source}: input mean/variance are not {width}-d")
        std = np.maximum(np.sqrt(variance), _MIN_STD)
    return HeadWeights(tuple(layers), mean, std)


def random_weights(sizes: Sequence[int], seed: int) -> HeadWeights:
    """torch's default Linear initialisation, seeded: every worker builds the same head."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linears = [torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    return HeadWeights(
        tuple(
            (m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in linears
        )
    )


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the head ---------------------------------------------------------------------


class Head:
    """A loaded head: ``(n, in) float32 -> (n,) float32``.

    Without activations on the CPU it is the folded map in numpy: one dot
    product and one norm per row. Otherwise a torch ``Sequential`` on ``device``.
    """

    def __init__(
        self,
        weights: HeadWeights,
        *,
        activation: str,
        sigmoid: bool,
        normalize: bool,
        device: str,
    ) -> None:
        self.in_dim = weights.sizes[0]
        self.sigmoid = sigmoid
        self.normalize = normalize
        self.device = device
        self.module = None
        if activation == "none" and device == "cpu":
            a, c = weights.folded()
            self.a = a.astype(np.float32)
            self.c = c.astype(np.float32)
            return
        import torch

        if activation == "none":  # folded on the GPU too: one small matmul
            a, c = weights.folded()
            weights = HeadWeights(((a.T, c),))
        self.mean = self.std = None
        if weights.mean is not None:
            self.mean = torch.tensor(weights.mean, dtype=torch.float32, device=device)
            self.std = torch.tensor(weights.std, dtype=torch.float32, device=device)
        act = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "none": torch.nn.Identity}[activation]
        modules: list[torch.nn.Module] = []
        for i, (weight, bias) in enumerate(weights.layers):
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
            linear.weight.data = torch.tensor(weight, dtype=torch.float32)
            linear.bias.data = torch.tensor(bias, dtype=torch.float32)
            modules += [linear] if i == 0 else [act(), linear]
        self.module = torch.nn.Sequential(*modules).to(device).eval().requires_grad_(False)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not len(x):
            return np.zeros(0, dtype=np.float32)
        if self.module is None:
            out = (x @ self.a)[:, 0]
            if self.normalize:
                norms = np.sqrt(np.einsum("ij,ij->i", x, x))
                out /= np.where(norms > 0, norms, 1)
            out += self.c[0]
            if self.sigmoid:  # the tanh form never overflows
                out = 0.5 * (1.0 + np.tanh(0.5 * out))
            return out.astype(np.float32, copy=False)
        import torch

        with warnings.catch_warnings(), torch.inference_mode():
            # Arrow's buffers are read-only; nothing below writes into the input.
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            x = torch.from_numpy(x)
            return np.concatenate([self._forward(c) for c in x.split(_CHUNK_ROWS)])

    def _forward(self, x: Any) -> np.ndarray:
        import torch

        t = x.to(self.device, non_blocking=True)
        if self.normalize:
            t = torch.nn.functional.normalize(t, dim=-1)
        if self.mean is not None:
            t = (t - self.mean) / self.std
        t = self.module(t)
        if self.sigmoid:
            t = torch.sigmoid(t)
        return t[:, 0].float().cpu().numpy()


@functools.lru_cache(maxsize=4)
def load_head(
    weights: str | None,
    weights_sha256: str | None,
    random_layers: tuple[int, ...] | None,
    seed: int,
    activation: str,
    sigmoid: bool,
    normalize: bool,
    device: str,
) -> Head:
    """The head, once per process (the hash keeps a rewritten file from being reused)."""
    if weights is not None:
        if file_sha256(weights) != weights_sha256:
            raise LaionRayError(
                f"embedding-head weights {weights!r} changed since the job was planned "
                "(or differ on this node); rerun the job"
            )
        parsed = head_weights(read_state_dict(weights), source=weights)
    else:
        # Planning already warned, once per column; every process need not repeat it.
        logger.debug("embedding-head uses RANDOM weights (seed %d)", seed)
        parsed = random_weights(random_layers, seed)
    return Head(parsed, activation=activation, sigmoid=sigmoid, normalize=normalize, device=device)


def embedding_head(
    batch: pa.Table,
    *,
    embedding_column: str,
    column: str,
    weights: str | None,
    weights_sha256: str | None,
    random_layers: Sequence[int] | None,
    seed: int,
    activation: str,
    sigmoid: bool,
    normalize: bool,
    device: str,
) -> pa.Table:
    """Embeddings -> one float32 score per row; a null embedding gives a null score.

    Raises:
        LaionRayError: the embeddings' width is not the head's input width.
    """
    head = load_head(
        weights,
        weights_sha256,
        tuple(random_layers) if random_layers else None,
        seed,
        activation,
        sigmoid,
        normalize,
        device,
    )
    emb, valid = list_to_numpy(batch[embedding_column], embedding_column)
    if len(emb) and emb.shape[1] != head.in_dim:
        raise LaionRayError(_width_error(embedding_column, emb.shape[1], head.in_dim))
    out = np.zeros(batch.num_rows, dtype=np.float32)
    if len(emb):
        out[valid] = head(emb)
    mask = None if valid.all() else ~valid
    return pa.table({column: pa.array(out, pa.float32(), mask=mask)})


def _width_error(column: str, width: int, in_dim: int) -> str:
    return (
        f"embedding-head: column {column!r} holds {width}-d embeddings but the head takes "
        f"{in_dim}-d inputs; use the embedding column of the model the head was trained on"
    )


def check_head_input(schema: pa.Schema, *, embedding_column: str, in_dim: int) -> None:
    """Plan-time check: a list of floats, of the head's width when the type fixes it."""
    kind = schema.field(embedding_column).type
    if not (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    ) or not pa.types.is_floating(kind.value_type):
        raise LaionRayError(
            f"embedding-head: column {embedding_column!r} must be a list of floats, got {kind}"
        )
    if pa.types.is_fixed_size_list(kind) and kind.list_size != in_dim:
        raise LaionRayError(_width_error(embedding_column, kind.list_size, in_dim))


@register("embedding-head")
def make_embedding_head(
    *,
    preset: str | None = None,
    weights: str | None = None,
    random_weights: bool = False,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    embedding_column: str = "img_emb",
    column: str | None = None,
    activation: str | None = None,
    sigmoid: bool | None = None,
    normalize: bool = True,
    device: str = "cpu",
    batch_size: int = 65536,
    **resources: Any,
) -> list[UDF]:
    """A small MLP head over an embedding column, e.g. LAION's aesthetic or NSFW score.

    Args:
        preset: ``aesthetic`` or ``nsfw``: the defaults of ``column``,
            ``activation``, ``sigmoid`` and the random layer sizes.
        weights: Local state_dict (``.pt``, ``.pth`` or ``.safetensors``) that
            gives the layer sizes and values; it must be readable on every worker.
        random_weights: Without ``weights``, use seeded random weights of the
            preset's sizes (or ``layers``): for tests and demos only.
        layers: Layer sizes of random weights, e.g. ``[768, 64, 1]``.
        seed: Seed of random weights.
        embedding_column: Input embeddings (default the card's ``img_emb``).
        column: Output float32 column (default the preset's).
        activation: Between layers: ``none``, ``relu`` or ``gelu``.
        sigmoid: Squash the output into [0, 1].
        normalize: L2-normalise the input first, as the LAION heads expect.
        device: ``cpu``, or ``cuda``/``cuda:N`` (then each task asks for a GPU).
        batch_size: Rows per call.
        **resources: Overrides for the stage (``num_cpus``...).

    Returns:
        ``[embedding-head-<column>]``.

    Raises:
        LaionRayError: an unknown preset or activation, unreadable or unusable
            weights, a head whose output is not one value, or no weights named
            without ``random_weights``.
    """
    spec = None
    if preset is not None:
        if preset not in PRESETS:
            raise LaionRayError(f"unknown embedding-head preset {preset!r}; known: {list(PRESETS)}")
        spec = PRESETS[preset]
    column = check_name(column or (spec.column if spec else None), "column")
    embedding_column = check_name(embedding_column, "embedding_column")
    if column == embedding_column:
        raise LaionRayError(f"embedding-head would overwrite its input {column!r}")
    activation = activation or (spec.activation if spec else "none")
    if activation not in ACTIVATIONS:
        raise LaionRayError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    sigmoid = bool(spec.sigmoid if sigmoid is None and spec else sigmoid)
    if not (device == "cpu" or (isinstance(device, str) and re.fullmatch(r"cuda(:\d+)?", device))):
        raise LaionRayError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LaionRayError(f"batch_size must be a positive integer, got {batch_size!r}")

    digest = random_layers = None
    if weights is not None:
        weights = os.path.abspath(weights)
        parsed = head_weights(read_state_dict(weights), source=weights)
        sizes = parsed.sizes
        digest = file_sha256(weights)
    elif random_weights:
        random_layers = [int(n) for n in (layers or (spec.random_layers if spec else ()))]
        if len(random_layers) < 2 or min(random_layers) < 1:
            raise LaionRayError(
                "random embedding-head weights need a preset or layers=[in, ..., 1], "
                f"got {layers!r}"
            )
        sizes = random_layers
        logger.warning("embedding-head %s uses RANDOM weights: for testing only", column)
    else:
        raise LaionRayError(
            "embedding-head needs weights=/path/to/head.pth (a local state_dict: .pt, .pth or "
            ".safetensors), or random_weights=True for a test run"
        )
    if sizes[-1] != 1:
        raise LaionRayError(f"embedding-head: the head outputs {sizes[-1]} values, not 1")

    params = {
        "embedding_column": embedding_column,
        "column": column,
        "weights": weights,
        "weights_sha256": digest,
        "random_layers": random_layers,
        "seed": int(seed),
        "activation": activation,
        "sigmoid": sigmoid,
        "normalize": bool(normalize),
        "device": device,
    }
    return [
        UDF(
            # Named by its column, so several heads fit in one run (each stage
            # name owns an error column).
            name=f"embedding-head-{column}",
            version="1",
            inputs=(embedding_column,),
            output_schema=pa.schema([pa.field(column, pa.float32())]),
            compute=embedding_head,
            params=params,
            num_cpus=TASK_CPUS,
            num_gpus=1.0 if device.startswith("cuda") else 0.0,
            batch_size=batch_size,
            validate=functools.partial(
                check_head_input, embedding_column=embedding_column, in_dim=sizes[0]
            ),
        ).with_options(**resources)
    ]
