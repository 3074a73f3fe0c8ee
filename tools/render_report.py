"""Render a run's report.html in headless Chromium (driven through chromedriver), check it and save a screenshot.

    python tools/render_report.py runs/<name>            # the run folder (or .../report/) or report.html
    python tools/render_report.py runs/<name> --out shot.png --window-size 1280x6000

Checks, in a page laid out at the window's width: the page loaded (document complete), the browser logged no
error (console or failed resource), every image decoded (complete, natural size > 0), no table is wider than its
box (it would be clipped behind a scroll bar) and no plot reaches past the page's right edge; then it saves a PNG
of the window and measures it. Prints one JSON line (png path, bytes, pixel size, grey-level variance, share of
non-white pixels, images, console errors, clipped tables) and exits 1 when a check fails or the screenshot looks
blank (variance below --min-var), 2 when there is no Chromium, no chromedriver or no report.

Chromium runs with the network switched off (the page needs none; a request would show up as an error).
Debian: ``apt-get install chromium chromium-driver``. chromedriver listens on a free port of 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from cascade.eval.report import REPORT_HTML

log = logging.getLogger("render_report")

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")

# what the page looks like to a reader: loaded, every image decoded, nothing wider than its box
PAGE_CHECK = """
const vw = document.documentElement.clientWidth;
return {
  ready: document.readyState,
  viewport_width: vw,
  page_width: document.documentElement.scrollWidth,
  page_height: document.documentElement.scrollHeight,
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,
                                                  height: i.naturalHeight})),
  clipped_tables: Array.from(document.querySelectorAll('.tw')).filter(d => d.scrollWidth > d.clientWidth + 1)
      .map(d => ({section: (d.closest('section') || {}).id || '', width: d.scrollWidth, box: d.clientWidth})),
  images_past_edge: Array.from(document.images).filter(i => i.getBoundingClientRect().right > vw + 1)
      .map(i => i.alt),
};
"""


def find_chromium() -> str | None:
    """Path of a Chromium executable on PATH (``chromium`` or ``chromium-browser``), or None."""
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


def find_chromedriver() -> str | None:
    return shutil.which("chromedriver")


class _Driver:
    """A minimal W3C WebDriver client for one chromedriver process (JSON over HTTP on 127.0.0.1)."""

    def __init__(self, chromedriver: str, chromium: str, profile: str, timeout_s: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen([chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "HOME": profile})
        self.session = None
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._call("GET", "/status").get("ready"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromedriver did not start: {(self.proc.stderr.read() or '')[-1500:]}")
            time.sleep(0.1)
        caps = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {"binary": chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read() or b"{}").get("value")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"chromedriver {method} {path}: {e.code} {e.read()[:800]!r}") from None

    def cmd(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def close(self) -> None:
        try:
            if self.session is not None:
                self._call("DELETE", f"/session/{self.session}")
        except (RuntimeError, urllib.error.URLError, ConnectionError):
            pass  # the process is ended below either way
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def render_and_check(html_path: str | os.PathLike, png_path: str | os.PathLike, *, chromium: str | None = None,
                     chromedriver: str | None = None, window_size: tuple[int, int] = (1280, 2400),
                     timeout_s: float = 120.0) -> dict:
    """Load ``html_path`` in headless Chromium laid out at ``window_size`` (CSS px, scale 1), run the page checks
    and save a PNG of the window at ``png_path``.

    Returns {"png", "page": the page checks (:data:`PAGE_CHECK`), "console": the browser log's entries}. Raises
    FileNotFoundError when there is no Chromium, chromedriver or page, RuntimeError when the browser fails."""
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path}: no such report page")
    exe, driver = chromium or find_chromium(), chromedriver or find_chromedriver()
    if exe is None:
        raise FileNotFoundError("no Chromium found on PATH (looked for 'chromium' and 'chromium-browser')")
    if driver is None:
        raise FileNotFoundError("no chromedriver on PATH (Debian: apt-get install chromium-driver)")
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    if png_path.exists():
        png_path.unlink()  # a stale screenshot must not pass for a fresh one
    w, h = window_size
    with tempfile.TemporaryDirectory(prefix="cascade-chromium-") as profile:
        d = _Driver(driver, exe, profile, timeout_s)
        try:
            # the layout viewport exactly w x h CSS px at scale 1, so the screenshot is w x h pixels
            d.cmd("POST", "/goog/cdp/execute", {"cmd": "Emulation.setDeviceMetricsOverride",
                                                "params": {"width": w, "height": h, "deviceScaleFactor": 1,
                                                           "mobile": False}})
            d.cmd("POST", "/url", {"url": html_path.as_uri()})  # returns once the page (and its images) loaded
            page = d.cmd("POST", "/execute/sync", {"script": PAGE_CHECK, "args": []})
            console = d.cmd("POST", "/se/log", {"type": "browser"}) or []
            png_path.write_bytes(base64.b64decode(d.cmd("GET", "/screenshot")))
        finally:
            d.close()
    return {"png": png_path, "page": page, "console": console}


def problems(page: dict, console: list[dict]) -> list[str]:
    """What a reader would see as broken, one line each (empty when the page is fine)."""
    out = []
    if page["ready"] != "complete":
        out.append(f"the page did not finish loading (document.readyState {page['ready']!r})")
    out += [f"browser {e.get('level')}: {e.get('message')}" for e in console if e.get("level") in ("SEVERE", "ERROR")]
    out += [f"image {i['alt']!r} did not load" for i in page["images"]
            if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    out += [f"a table in section {t['section']!r} is clipped: {t['width']} px in a {t['box']} px box"
            for t in page["clipped_tables"]]
    out += [f"image {alt!r} reaches past the page's right edge" for alt in page["images_past_edge"]]
    if page["page_width"] > page["viewport_width"]:
        out.append(f"the page is {page['page_width']} px wide in a {page['viewport_width']} px window")
    return out


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
    p.add_argument("--chromedriver", default=None, help="chromedriver executable (default: chromedriver on PATH)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the browser")
    p.add_argument("--min-var", type=float, default=1e-3, help="grey-level variance below which the shot is blank")
    p.add_argument("--colors", type=int, default=None,
                   help="save the PNG with a palette of this many colours (a small file, e.g. for the README)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    try:
        html_path = find_report(args.path)
    except FileNotFoundError as e:
        log.error("%s", e)
        return 2
    out = args.out or html_path.with_name("report.png")
    try:
        res = render_and_check(html_path, out, chromium=args.chromium, chromedriver=args.chromedriver,
                               window_size=args.window_size, timeout_s=args.timeout)
    except FileNotFoundError as e:
        log.error("%s", e)
        return 2
    png = res["png"]
    if args.colors:
        from PIL import Image

        Image.open(png).convert("RGB").quantize(colors=args.colors).save(png, optimize=True)
    found = problems(res["page"], res["console"])
    stats = {"html": str(html_path), "png": str(png), "bytes": png.stat().st_size, **image_stats(png),
             "images": len(res["page"]["images"]), "page_height": res["page"]["page_height"], "problems": found}
    print(json.dumps(stats))
    for line in found:
        log.error("%s", line)
    if not np.isfinite(stats["grey_var"]) or stats["grey_var"] < args.min_var:
        log.error("the screenshot looks blank (grey variance %.2e < %.2e)", stats["grey_var"], args.min_var)
        return 1
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
