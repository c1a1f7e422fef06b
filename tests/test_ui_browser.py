"""``make ui``: the command line and the loopback default, and a review in a real headless browser.

The browser test drives Debian's chromium through the Chrome DevTools Protocol over
``--remote-debugging-pipe`` (fds 3/4, NUL-separated JSON): standard library only, no websocket or
Selenium dependency. It starts ``python -m pipeline ui`` for real over the small sweep of
``test_report`` and does what a reviewer does: open the experiment's runs, expand the sweep's parent,
filter on ``tags.regime``, open a run and its profile plot. Screenshots go to ``test-output/``.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import ROOT, TEST_OUTPUT, skip_or_fail, wait_for_http
from test_report import STUDY, build_small_sweep

CHROMIUM = os.environ.get("PIPELINE_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory) -> dict:
    return build_small_sweep(tmp_path_factory.getbasetemp() / "small_sweep")  # shared with test_report


# ----------------------------------------------------------------------------- command line (no server)


def _ui_args(**kw) -> argparse.Namespace:
    from pipeline.cli import ui

    p = argparse.ArgumentParser()
    ui.add_arguments(p)
    return p.parse_args([x for k, v in kw.items() for x in (f"--{k}", str(v))])


def _exec_capture(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, list(argv))))
    return calls


def test_ui_binds_loopback_by_default_without_warning(store, monkeypatch, capsys):
    from pipeline.cli import ui
    from pipeline.tracking import ensure_experiment

    ensure_experiment(store, "x")  # a store to serve: a missing one is refused (below)

    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    calls = _exec_capture(monkeypatch)
    assert ui.command(_ui_args(port=5123)) == 0
    ((path, argv),) = calls
    assert path == sys.executable
    assert argv == [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        store,
        "--host",
        "127.0.0.1",
        "--port",
        "5123",
        "--workers",
        "1",
    ]
    assert os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # no GenAI job runners
    out = capsys.readouterr()
    assert "warning" not in out.err and "http://127.0.0.1:5123" in out.out


def test_ui_other_host_warns_about_no_authentication(store, monkeypatch, capsys):
    from pipeline.cli import ui
    from pipeline.tracking import ensure_experiment

    ensure_experiment("sqlite:///elsewhere.db", "x")
    capsys.readouterr()  # MLflow's own lines while it made the store
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    calls = _exec_capture(monkeypatch)
    ui.command(_ui_args(host="0.0.0.0", port=5000, store="sqlite:///elsewhere.db"))
    assert os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "true"  # the user's explicit choice wins
    argv = calls[0][1]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--backend-store-uri") + 1] == "sqlite:///elsewhere.db"
    err = capsys.readouterr().err
    assert err.startswith("warning: binding the MLflow UI to 0.0.0.0") and "no authentication" in err


def test_ui_over_a_store_that_does_not_exist_is_one_line_and_creates_nothing(tmp_path, monkeypatch):
    """MLflow made a mistyped store and served it empty, leaving the file behind (walkthrough)."""
    from pipeline.cli import ui
    from pipeline.schema import ConfigError

    calls = _exec_capture(monkeypatch)
    with pytest.raises(ConfigError, match=r"^--store: no MLflow store at .*nosuch\.db \(run make train"):
        ui.command(_ui_args(port=5002, store=f"sqlite:///{tmp_path / 'nosuch.db'}"))
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_ui_prints_the_runs_table_of_each_sweep(small_sweep, monkeypatch, capsys):
    from pipeline.cli import ui

    _exec_capture(monkeypatch)
    ui.command(_ui_args(port=5001, store=small_sweep["uri"]))
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:5001/#/experiments/{small_sweep['experiment_id']}/runs" in out


def test_ui_links_the_sweeps_first_then_the_newest_experiments_at_most_five(store):
    """Before the UI starts, ``ui`` prints the runs table of each experiment with a sweep, then of the
    other experiments with runs, newest first, at most five; an IPv6 host is bracketed in the URL
    (mutation review)."""
    from pipeline.cli import ui
    from pipeline.tracking import Recorder, ensure_experiment

    ids = {}
    for name in "abcdefg":
        rec = Recorder.start(store, name, "r", tags={"pipeline.kind": "sweep"} if name == "b" else None)
        rec.close()
        ids[name] = rec.experiment_id
    ensure_experiment(store, "empty")  # no run: no link
    url = ui.base_url("::1", 5000)
    assert url == "http://[::1]:5000"
    assert ui.run_links(store, url) == [f"{n}: {url}/#/experiments/{ids[n]}/runs" for n in "bgfed"]


def test_make_ui_target_calls_the_ui_verb():
    make = (ROOT / "Makefile").read_text()
    assert "-m pipeline ui --port $(PORT)" in make and "PORT ?= 5000" in make


# ------------------------------------------------------------------------------- the real browser


class Chromium:
    """Headless chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``)."""

    def __init__(self, exe: str, size=(1600, 1000)):
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_chrome, self._w = os.pipe()
        self._r, from_chrome = os.pipe()
        # the shell moves our pipe ends to fds 3 and 4; their own numbers must not be 3 or 4
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome, from_chrome)]
        os.close(to_chrome)
        os.close(from_chrome)
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={self.profile}",
            f"--window-size={size[0]},{size[1]}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        sh = f'exec 3<&{hi[0]} 4>&{hi[1]} {hi[0]}<&- {hi[1]}>&-; exec "$@"'
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", sh, "bash", exe, *flags],
            pass_fds=hi,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for fd in hi:
            os.close(fd)
        self._buf, self._id = b"", 0
        pages = [t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
        self.session = self.call("Target.attachToTarget", targetId=pages[0]["targetId"], flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable", page=True)

    def _message(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, page: bool = False, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if page:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            r = self._message()
            if r.get("id") == self._id:
                if "error" in r:
                    raise RuntimeError(f"{method}: {r['error']}")
                return r["result"]

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", page=True, expression=expression, returnByValue=True)
        return r["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", page=True, url=url)

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait(self, expression: str, timeout: float = 60.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = self.js(expression)
            if v:
                return v
            time.sleep(0.25)
        return None

    def wait_text(self, *needles: str, timeout: float = 60.0) -> bool:
        cond = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in needles)
        return bool(self.wait(f"!!document.body && {cond}", timeout))

    def type_and_enter(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", page=True, text=text)
        for kind in ("keyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent",
                page=True,
                type=kind,
                key="Enter",
                code="Enter",
                windowsVirtualKeyCode=13,
                nativeVirtualKeyCode=13,
                **({"text": "\r"} if kind == "keyDown" else {}),
            )

    def screenshot(self, path) -> None:
        data = self.call("Page.captureScreenshot", page=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(10)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for fd in (self._r, self._w):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui_server(small_sweep, tmp_path_factory):
    """``python -m pipeline ui`` (the `make ui` command) over the small sweep, on a free loopback port."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        skip_or_fail("PIPELINE_REQUIRE_BROWSER", f"chromium not found at {CHROMIUM} (install: make browser)")
    sweep = small_sweep
    port = _free_port()
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "ui", "--port", str(port), "--store", sweep["uri"]],
            cwd=sweep["base"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # its own group: mlflow ui starts worker processes
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc, 180, log)
        yield {**sweep, "url": url, "log": log}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def browser():
    b = Chromium(CHROMIUM)
    yield b
    b.close()


