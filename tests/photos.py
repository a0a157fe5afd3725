"""Real photographs in crawl-like encodings, for decode parity (issue 25).

The photographs are the ones scikit-image ships in its wheel (``skimage/data``:
an astronaut, a cat, coffee, a rocket, a motorcycle, a cameraman), read as
files: no network, no generated textures. The encodings are the ones a web
crawl brings: baseline and progressive JPEG, 4:2:0, 4:2:2 and 4:4:4 chroma,
4:4:0 and 4:1:1, an EXIF orientation, CMYK, WebP, PNG with alpha, GIF, gray, a 20:1 panorama,
and a truncated file. ``benchmarks/bench_gpu_e2e.py`` imports this module too.
"""

from __future__ import annotations

import importlib.resources
import io

import numpy as np
from PIL import Image

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")


def photo(name: str) -> Image.Image:
    """One of scikit-image's bundled photographs, as PIL opens the file."""
    resource = importlib.resources.files("skimage.data") / name
    with importlib.resources.as_file(resource) as path, Image.open(path) as image:
        image.load()
        return image.copy()


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _with_alpha(image: Image.Image) -> Image.Image:
    """RGBA with a smooth alpha ramp (a cut-out on a transparent background)."""
    width, height = image.size
    ramp = np.linspace(64, 255, width, dtype=np.float32)[None, :].repeat(height, axis=0)
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(ramp.astype(np.uint8)))
    return rgba


def _libjpeg(image: Image.Image, subsampling: str) -> bytes:
    """A JPEG with a chroma sampling PIL does not write (libjpeg-turbo's encoder)."""
    import simplejpeg

    return simplejpeg.encode_jpeg(np.asarray(image), quality=90, colorsubsampling=subsampling)


def crawl_encodings() -> dict[str, bytes]:
    """Name -> encoded bytes: every photo as a baseline 4:2:0 JPEG, plus one of
    each other kind a crawl brings (all decodable)."""
    out = {f"{n.split('.')[0]}_jpeg_420": encode(photo(n), quality=90) for n in PHOTOS}
    astronaut, chelsea, coffee = photo("astronaut.png"), photo("chelsea.png"), photo("coffee.png")
    rocket = photo("rocket.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"; open_clip, like PIL's open, ignores it
    out.update(
        astronaut_jpeg_444=encode(astronaut, quality=90, subsampling=0),
        astronaut_jpeg_422=encode(astronaut, quality=90, subsampling=1),
        astronaut_progressive=encode(astronaut, quality=85, progressive=True),
        astronaut_exif_rotated=encode(astronaut, quality=90, exif=exif.tobytes()),
        astronaut_cmyk=encode(astronaut.convert("CMYK"), quality=90),
        # other chroma samplings, which libjpeg-turbo writes and few decoders take
        astronaut_jpeg_440=_libjpeg(astronaut, "440"),
        astronaut_jpeg_411=_libjpeg(astronaut, "411"),
        chelsea_webp=encode(chelsea, "WEBP", quality=85),
        chelsea_png_alpha=encode(_with_alpha(chelsea), "PNG"),
        chelsea_gif=encode(chelsea.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
        rocket_gray_jpeg=encode(rocket.convert("L"), quality=90),
        camera_gray_png=encode(photo("camera.png"), "PNG"),
        # A real 20:1 strip of a photo, as a panorama: 600 x 30.
        coffee_panorama=encode(coffee.crop((0, 185, 600, 215)), quality=90),
    )
    return out


def truncated_jpeg() -> bytes:
    """A photo's JPEG cut short, as a crawl that timed out stores it."""
    data = encode(photo("coffee.png"), quality=90)
    return data[: len(data) // 3]
