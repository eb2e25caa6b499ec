"""The size of a picture in pixels: the one check for ``cpadgn.plot``'s ``size=`` and the
command line's ``--size`` (no numpy, so that ``cpadgn plot --help`` stays light)."""
from __future__ import annotations

import numbers

from .errors import CpadgnError

MAX_PICTURE_SIDE = 16384     # pixels: a 1 GiB RGBA buffer at 16384 x 16384
# The smallest size every layout (S = 1, 2, >= 3; 0 to 4 zoomed rows; the histogram; the
# imputation tiles) renders without matplotlib's "constrained_layout not applied" warning:
# the tightest measured was about 370 x 176 (S = 3, four zoomed rows), rounded up for other
# fonts and matplotlib versions.
MIN_PICTURE_SIZE = (400, 200)


def check_size(size, name: str = "size") -> tuple[int, int] | None:
    """None (the layout's own size), or size as (width, height) in whole pixels, within
    MIN_PICTURE_SIZE and MAX_PICTURE_SIDE; a one-line CpadgnError otherwise.  name: how
    the message calls the option."""
    if size is None:
        return None
    try:
        w, h = size
        whole = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v).is_integer()
                    for v in (w, h))
    except (TypeError, ValueError):
        whole = False
    if not whole:
        raise CpadgnError(f"{name} must be (width, height) in whole pixels, e.g. (800, 600), got {size!r}")
    w, h = int(w), int(h)
    lo_w, lo_h = MIN_PICTURE_SIZE
    if w < lo_w or h < lo_h:
        raise CpadgnError(f"{name} {w}x{h} is too small to lay the picture out: at least {lo_w}x{lo_h} pixels")
    if max(w, h) > MAX_PICTURE_SIDE:      # Agg holds 4 bytes a pixel
        raise CpadgnError(f"{name} {w}x{h}: at most {MAX_PICTURE_SIDE} pixels a side; use a smaller size, "
                          "or .svg / .pdf for a picture that scales")
    return w, h
