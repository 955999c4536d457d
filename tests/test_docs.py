"""The docs site and JupyterLab, checked in a real browser (Debian's chromium driven by Playwright).
The site is built once (offline, strict: Sphinx warnings and broken internal links fail), served on 127.0.0.1,
and looked at; JupyterLab is started with a token, a chapter is run in it, and both servers are stopped."""
import json
import os
import re
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


FAKE_RUN = "f00dfeedbeef"


def fake_msam_run(runs):
    """A complete default run of msam made by the current code, whose outputs carry a marker: the page must show it."""
    ch = repro.chapters(ROOT / "nbs")["msam"]
    d = runs / "msam" / "tiny" / FAKE_RUN
    d.mkdir(parents=True)
    nb = json.loads(ch.path.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and "parameters" in c.get("metadata", {}).get("tags", []))
    cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "MARKER-FROM-THE-RUN"}]
    (d / "executed.ipynb").write_text(json.dumps(nb))
    (d / "complete.json").write_text(json.dumps(dict(run_id=FAKE_RUN, seconds=1.0, finished="2026-12-05T08:00:00+0000",
                                                     code_version=repro.code_version(ch), default_run=True, overrides={})))
    (d / "env.json").write_text(json.dumps(dict(device_name="test-cpu")))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    runs = tmp_path_factory.mktemp("runs")
    fake_msam_run(runs)
    t0 = time.time()
    old = os.environ.get("LIPAPERS_RUNS")
    os.environ["LIPAPERS_RUNS"] = str(runs)
    try:
        docs.build(ROOT, out)
    finally:
        os.environ.pop("LIPAPERS_RUNS") if old is None else os.environ.__setitem__("LIPAPERS_RUNS", old)
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
    assert not (ROOT / "jupyter_execute").exists() and not (out.parent / "jupyter_execute").exists(), "the build leaves no jupyter_execute/"
    src = (out / "_source" / "lipapers" / "core.py.html").read_text()
    assert "charset=utf-8" in src and "charset=None" not in src
    for f in out.glob("**/*.html"):
        if "_static" in f.parts or "_source" in f.relative_to(out).parts:
            continue
        h = f.read_text()
        assert "<small>shape: (" not in h and not re.search(r"<thead>(?:(?!</thead>).)*<td>(str|f64|i64)</td>", h, re.S), f"{f.relative_to(out)} shows a raw polars frame"


def test_chapter_page_is_built_from_the_latest_default_run(site):
    out, _ = site
    ch = repro.chapters(ROOT / "nbs")["msam"]
    text = html_text(out / str(ch.path.relative_to(ROOT / "nbs")).replace(".ipynb", ".html"))
    assert f"run {FAKE_RUN}" in text and "test-cpu" in text and "2026-12-05T08:00:00" in text, text[:2000]
    assert "MARKER-FROM-THE-RUN" in (out / str(ch.path.relative_to(ROOT / "nbs")).replace(".ipynb", ".html")).read_text()


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
def test_equations_code_and_api_entries_read_well(site, browser):
    """No display equation is clipped (wide ones scroll), code blocks wrap instead of scrolling sideways, and a show_doc
    source link sits under the heading it belongs to."""
    out, base = site
    for rel in ("ranking/30_lirank.html", "optim/50_msam.html", "00_core.html"):
        if not (out / rel).exists():
            continue
        page, _ = open_page(browser, f"{base}/{rel}")
        page.wait_for_timeout(1500)  # MathJax typesets after load
        clipped = page.evaluate("""() => [...document.querySelectorAll('mjx-container[display="true"]')].filter(m => {
            const s = getComputedStyle(m); return m.scrollWidth > m.clientWidth + 1 && !['auto', 'scroll'].includes(s.overflowX);
          }).length""")
        assert clipped == 0, f"{rel}: {clipped} display equations clipped"
        wide = page.evaluate("""() => [...document.querySelectorAll('div.highlight pre')].filter(p => p.scrollWidth > p.clientWidth + 1).length""")
        assert wide == 0, f"{rel}: {wide} code blocks scroll sideways"
        above = page.evaluate("""() => [...document.querySelectorAll('a')].filter(a => a.textContent.trim() === 'source').filter(a => {
            const block = a.closest('.cell_output'); const h = block && block.querySelector('h2, h3, h4');
            return h && (a.compareDocumentPosition(h) & Node.DOCUMENT_POSITION_FOLLOWING); }).length""")
        assert above == 0, f"{rel}: {above} source links sit above their heading"
        page.close()


@needs_browser
def test_home_and_results_pages(site, browser):
    _, base = site
    page, requests = open_page(browser, f"{base}/index.html")
    assert "lipapers" in page.title()
    assert "make repro" in page.inner_text("main") and "make test" in page.inner_text("main")
    hrefs = page.evaluate("() => [...document.querySelectorAll('main table a')].map(a => a.getAttribute('href'))")
    assert any(h.endswith("50_msam.html") for h in hrefs) and any(h.startswith("http") for h in hrefs), hrefs
    page.close()
    page, requests = open_page(browser, f"{base}/99_results.html")
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=20000)
    assert not [u for u in requests if not u.startswith(base) and not u.startswith("data:")]
    page.close()


def cmdlines():
    out = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out.append(p.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    return out


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
        page.wait_for_timeout(3000)  # let the front end settle (kernel info, widget manager, metadata)
        assert page.evaluate("() => window.jupyterapp.shell.currentWidget.context.model.dirty") is False, "the notebook shows as modified on open"
        assert page.locator("text=Jupyter news").count() == 0, "the news pop-up appeared"
        assert not [c for c in cmdlines() if token in c], "the JupyterLab token shows in the process list"
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
