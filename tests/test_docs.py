"""The docs site and JupyterLab, checked in a real browser (Debian's chromium driven by Playwright).
The site is built once (offline, strict: Sphinx warnings and broken internal links fail), served on 127.0.0.1,
and looked at; JupyterLab is started with a token, a chapter is run in it, and both servers are stopped."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lipapers import docs, repro

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
# the chapter opened in JupyterLab: fast at its defaults and draws a plotly figure
LAB_NOTEBOOK = os.environ.get("LIPAPERS_LAB_NOTEBOOK", "optim/50_msam.ipynb")
needs_browser = pytest.mark.skipif(not HAVE_CHROMIUM and not os.environ.get("CI"), reason="Debian chromium is not installed (make setup installs it)")


def test_nbs_quarto_yml_is_derived_from_top_level():
    assert (ROOT / "nbs" / "_quarto.yml").read_text() == docs.derived_quarto_yml(ROOT), "run `make docs` to re-derive nbs/_quarto.yml"


def test_sidebar_lists_every_chapter_notebook():
    pages = {p for _, ps in docs.sidebar(docs.site_config(ROOT)) for p in ps}
    chapters = {str(ch.path.relative_to(ROOT / "nbs")) for ch in repro.chapters(ROOT / "nbs").values()}
    assert chapters <= pages, f"chapters missing from _quarto.yml's sidebar: {sorted(chapters - pages)}"


def html_text(f):
    """The visible prose of a page (scripts, styles and code dropped)."""
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.parts, self.skip = [], 0

        def handle_starttag(self, tag, attrs):
            self.skip += tag in ("script", "style", "code", "pre")  # code may quote Quarto markup on purpose

        def handle_endtag(self, tag):
            self.skip -= tag in ("script", "style", "code", "pre") and self.skip > 0

        def handle_data(self, data):
            if not self.skip:
                self.parts.append(data)

    t = Text()
    t.feed(f.read_text(errors="replace"))
    return " ".join(t.parts)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, seconds=90):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    t0 = time.time()
    docs.build(ROOT, out)
    print(f"docs built in {time.time() - t0:.1f}s")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/index.html")
        yield out, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                                              "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def open_page(browser, url):
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url, wait_until="networkidle")
    return page, requests


def test_every_sidebar_page_was_built_and_links_hold(site):
    out, _ = site
    for _, pages in docs.sidebar(docs.site_config(ROOT)):
        for p in pages:
            assert (out / p.replace(".ipynb", ".html")).exists(), p
    assert docs.check_links(out) == []
    leaks = ("#| ", "::: {", "{target=", "output-file:", "callout-")
    for f in out.glob("**/*.html"):
        if "_static" in f.parts or "_source" in f.relative_to(out).parts:
            continue
        text = html_text(f)
        found = [x for x in leaks if x in text]
        assert not found, f"{f.relative_to(out)} shows Quarto markup {found}"
        assert 'class="c1">#|' not in f.read_text(), f"{f.relative_to(out)} shows a `#|` directive in a code cell"
    assert not (out / "_static" / "plotly.min.js").read_text().startswith("<"), "plotly.js is served locally"


@needs_browser
def test_chapter_page_in_a_real_browser(site, browser):
    out, base = site
    chapter = repro.chapters(ROOT / "nbs")["msam"]
    rel = str(chapter.path.relative_to(ROOT / "nbs")).replace(".ipynb", ".html")
    page, requests = open_page(browser, f"{base}/{rel}")
    assert chapter.title.split(":")[0][:20] in page.title(), page.title()
    nav = page.inner_text("nav.bd-docs-nav")
    for ch in repro.chapters(ROOT / "nbs").values():
        assert ch.title.split(":")[0][:20].lower() in nav.lower() or ch.name in nav.lower(), f"sidebar lacks {ch.name}: {nav}"
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=20000)  # plotly drew a figure
    assert page.locator(".js-plotly-plot").count() >= 1
    assert page.locator("a[id]").count() > 0 and page.locator("pre:has-text('def ')").count() > 0  # show_doc API entries
    outside = [u for u in requests if not u.startswith(base) and not u.startswith("data:")]
    assert not outside, f"fetched from outside 127.0.0.1: {outside[:5]}"
    page.close()


@needs_browser
def test_home_and_results_pages(site, browser):
    _, base = site
    page, requests = open_page(browser, f"{base}/index.html")
    assert "lipapers" in page.title()
    assert "make repro" in page.inner_text("main") and "make test" in page.inner_text("main")
    page.close()
    page, requests = open_page(browser, f"{base}/99_results.html")
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=20000)
    assert not [u for u in requests if not u.startswith(base) and not u.startswith("data:")]
    page.close()


@needs_browser
def test_jupyterlab_runs_a_chapter(browser, tmp_path):
    port, token = free_port(), os.urandom(8).hex()
    env = dict(os.environ, LIPAPERS_LAB_TOKEN=token, JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"))
    lab = subprocess.Popen([str(Path(sys.executable).parent / "lipapers"), "lab", "--port", str(port), "--",
                            "--LabApp.expose_app_in_browser=True", f"--FileCheckpoints.checkpoint_dir={tmp_path / 'checkpoints'}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/status?token={token}", 120)
        settings = json.loads((Path(sys.prefix) / "share/jupyter/lab/settings/overrides.json").read_text())
        assert settings["@jupyter-widgets/jupyterlab-manager:plugin"]["saveState"] is True
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/lab/tree/nbs/{LAB_NOTEBOOK}?token={token}&reset", wait_until="domcontentloaded")
        try:
            page.wait_for_function("""() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                return w && w.sessionContext && w.sessionContext.isReady && w.sessionContext.session && w.sessionContext.session.kernel
                       && w.sessionContext.session.kernel.connectionStatus === 'connected'; }""", timeout=240000, polling=1000)
        except Exception:
            page.screenshot(path=str(tmp_path / "lab-timeout.png"))
            raise
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        # wait until every code cell has an execution count and the kernel is idle
        done = """() => { const nb = window.jupyterapp.shell.currentWidget; const ctx = nb.sessionContext;
            const cells = nb.content.widgets.filter(c => c.model.type === 'code' && c.model.sharedModel.getSource().trim());
            return ctx.session.kernel.status === 'idle' && cells.every(c => c.model.executionCount); }"""
        page.wait_for_function(done, timeout=300000, polling=1000)
        errors = page.evaluate("""() => { const out = [];
            for (const c of window.jupyterapp.shell.currentWidget.content.widgets) {
              if (c.model.type !== 'code') continue;
              const o = c.model.outputs;
              for (let i = 0; i < o.length; i++) { const j = o.get(i).toJSON(); if (j.output_type === 'error') out.push(j.ename + ': ' + j.evalue); } }
            return out; }""")
        assert errors == [], errors
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30000)
        page.close()
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)
