"""Decode and preprocess images on the model's device (``clip-embed``'s ``decode=device``).

The model actor gets each row's encoded bytes and its route (from
:func:`laion_ray.preprocess.decode_route`, which the ``clip-preprocess`` task
computes next to the read), and :class:`DevicePreprocess` turns a chunk of rows
into the normalised float tensor the model takes, on the actor's own device:

* JPEGs the device decoder takes are decoded in one batched call of
  torchvision's ``decode_jpeg``: nvJPEG on CUDA (the hardware decoder where the
  GPU has one), libjpeg-turbo through the same call on a CPU device.
* nvJPEG's default upsampling of 4:2:0 and 4:2:2 chroma repeats samples, where
  libjpeg (PIL, and so open_clip's own transform) interpolates them. Each CUDA
  actor checks its decoder once, at start, on a small image with sharp colour
  edges (:func:`decoder_repeats_chroma`); where it repeats samples, the chroma of
  those images is interpolated again here (:func:`interpolate_chroma`), as
  libjpeg's "fancy upsampling" does, before the resize.
* Resize (antialiased, with the interpolation of the model's preprocess config,
  to the size open_clip computes), centre crop or pad, and the mean/std
  normalisation run on the device, one call per group of images of one size.
* A row the device decoder does not take (PNG, WebP, GIF, CMYK, progressive,
  another sampling, a JPEG without its end marker, or one the batched decoder
  rejects) is decoded by :func:`laion_ray.preprocess.preprocess_image` on the
  host, for that row only (the fallback, counted), in a few threads
  (simplejpeg, OpenCV and PIL release the GIL). A row that decoder refuses too
  is a row error, with the decoder's own message.
* Nothing here makes the host wait for the device: on CUDA every host-to-device
  copy (pixels of host rows, row indices) is made from pinned memory without
  blocking, so it is queued behind the model's forward of the previous chunk
  instead of waiting for it.

torch and torchvision are imported when a :class:`DevicePreprocess` is made.

Examples:
    >>> prep = DevicePreprocess(model_info["preprocess_cfg"], torch.device("cuda"))  # doctest: +SKIP
    >>> out = prep(images, routes)  # doctest: +SKIP
    >>> out.pixels.shape, int(out.ok.sum()), out.fallback  # doctest: +SKIP
    (torch.Size([255, 3, 224, 224]), 255, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from laion_ray.preprocess import (
    CHROMA_FACTORS,
    ROUTE_DEVICE_420,
    ROUTE_HOST,
    ImageDecodeError,
    PixelSpec,
    preprocess_image,
    resized_size,
)

# ITU-R BT.601 full range, as JFIF (and so libjpeg and nvJPEG) converts.
_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168735892, -0.331264108, 0.5),
    (0.5, -0.418687589, -0.081312411),
)
# Host fallback rows (PNG, WebP, progressive...) are a small share of a chunk:
# a few threads keep one slow image from holding up the others without taking
# the cores of the actor's neighbours.
HOST_DECODE_THREADS = 4


@dataclasses.dataclass
class Prepared:
    """A chunk of rows, ready for the model.

    Attributes:
        pixels: ``(ok rows, 3, h, w)`` float32 on the device, normalised.
        ok: ``(rows,)`` bool: which rows are in ``pixels``, in order.
        errors: Row index -> the decoder's message, for the rows not ``ok``.
        fallback: Rows decoded on the host because the device decoder did not
            take them (0 when the device decoder is not in use).
    """

    pixels: Any
    ok: np.ndarray
    errors: dict[int, str]
    fallback: int


class DevicePreprocess:
    """Encoded images -> normalised pixels on ``device``, as open_clip preprocesses them.

    Args:
        preprocess_cfg: The model's open_clip preprocess config (``size``,
            ``mean``, ``std``, ``interpolation``, ``resize_mode``, ``fill_color``).
        device: The model's torch device.
        device_decoder: Decode the rows routed to the device there; False
            decodes every row on the host (``decode=auto`` on an actor without
            CUDA), still normalising on ``device``.
        interpolate_chroma: Re-interpolate subsampled chroma after the device
            decode. Default: on CUDA, where :func:`decoder_repeats_chroma` finds
            that the decoder repeats chroma samples; never on a CPU device
            (libjpeg-turbo interpolates already).
    """

    def __init__(
        self,
        preprocess_cfg: Mapping[str, Any],
        device: Any,
        *,
        device_decoder: bool = True,
        interpolate_chroma: bool | None = None,
    ) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.spec = PixelSpec.from_preprocess_cfg(preprocess_cfg)
        self.mode = "bilinear" if self.spec.interpolation == "bilinear" else "bicubic"
        self.mean = torch.tensor(preprocess_cfg["mean"], device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(preprocess_cfg["std"], device=self.device).view(1, 3, 1, 1) * 255
        self.device_decoder = device_decoder
        if interpolate_chroma is None:
            interpolate_chroma = (
                device_decoder
                and self.device.type == "cuda"
                and decoder_repeats_chroma(lambda data: self._decode([data], [0])[0])
            )
        self.interpolate_chroma = bool(interpolate_chroma)
        self._pool: ThreadPoolExecutor | None = None  # made at the first chunk with host rows

    def __call__(self, images: Sequence[bytes], routes: Sequence[int] | None = None) -> Prepared:
        """Decode, resize, crop and normalise one chunk of rows.

        Args:
            images: Encoded images (none null: the route check refused those).
            routes: Each row's :func:`~laion_ray.preprocess.decode_route`;
                None routes every row to the host decoder.
        """
        torch = self.torch
        n = len(images)
        h, w = self.spec.size
        out = torch.empty((n, 3, h, w), dtype=torch.float32, device=self.device)
        if routes is None or not self.device_decoder:
            on_device = []
        else:
            on_device = [i for i in range(n) if int(routes[i]) != ROUTE_HOST]
        rejected = self._device_rows(images, routes, on_device, out) if on_device else []
        taken = set(on_device) - set(rejected)
        host = [i for i in range(n) if i not in taken]
        errors = self._host_rows(images, host, out)
        ok = np.ones(n, dtype=bool)
        ok[list(errors)] = False
        pixels = out if ok.all() else out[self._to_device(np.flatnonzero(ok))]
        pixels.sub_(self.mean).div_(self.std)
        # Host rows are a fallback only while the device decoder is the one in use.
        fallback = len(host) if self.device_decoder and routes is not None else 0
        return Prepared(pixels, ok, errors, fallback)

    # --- on the device -------------------------------------------------------------

    def _device_rows(
        self, images: Sequence[bytes], routes: Sequence[int], rows: list[int], out: Any
    ) -> list[int]:
        """Decode ``rows`` on the device into ``out``; returns the rows it rejected."""
        decoded = self._decode(images, rows)
        rejected = [i for i, image in zip(rows, decoded, strict=True) if image is None]
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, image in zip(rows, decoded, strict=True):
            if image is not None:
                key = (image.shape[1], image.shape[2], int(routes[i]))
                groups.setdefault(key, []).append(i)
        by_row = dict(zip(rows, decoded, strict=True))
        for (height, width, route), members in groups.items():
            batch = self.torch.stack([by_row[i] for i in members]).float()
            if self.interpolate_chroma and CHROMA_FACTORS[route] != (1, 1):
                batch = interpolate_chroma(batch, CHROMA_FACTORS[route])
            index = self._to_device(np.asarray(members))
            out.index_copy_(0, index, self._resize_crop(batch, height, width))
        return rejected

    def _decode(self, images: Sequence[bytes], rows: list[int]) -> list[Any]:
        """Batched decode (``(3, H, W)`` uint8 each); None where the decoder failed.

        The batched call fails as a whole on one bad image: then each image is
        decoded alone, so only that one goes to the host.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        torch = self.torch
        with warnings.catch_warnings():
            # torch warns that bytes are read-only (the decoder only reads them);
            # torchvision >= 0.29 warns that its decoders are deprecated.
            warnings.simplefilter("ignore", UserWarning)
            data = [torch.frombuffer(images[i], dtype=torch.uint8) for i in rows]
            try:
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError as exc:
                if _out_of_memory(exc):
                    raise  # the engine halves the batch; not a bad image
            decoded: list[Any] = []
            for one in data:
                try:
                    decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as exc:
                    if _out_of_memory(exc):
                        raise
                    decoded.append(None)
            return decoded

    def _resize_crop(self, batch: Any, height: int, width: int) -> Any:
        """``(k, 3, height, width)`` float -> ``(k, 3, *size)``, as open_clip resizes and crops."""
        torch = self.torch
        rh, rw = resized_size(height, width, self.spec)
        if (rh, rw) != (height, width):
            batch = torch.nn.functional.interpolate(
                batch, size=(rh, rw), mode=self.mode, antialias=True, align_corners=False
            ).clamp_(0, 255)
        return crop_or_pad(batch, self.spec.size, self.spec.fill_color)

    # --- on the host -----------------------------------------------------------------

    def _host_rows(self, images: Sequence[bytes], rows: list[int], out: Any) -> dict[int, str]:
        """Decode ``rows`` with the host decoder into ``out``; returns the rows' errors."""
        decoded = self._map(lambda i: _decode_on_host(images[i], self.spec), rows)
        errors = {i: d for i, d in zip(rows, decoded, strict=True) if isinstance(d, str)}
        done = [i for i in rows if i not in errors]
        if done:
            pixels = np.stack([d for d in decoded if not isinstance(d, str)])
            batch = self._to_device(self.torch.from_numpy(pixels))
            out.index_copy_(0, self._to_device(np.asarray(done)), batch.permute(0, 3, 1, 2).float())
        return errors

    def _map(self, fn: Callable[[int], Any], rows: list[int]) -> list[Any]:
        """``[fn(i) for i in rows]``, in order, in a few threads when there are several."""
        if len(rows) < 2:
            return [fn(i) for i in rows]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                HOST_DECODE_THREADS, thread_name_prefix="laion-ray-host-decode"
            )
        return list(self._pool.map(fn, rows))

    def _to_device(self, host: Any) -> Any:
        """A host array or tensor on the device, without making the host wait.

        A blocking copy (``torch.tensor(..., device="cuda")``) waits for all the
        work queued on the stream first, the model's forward of the previous
        chunk included, and so may a copy from pageable memory. One from pinned
        memory with ``non_blocking`` is queued behind that work instead; torch's
        caching host allocator keeps the pinned buffer until the copy has run.
        """
        tensor = self.torch.as_tensor(host)
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)


