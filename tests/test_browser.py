"""Notebooks 01, 03 and 07 in a real browser: JupyterLab (headless, loopback) driven by Debian's Chromium.

Each test runs every cell of one notebook in a temporary copy of the notebooks folder, at
JupyterLab's default layout in a 1280-pixel-wide window, then checks what only a browser can:

  01  the routing heatmap renders as a plotly figure (JupyterLab's plotly extension, from the
      output's plotly JSON) and fits its output area; moving the "cache size" slider changes the
      "hit ratio" readout (a round trip through the kernel) and redraws the timeline
  03  the cache explorer's figures fit; its slider works the same way
  07  the token timeline (a Gantt chart of one decoded token) renders and fits; moving the
      bandwidth slider to its lowest value changes the "token time" readout and the figure

No figure may be wider than its output area (nothing clipped). Screenshots go to a temporary
folder, and to docs/screenshots/notebookNN.png when MOE_COLAB_SAVE_SCREENSHOT=1.

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
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SERVER_START_S, RUN_ALL_S, SLIDER_S = 120, 480, 90
VIEWPORT = {"width": 1280, "height": 900}      # a laptop-sized window, JupyterLab's default layout


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


def _readout(page, css: str, pattern: str) -> str:
    text = page.locator(css).first.inner_text(timeout=10_000)
    m = re.search(pattern, text)
    assert m, f"no {pattern!r} in the readout {text!r}"
    return m.group(1)


def _hit_ratio(page) -> str:
    return _readout(page, ".moe-hit-ratio", r"hit ratio: (\d\.\d\d)")


def _token_ms(page) -> float:
    return float(_readout(page, ".moe-token-time", r"token time: ([\d.]+) ms"))


def _open_and_run(page, lab, notebook: str, ready_css: str) -> None:
    """Open ``notebook`` in JupyterLab, run every cell, wait until the kernel is idle."""
    page.goto(f"{lab['base']}/lab/tree/{notebook}?token={lab['token']}", timeout=120_000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
                           timeout=120_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_selector(ready_css, timeout=RUN_ALL_S * 1000)
    page.wait_for_function(
        "() => { const p = window.jupyterapp.shell.currentWidget;"
        " return p.sessionContext.session.kernel.status === 'idle'"
        " && ![...document.querySelectorAll('.jp-InputArea-prompt')]"
        ".some(e => e.textContent.includes('*')); }", timeout=RUN_ALL_S * 1000)
    outputs = page.locator(".jp-OutputArea").all_inner_texts()
    errors = [o for o in outputs if "Traceback (most recent call last)" in o]
    assert not errors, "a cell raised:\n" + errors[0][-3000:]


def _assert_figures_fit(page) -> int:
    """Every plotly figure lies within its output area (nothing clipped); returns how many."""
    page.wait_for_timeout(1500)
    overflow = page.evaluate(   # the plot's drawing (its SVG) against the output area that holds it
        "() => [...document.querySelectorAll('.jp-OutputArea .js-plotly-plot')].map(p => {"
        " const svg = p.querySelector('.main-svg'); const area = p.closest('.jp-OutputArea');"
        " return [svg ? svg.getBoundingClientRect().right : 0, area.getBoundingClientRect().right,"
        "         p.scrollWidth, p.clientWidth]; })")
    assert overflow, "no plotly figure rendered"
    wide = [f for f in overflow if f[0] > f[1] + 1 or f[2] > f[3] + 1]
    assert not wide, f"figures wider than their output area (clipped): {wide}"
    return len(overflow)


def _move(page, css: str, key: str, times: int) -> None:
    handle = page.locator(f"{css} .noUi-handle").first
    handle.scroll_into_view_if_needed()
    handle.focus()
    for _ in range(times):
        handle.press(key)


def _cell_of(page, css: str):
    return page.locator(".jp-Cell", has=page.locator(css)).first


def _launch(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)


def _save(page, lab, name: str, cell_css: str) -> None:
    """Screenshots: the window and the cell of ``cell_css``; to docs/screenshots/NAME.png on request."""
    shots = lab["tmp"] / "screenshots"
    shots.mkdir(exist_ok=True)
    page.screenshot(path=str(shots / f"{name}.png"))
    if os.environ.get("MOE_COLAB_SAVE_SCREENSHOT") == "1":
        out = ROOT / "docs" / "screenshots"
        out.mkdir(parents=True, exist_ok=True)
        _cell_of(page, cell_css).evaluate("e => e.scrollIntoView({block: 'start'})")
        page.wait_for_timeout(800)
        page.screenshot(path=str(out / f"{name}.png"))


def _explorer_slider_moves_the_hit_ratio(page) -> tuple[str, str]:
    before = _hit_ratio(page)
    _move(page, ".moe-cache-size", "ArrowRight", 3)
    page.wait_for_function(
        "(before) => { const e = document.querySelector('.moe-hit-ratio');"
        " const m = e && e.innerText.match(/hit ratio: (\\d\\.\\d\\d)/); return m && m[1] !== before; }",
        arg=before, timeout=SLIDER_S * 1000)
    after = _hit_ratio(page)
    assert float(after) > float(before), f"a larger cache hit less: {before} -> {after}"
    # the timeline below the sliders was redrawn for the new size (its title names it)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.js-plotly-plot .gtitle')].some(t => /cache of \\d+ per layer: hit ratio/"
        ".test(t.textContent) && t.textContent.includes(document.querySelector('.moe-hit-ratio').innerText.match("
        "/hit ratio: (\\d\\.\\d\\d)/)[1]))", timeout=SLIDER_S * 1000)
    return before, after


def test_notebook01_widgets_render_and_respond(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            _open_and_run(page, lab, "01_router_analysis.ipynb", ".moe-hit-ratio")
            # the heatmap: drawn by JupyterLab's plotly extension from the output's plotly JSON
            page.wait_for_selector(".js-plotly-plot .hm, .js-plotly-plot .heatmaplayer", timeout=60_000)
            n = _assert_figures_fit(page)
            before, after = _explorer_slider_moves_the_hit_ratio(page)
            _assert_figures_fit(page)
            _save(page, lab, "notebook01", ".moe-cache-explorer")
        finally:
            browser.close()
    print(f"notebook 01: {n} figures fit; hit ratio {before} -> {after}")


def test_notebook03_cache_explorer_fits_and_responds(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            _open_and_run(page, lab, "03_lru_cache.ipynb", ".moe-hit-ratio")
            n = _assert_figures_fit(page)
            before, after = _explorer_slider_moves_the_hit_ratio(page)
            _save(page, lab, "notebook03", ".moe-cache-explorer")
        finally:
            browser.close()
    print(f"notebook 03: {n} figures fit; hit ratio {before} -> {after}")


def test_notebook07_timeline_renders_and_follows_the_bandwidth(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            _open_and_run(page, lab, "07_inside_the_engine.ipynb", ".moe-token-time")
            page.wait_for_selector(".js-plotly-plot .barlayer", timeout=60_000)   # the Gantt chart's bars
            n = _assert_figures_fit(page)
            before = _token_ms(page)
            _move(page, ".moe-bandwidth", "Home", 1)            # the slowest link the slider offers
            page.wait_for_function(
                "(before) => { const e = document.querySelector('.moe-token-time');"
                " const m = e && e.innerText.match(/token time: ([\\d.]+) ms/); return m && parseFloat(m[1]) !== before; }",
                arg=before, timeout=SLIDER_S * 1000)
            after = _token_ms(page)
            assert after > before, f"a slower link made the token faster: {before} -> {after} ms"
            page.wait_for_function(   # the chart was redrawn for the new bandwidth (its title says which)
                "() => [...document.querySelectorAll('.js-plotly-plot .gtitle')].some(t => /copies at 0\\.3\\d* GB\\/s/"
                ".test(t.textContent))", timeout=SLIDER_S * 1000)
            _assert_figures_fit(page)
            _save(page, lab, "notebook07", ".moe-timeline")
        finally:
            browser.close()
    print(f"notebook 07: {n} figures fit; token time {before} -> {after} ms")


def test_a_saved_notebook_shows_its_figures_without_a_kernel(lab, monkeypatch):
    """Notebook 03 executed headless (live widgets, as in a kernel) and saved WITH its outputs but
    without widget state, then opened in JupyterLab and not run: every figure must still show
    (plotly from the saved JSON, the live views' static SVG), never a widget's text repr."""
    import nbformat
    from nbclient import NotebookClient
    from playwright.sync_api import sync_playwright

    path = lab["root"] / "03_lru_cache.ipynb"
    nb = nbformat.read(path, as_version=4)
    monkeypatch.delenv("MOE_COLAB_STATIC", raising=False)      # live widgets, as in a kernel
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(lab["root"])}}).execute()
    nb.metadata.pop("widgets", None)
    saved = lab["root"] / "saved_03.ipynb"
    nbformat.write(nb, saved)
    with sync_playwright() as pw:
        browser = _launch(pw)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            page.goto(f"{lab['base']}/lab/tree/{saved.name}?token={lab['token']}", timeout=120_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
            page.wait_for_selector(".js-plotly-plot", timeout=60_000)
            page.wait_for_timeout(3000)
            texts = page.locator(".jp-OutputArea").all_inner_texts()
            assert not [t for t in texts if "VBox(children" in t or "Loading widget" in t], \
                "a widget shows as text instead of its picture"
            pictures = page.locator(".jp-OutputArea-output img, .jp-OutputArea-output svg").count()
            assert pictures >= 1, "no static picture rendered"
            _assert_figures_fit(page)
            page.screenshot(path=str(lab["tmp"] / "saved03.png"))
        finally:
            browser.close()