@pytest.mark.browser
def test_review_a_sweep_in_the_mlflow_ui(ui_server, browser):
    from mlflow.tracking import MlflowClient

    out = TEST_OUTPUT / "ui"
    out.mkdir(parents=True, exist_ok=True)
    c = MlflowClient(ui_server["uri"])
    exp, parent = ui_server["experiment_id"], c.get_run(ui_server["parent_run_id"])
    runs = {t["run_id"]: c.get_run(t["run_id"]) for t in ui_server["trials"]}
    names = {rid: r.info.run_name for rid, r in runs.items()}
    assert len(set(names.values())) == len(names), f"run names must be distinct to be told apart: {names}"
    diverged = [rid for rid, r in runs.items() if r.data.tags["regime"] == "diverged"]
    vanishing = next(
        rid
        for rid, r in runs.items()
        if r.data.tags["regime"] == "vanishing"
        and "bptt_profile.png" in {a.path.split("/")[-1] for a in c.list_artifacts(rid, "plots")}
    )
    base = f"{ui_server['url']}/#/experiments/{exp}"

    # 1. the experiment's runs: the sweep's parent, with its trials nested under it
    browser.goto(f"{base}/runs")
    assert browser.wait_text(parent.info.run_name), browser.text()[:2000]
    browser.js("document.querySelector('button[data-component-id*=runnamecellrenderer]').click()")
    assert browser.wait_text(*names.values(), timeout=30), "the nested trials did not appear"
    browser.screenshot(out / "1-experiment-runs.png")

    # 2. filter on the regime tag, as a reviewer types it
    browser.type_and_enter("input[data-testid=search-box]", "tags.regime = 'diverged'")
    assert browser.wait("location.href.includes('searchFilter=tags.regime')", 20)
    if not browser.wait_text(names[diverged[0]], timeout=5):  # the filter re-collapses the parent
        browser.js("document.querySelector('button[data-component-id*=runnamecellrenderer]').click()")
    assert browser.wait_text(*(names[r] for r in diverged), timeout=30)
    gone = f"!document.body.innerText.includes({json.dumps(names[vanishing])})"
    assert browser.wait(gone, 15), "the filter kept a run whose regime is not 'diverged'"
    browser.screenshot(out / "2-filter-regime-diverged.png")

    # 3. a run page shows the public tags: regime and its value
    browser.goto(f"{base}/runs/{vanishing}")
    assert browser.wait_text(names[vanishing], STUDY), browser.text()[:2000]
    tag = r"/(^|\s)regime\s*:\s*vanishing/"  # the chip renders as "regime\n: vanishing"
    assert browser.wait(f"{tag}.test(document.body.innerText)", 30), browser.text()[:3000]
    browser.screenshot(out / "3-run-tags.png")

    # 4. its profile plot, rendered (the image decoded, not just a link)
    browser.goto(f"{base}/runs/{vanishing}/artifacts/plots/bptt_profile.png")
    width = browser.wait(
        "Array.from(document.images).filter(i => (i.alt || '').includes('bptt_profile.png')"
        " && i.complete).map(i => i.naturalWidth)[0]",
        60,
    )
    assert width and width > 300, "plots/bptt_profile.png did not render in the artifact view"
    browser.screenshot(out / "4-profile-plot.png")
    assert all((out / f).stat().st_size > 10_000 for f in ("1-experiment-runs.png", "4-profile-plot.png"))