def _decode_on_host(data: bytes, spec: PixelSpec) -> np.ndarray | str:
    """:func:`~laion_ray.preprocess.preprocess_image`'s pixels, or its message for a bad image."""
    try:
        return preprocess_image(data, spec)
    except ImageDecodeError as exc:
        return str(exc)


def crop_or_pad(batch: Any, size: tuple[int, int], fill: int) -> Any:
    """Centre crop to ``size``, padding with ``fill`` where smaller: open_clip's
    ``CenterCropOrPad``, with :func:`laion_ray.preprocess._crop_or_pad`'s rounding."""
    import torch

    th, tw = size
    height, width = batch.shape[-2:]
    if height < th or width < tw:
        padded = torch.full(
            (*batch.shape[:-2], max(th, height), max(tw, width)),
            float(fill),
            dtype=batch.dtype,
            device=batch.device,
        )
        top = (th - height) // 2 if height < th else 0
        left = (tw - width) // 2 if width < tw else 0
        padded[..., top : top + height, left : left + width] = batch
        batch = padded
        height, width = batch.shape[-2:]
    top = int(round((height - th) / 2.0))
    left = int(round((width - tw) / 2.0))
    return batch[..., top : top + th, left : left + tw]


def interpolate_chroma(rgb: Any, factors: tuple[int, int]) -> Any:
    """Re-interpolate chroma that a decoder upsampled by repeating samples.

    nvJPEG fills each ``factors`` block (2x2 for 4:2:0, 1x2 for 4:2:2) with its
    one chroma sample; libjpeg interpolates between neighbouring samples (its
    "fancy upsampling", a triangle filter: weights 3/4 and 1/4, which is
    bilinear interpolation between sample centres). This recovers each block's
    sample as the block's mean chroma and interpolates it bilinearly, in
    YCbCr, leaving luma as decoded.

    Args:
        rgb: ``(k, 3, H, W)`` float RGB in 0..255.
        factors: ``(vertical, horizontal)`` subsampling.

    Returns:
        The same shape, float RGB in 0..255.
    """
    import torch

    functional = torch.nn.functional
    to_ycc, to_rgb = _colour_matrices(rgb.dtype, rgb.device)
    ycc = torch.einsum("ij,kjhw->kihw", to_ycc, rgb)
    height, width = rgb.shape[-2:]
    samples = functional.avg_pool2d(ycc[:, 1:], factors, stride=factors, ceil_mode=True)
    full = (samples.shape[-2] * factors[0], samples.shape[-1] * factors[1])
    chroma = functional.interpolate(samples, size=full, mode="bilinear", align_corners=False)
    ycc = torch.cat([ycc[:, :1], chroma[..., :height, :width]], dim=1)
    return torch.einsum("ij,kjhw->kihw", to_rgb, ycc).clamp_(0, 255)


