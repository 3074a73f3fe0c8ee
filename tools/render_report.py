"""Render a run's report.html in headless Chromium, save a PNG screenshot and check that it is not blank.

    python tools/render_report.py runs/<name>            # the run folder (or .../report/) or report.html
    python tools/render_report.py runs/<name> --out shot.png --window-size 1280x6000

Prints one JSON line (png path, bytes, pixel size, grey-level variance, share of non-white pixels) and exits 1
when the screenshot looks blank (variance below --min-var), 2 when there is no Chromium or no report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from cascade.eval.report import REPORT_HTML

log = logging.getLogger("render_report")


def find_chromium() -> str | None:
    """Path of a Chromium executable on PATH (``chromium`` or ``chromium-browser``), or None."""
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


def render_screenshot(
    html_path: str | os.PathLike,
    png_path: str | os.PathLike,
    *,
    chromium: str | None = None,
    window_size: tuple[int, int] = (1280, 2400),
    timeout_s: float = 120.0,
) -> Path:
    """Render ``html_path`` in headless Chromium and save a PNG screenshot of the window at ``png_path``.

    Network features are switched off (the page needs none; a request would show up as a failure to render
    offline). Raises FileNotFoundError when there is no Chromium or no page, RuntimeError when Chromium fails or
    writes no image (its stderr tail is in the message)."""
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path}: no such report page")
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found on PATH (looked for 'chromium' and 'chromium-browser')")
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    if png_path.exists():
        png_path.unlink()  # a stale screenshot must not pass for a fresh one
    w, h = window_size
    with tempfile.TemporaryDirectory(prefix="cascade-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--screenshot={png_path}", f"--window-size={w},{h}", html_path.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "HOME": profile})
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"chromium did not finish rendering {html_path} within {timeout_s:.0f} s") from None
    if proc.returncode != 0 or not png_path.is_file():
        tail = (proc.stderr or "")[-1500:]
        raise RuntimeError(f"chromium exited with {proc.returncode} and wrote no screenshot {png_path}:\n{tail}")
    return png_path


def find_report(path: Path) -> Path:
    """report.html given itself, a folder holding it, or a run folder with it one level down (e.g. report/)."""
    if path.is_file():
        return path
    if (path / REPORT_HTML).is_file():
        return path / REPORT_HTML
    found = sorted(path.glob(f"*/{REPORT_HTML}")) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise FileNotFoundError(f"{path}: several {REPORT_HTML} files ({', '.join(map(str, found))}); name one")
    raise FileNotFoundError(f"{path}: no {REPORT_HTML} here or one folder below")


def window_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"window size must look like 1280x2400, got {text!r}") from None
    if w < 200 or h < 200:
        raise argparse.ArgumentTypeError(f"window size {text!r} is too small (at least 200x200)")
    return w, h


def image_stats(png: Path) -> dict:
    """Pixel size, grey-level variance and share of non-white pixels of a PNG (values in [0, 1])."""
    from matplotlib.image import imread

    img = imread(png)
    grey = img[..., :3].mean(axis=2) if img.ndim == 3 else img
    return {"width": int(grey.shape[1]), "height": int(grey.shape[0]), "grey_var": float(grey.var()),
            "ink_share": float((grey < 0.9).mean())}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="run folder, report folder, or report.html")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: report.png beside report.html)")
    p.add_argument("--window-size", type=window_size, default=(1280, 2400), help="WIDTHxHEIGHT in pixels")
    p.add_argument("--chromium", default=None,
                   help="Chromium executable (default: chromium / chromium-browser on PATH)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for Chromium")
    p.add_argument("--min-var", type=float, default=1e-3, help="grey-level variance below which the shot is blank")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    try:
        html_path = find_report(args.path)
    except FileNotFoundError as e:
        log.error("%s", e)
        return 2
    exe = args.chromium or find_chromium()
    if exe is None:
        log.error("no Chromium on PATH (install Debian's `chromium`, or pass --chromium)")
        return 2
    out = args.out or html_path.with_name("report.png")
    png = render_screenshot(html_path, out, chromium=exe, window_size=args.window_size, timeout_s=args.timeout)
    stats = {"html": str(html_path), "png": str(png), "bytes": png.stat().st_size, **image_stats(png)}
    print(json.dumps(stats))
    if not np.isfinite(stats["grey_var"]) or stats["grey_var"] < args.min_var:
        log.error("the screenshot looks blank (grey variance %.2e < %.2e)", stats["grey_var"], args.min_var)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
