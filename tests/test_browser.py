"""Notebook 01 in a real browser: JupyterLab (headless, loopback) driven by Debian's Chromium.

Runs every cell of notebooks/01_router_analysis.ipynb in a temporary copy of the notebooks
folder, then checks what only a browser can: the routing heatmap widget rendered as a plotly
figure, and moving the "cache size" slider changes the "hit ratio" readout (a round trip through
the kernel). Saves a screenshot to a temporary folder, and to docs/screenshots/notebook01.png
when MOE_COLAB_SAVE_SCREENSHOT=1.

Needs /usr/bin/chromium (``apt-get install -y chromium``; .ci/run installs it) and the
``playwright`` Python package; never ``playwright install`` (no browser download). Skipped when
Chromium is absent, unless CI is set: then it fails and says why.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "01_router_analysis.ipynb"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SERVER_START_S, RUN_ALL_S, SLIDER_S = 120, 480, 90


def _require_browser():
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install playwright; never `playwright install`)")
    if missing:
        msg = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(msg + " -- CI is set, so this is an error, not a skip")
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on loopback serving a temporary copy of notebooks/; always stopped."""
    _require_browser()
    root = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns("src", ".ipynb_checkpoints"))
    settings = tmp_path / "lab-settings"
    # Render every cell (no virtual scrolling), and no news or update checks (no network here).
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        json.dumps({"windowingMode": "none"}))
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "IPYTHONDIR": str(tmp_path / "ipython")}
    env.pop("MOE_COLAB_STATIC", None)                      # live widgets are the point here
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")                         # CI runs as root
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {SERVER_START_S}s")
            time.sleep(0.5)
        yield {"base": base, "token": token, "root": root, "log": tmp_path / "jupyterlab.log", "tmp": tmp_path}
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (server and kernels), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _hit_ratio(page) -> str:
    text = page.locator(".moe-hit-ratio").first.inner_text(timeout=10_000)
    m = re.search(r"hit ratio: (\d\.\d\d)", text)
    assert m, f"no 'hit ratio: x.xx' in the readout {text!r}"
    return m.group(1)


def test_notebook01_widgets_render_and_respond(lab):
    from playwright.sync_api import sync_playwright

    shots = lab["tmp"] / "screenshots"
    shots.mkdir()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{lab['base']}/lab/tree/{NOTEBOOK}?token={lab['token']}", timeout=120_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
            # Wait for the kernel, then run every cell through JupyterLab's own command.
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
                                   timeout=120_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            try:
                page.wait_for_selector(".moe-hit-ratio", timeout=RUN_ALL_S * 1000)
                page.wait_for_function(
                    "() => { const p = window.jupyterapp.shell.currentWidget;"
                    " return p.sessionContext.session.kernel.status === 'idle'"
                    " && ![...document.querySelectorAll('.jp-InputArea-prompt')]"
                    ".some(e => e.textContent.includes('*')); }", timeout=RUN_ALL_S * 1000)
            finally:
                page.screenshot(path=str(shots / "notebook01-run.png"))
            outputs = page.locator(".jp-OutputArea").all_inner_texts()
            errors = [o for o in outputs if "Traceback (most recent call last)" in o]
            assert not errors, "a cell raised:\n" + errors[0][-3000:]

            # The heatmap widget rendered as a plotly figure (FigureWidget through anywidget).
            heatmap = page.locator(".moe-routing-heatmap")
            heatmap.first.scroll_into_view_if_needed()
            page.wait_for_selector(".moe-routing-heatmap .js-plotly-plot .main-svg", timeout=60_000)
            assert page.locator(".moe-routing-heatmap .main-svg .hm").count() > 0 or \
                page.locator(".moe-routing-heatmap .main-svg image").count() > 0, "no heatmap layer drawn"
            heatmap.first.screenshot(path=str(shots / "heatmap.png"))

            # Moving the cache-size slider changes the hit ratio the kernel computes.
            explorer = page.locator(".moe-cache-explorer").first
            explorer.scroll_into_view_if_needed()
            before = _hit_ratio(page)
            handle = page.locator(".moe-cache-size .noUi-handle").first
            handle.focus()
            for _ in range(3):
                handle.press("ArrowRight")
            page.wait_for_function(
                "(before) => { const e = document.querySelector('.moe-hit-ratio');"
                " const m = e && e.innerText.match(/hit ratio: (\\d\\.\\d\\d)/); return m && m[1] !== before; }",
                arg=before, timeout=SLIDER_S * 1000)
            after = _hit_ratio(page)
            assert after != before
            assert float(after) > float(before), f"a larger cache hit less: {before} -> {after}"
            page.wait_for_timeout(1500)       # let the timeline redraw before the picture
            explorer.screenshot(path=str(shots / "explorer.png"))
            page.screenshot(path=str(shots / "notebook01.png"))
            if os.environ.get("MOE_COLAB_SAVE_SCREENSHOT") == "1":
                _save_docs_screenshot(page)
        finally:
            browser.close()
    print(f"screenshots in {shots}; hit ratio {before} -> {after}")


def _save_docs_screenshot(page) -> None:
    """The README's picture: the heatmap and the cache explorer of notebook 01, sidebar closed."""
    out = ROOT / "docs" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    page.evaluate("() => window.jupyterapp.commands.execute('application:toggle-left-area')")
    page.wait_for_timeout(1000)
    page.locator(".moe-routing-heatmap").first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)
    page.screenshot(path=str(out / "notebook01.png"))