@functools.lru_cache(maxsize=8)
def _colour_matrices(dtype: Any, device: Any) -> tuple[Any, Any]:
    """RGB -> YCbCr and back, made once per device: a copy to the device would
    make the host wait for the work queued there.

    The chroma offsets (128) are left out: interpolation weights sum to one, so
    the round trip through the matrix and its inverse is exact without them.
    """
    import torch

    with torch.inference_mode(False):  # plain tensors, usable in and out of inference mode
        to_ycc = torch.tensor(_TO_YCBCR, dtype=torch.float64)
        to_rgb = torch.linalg.inv(to_ycc)
        return to_ycc.to(device, dtype), to_rgb.to(device, dtype)


def decoder_repeats_chroma(decode: Callable[[bytes], Any]) -> bool:
    """Whether ``decode`` (bytes -> ``(3, H, W)`` uint8 tensor) upsamples 4:2:0
    chroma by repeating samples: then re-interpolating brings its pixels closer
    to libjpeg's. Judged on one small image with sharp colour edges, where the
    two upsamplings differ by several levels.
    """
    import simplejpeg
    import torch

    y, x = np.mgrid[0:48, 0:48]
    pattern = np.stack([x * 5, y * 5, ((x // 3 + y // 5) % 2) * 255], axis=-1).astype(np.uint8)
    data = simplejpeg.encode_jpeg(pattern, quality=95, colorsubsampling="420")
    libjpeg = torch.from_numpy(simplejpeg.decode_jpeg(data)).permute(2, 0, 1).float()
    decoded = decode(data)
    if decoded is None:
        return False
    decoded = decoded.float().cpu()
    fixed = interpolate_chroma(decoded[None], CHROMA_FACTORS[ROUTE_DEVICE_420])[0].round()
    return bool((fixed - libjpeg).abs().mean() < (decoded - libjpeg).abs().mean())


def _out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)
