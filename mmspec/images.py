"""Image inputs: PIL images, paths, or HxWxC uint8 arrays, any PIL mode; always RGB out, with clear errors."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, UnidentifiedImageError

from .errors import InputError, InputTypeError, MissingInputError

# The most pixels an input image may have: 8192 x 8192 is far more than any VLM's processor keeps (Qwen2-VL's default
# max_pixels is 12.8 M; LLaVA resizes to 336 or 672 px), yet bounds the decode to ~200 MB of RGB. PIL's own bomb guard
# only warns up to ~179 M pixels, and past that raises its DecompressionBombError, which is no UserError.
MAX_PIXELS = 8192 * 8192


def check_pixels(width: int, height: int, what: str) -> None:
    """Refuse an image over MAX_PIXELS before it is decoded (a PNG of a few hundred KB can hold 200 M pixels)."""
    if width * height > MAX_PIXELS:
        raise InputError(f"{what} is {width}x{height} = {width * height / 1e6:.0f} M pixels, more than the "
                         f"{MAX_PIXELS / 1e6:.0f} M mmspec reads; downscale it first")


def load_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        check_pixels(*image.size, "the image")
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise InputError(f"image {str(path)!r} is a directory, not an image file")
        if not path.is_file():
            raise MissingInputError(f"image file {str(path)!r} does not exist")
        try:
            with warnings.catch_warnings():  # PIL's bomb warning: refused below with a clearer message
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
            with im:
                check_pixels(*im.size, f"image {str(path)!r}")  # from the header, before decoding
                im.load()  # decode now: a truncated file fails here, not deep inside the processor
                return im.convert("RGB")
        except Image.DecompressionBombError:  # past twice PIL's limit it refuses to open at all
            raise InputError(f"image {str(path)!r} has more than {MAX_PIXELS / 1e6:.0f} M pixels, more than mmspec "
                             f"reads; downscale it first") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:  # unreadable, truncated, no permission
            raise InputError(f"cannot read image {str(path)!r}: {e} (expected a complete PNG, JPEG or other PIL-readable file)") from None
    if hasattr(image, "__array_interface__") or type(image).__module__.startswith("torch"):
        import numpy as np

        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise InputError(
                f"image arrays must be HxWxC uint8 with C in 1, 3, 4; got shape {arr.shape} dtype {arr.dtype}"
            )
        check_pixels(arr.shape[1], arr.shape[0], "the image array")
        return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).convert("RGB")
    raise InputTypeError(f"unsupported image type {type(image).__name__}: pass a PIL image, a path, or an HxWxC uint8 array")


def load_images(images: Any) -> list[Image.Image]:
    if images is None:
        return []
    if isinstance(images, (str, Path, Image.Image)) or hasattr(images, "__array_interface__"):
        images = [images]
    if not isinstance(images, Sequence):
        raise InputTypeError(f"images must be an image or a list of images, got {type(images).__name__}")
    return [load_image(im) for im in images]


def cast_pixels(inputs, dtype):
    """Floating pixel inputs in the target's dtype (processors emit float32); in place, and returned for chaining."""
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs and inputs[key].is_floating_point():
            inputs[key] = inputs[key].to(dtype)
    return inputs
