"""The HTML report of a finished study, opened in a real (headless) Chromium.

The report (`snakemake --report`) is a self-contained single-page app: a bug in it (a script error, a missing
asset, a result that is not embedded) is only visible in a browser. These tests open it in Debian's Chromium,
driven over the Chrome DevTools Protocol through ``--remote-debugging-pipe`` (no Python dependency, no port),
and check that

- the page loads without JavaScript errors: uncaught exceptions, ``console.error`` calls and browser log errors
  (a failed resource load, a blocked request) are all collected;
- every figure and table of the study (``catalog.REPORT_FIGURES`` / ``REPORT_TABLES``) is embedded in the report
  and listed when a user opens its category in the report's menu;
- a screenshot of the first page is saved (``$PRETRAIN_DET3D_ARTIFACTS`` or ``results/test-artifacts``,
  ``report.png``).

Unit tests of the checker on hand-made pages show that it fails on a script error and on a missing figure.
Chromium comes from ``tests/system/ensure_test_system.sh`` (``make test`` runs it as root); without it the tests
fail and say how to install it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pytest

from conftest import REPO

#: Debian's chromium (apt-get install chromium); override with $CHROMIUM
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-pipe",
)
#: generous waits on a loaded 2-core machine; they bound hangs, nothing is asserted about durations
START_TIMEOUT_S = 60.0
LOAD_TIMEOUT_S = 90.0


def find_chromium() -> str:
    """Path of the Chromium binary, or a failure naming the missing piece and how to get it."""
    explicit = os.environ.get("CHROMIUM")
    for candidate in ([explicit] if explicit else []) + list(CHROMIUM_CANDIDATES):
        path = shutil.which(candidate)
        if path:
            return path
    pytest.fail(
        "Chromium is not installed (needed to open the HTML report in a browser): run "
        "`sudo bash tests/system/ensure_test_system.sh` (or `apt-get install chromium`), or set $CHROMIUM",
        pytrace=False,
    )


class BrowserError(RuntimeError):
    """The browser did not start, did not answer, or answered a DevTools command with an error."""


class Chromium:
    """A headless Chromium driven over the DevTools protocol on a pipe (fd 3: commands in, fd 4: messages out).

    Messages are JSON objects ended by a NUL byte. One page target is attached in flattened mode, so its
    commands and events carry its ``sessionId``.
    """

    def __init__(self, executable: str, width: int = 1280, height: int = 900):
        self.profile = tempfile.mkdtemp(prefix="pretrain-det3d-chromium-")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def child_fds() -> None:  # runs in the child before exec: the pipe ends become fds 3 and 4
            # copies above 10 first, so that neither end is overwritten by the other's dup2 whatever their numbers
            read_end = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)  # dup2 onto another number: an inheritable copy, open after exec
            os.dup2(write_end, 4)

        self.log_path = Path(self.profile) / "chromium.log"
        self._log = open(self.log_path, "wb")
        command = [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                   f"--window-size={width},{height}", "about:blank"]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                        close_fds=False, preexec_fn=child_fds)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._events: queue.Queue[dict] = queue.Queue()
        self._lock = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session: str | None = None
        self.width, self.height = width, height
        self.send("Browser.getVersion", timeout=START_TIMEOUT_S)

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._lock:
                    self._closed = True
                    self._lock.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        self._replies[message["id"]] = message
                        self._lock.notify_all()
                else:
                    self._events.put(message)

    def send(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 30.0) -> dict:
        """Send one command and wait for its reply; ``session`` sends it to the attached page."""
        with self._lock:
            self._next_id += 1
            ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._lock:
            while ident not in self._replies:
                if self._closed:
                    raise BrowserError(f"Chromium exited during {method}; its log: {self.log_tail()}")
                if not self._lock.wait(timeout=max(0.0, deadline - time.monotonic())) and time.monotonic() > deadline:
                    raise BrowserError(f"no answer to {method} within {timeout:.0f} s; Chromium's log: {self.log_tail()}")
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def events(self) -> list[dict]:
        """Every event received so far (and forgets them)."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def wait_event(self, method: str, timeout: float, seen: list[dict]) -> dict:
        """Wait for an event of the attached page named ``method``; every event read is appended to ``seen``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                if self._closed:
                    break
                continue
            seen.append(event)
            if event.get("method") == method and event.get("sessionId") == self.session:
                return event
        raise BrowserError(f"no {method} within {timeout:.0f} s; Chromium's log: {self.log_tail()}")

    def open_page(self) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                           "deviceScaleFactor": 1, "mobile": False}, session=True)

    def evaluate(self, expression: str, timeout: float = 30.0) -> Any:
        """Value of a JavaScript expression in the page (promises awaited); a thrown error raises."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                           session=True, timeout=timeout)
        if "exceptionDetails" in result:
            raise BrowserError(f"evaluating {expression[:80]!r}: {describe_exception(result['exceptionDetails'])}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"}, session=True, timeout=60)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def log_tail(self, chars: int = 2000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                try:
                    self.send("Browser.close", timeout=10)
                except BrowserError:
                    pass
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=15)
        finally:
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()
            shutil.rmtree(self.profile, ignore_errors=True)


def describe_exception(details: dict) -> str:
    exception = details.get("exception") or {}
    text = exception.get("description") or details.get("text", "exception")
    return f"{text} (line {details.get('lineNumber', '?')}, {details.get('url', 'page')})"


def page_errors(events: Iterable[dict], session: str | None) -> list[str]:
    """JavaScript errors among DevTools events: uncaught exceptions, console.error/assert, browser log errors."""
    errors = []
    for event in events:
        if session is not None and event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append("uncaught exception: " + describe_exception(params.get("exceptionDetails", {})))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            errors.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"browser log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
    return errors


@dataclass
class PageCheck:
    """What a browser saw of one page."""

    errors: list[str] = field(default_factory=list)
    text: str = ""


def load_page(browser: Chromium, path: Path, ready: str = "document.readyState === 'complete'") -> PageCheck:
    """Open ``path``, wait for the load event and until ``ready`` (a JS expression) is true, collect errors."""
    seen: list[dict] = []
    reply = browser.send("Page.navigate", {"url": path.resolve().as_uri()}, session=True)
    check = PageCheck()
    if reply.get("errorText"):
        check.errors.append(f"navigation failed: {reply['errorText']}")
        return check
    browser.wait_event("Page.loadEventFired", LOAD_TIMEOUT_S, seen)
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while not browser.evaluate(f"Boolean({ready})"):
        if time.monotonic() > deadline:
            check.errors.append(f"the page never became ready ({ready})")
            break
        time.sleep(0.2)
    # let timers queued by the app's start-up run, then take every event received so far
    browser.evaluate("new Promise(done => setTimeout(done, 500))")
    seen += browser.events()
    check.errors += page_errors(seen, browser.session)
    check.text = browser.evaluate("document.body ? document.body.innerText : ''")
    return check


def wait_for(browser: Chromium, expression: str, what: str, timeout: float = LOAD_TIMEOUT_S) -> Any:
    """Poll a JavaScript expression until it is truthy; its value, or an AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = browser.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the report never showed {what} ({expression})")
        time.sleep(0.1)


def decode_data_uri(uri: str) -> bytes:
    """Bytes of a ``data:`` URI (base64 or percent-encoded), as Snakemake embeds results."""
    from urllib.parse import unquote_to_bytes

    if not uri or not uri.startswith("data:") or "," not in uri:
        raise ValueError(f"not a data URI: {uri[:60]!r}")
    header, payload = uri.split(",", 1)
    return base64.b64decode(payload) if header.endswith(";base64") else unquote_to_bytes(payload)


#: the report is ready when its React app has drawn the menu
REPORT_READY = "document.querySelectorAll('#app a').length > 0 && document.body.innerText.includes('Workflow')"
CLICK_TEXT = """(label => {{
    const link = [...document.querySelectorAll('#app a')].find(a => a.innerText.trim() === label);
    if (!link) return false;
    link.click();
    return true;
}})({label})"""
RESULT_ROWS = """JSON.stringify([...document.querySelectorAll('#app tbody tr')].map(tr => [
    tr.cells[0].innerText.trim(),
    (tr.querySelector('a[iconname=eye]') || {getAttribute: () => null}).getAttribute('href')]))"""


@dataclass
class ReportView:
    """What a user sees of a Snakemake report: per menu category the listed results, and their bytes."""

    errors: list[str] = field(default_factory=list)
    listed: dict[str, list[str]] = field(default_factory=dict)  # category -> result paths listed in its table
    shown: dict[str, bytes] = field(default_factory=dict)  # result path -> bytes the user gets when opening it


def click(browser: Chromium, label: str) -> None:
    if not browser.evaluate(CLICK_TEXT.format(label=json.dumps(label))):
        raise AssertionError(f"the report has no link {label!r}; the page reads: {browser.evaluate('document.body.innerText')[:500]}")


def inspect_report(browser: Chromium, report: Path, screenshot: Path | None = None) -> ReportView:
    """Open ``report`` as a user would: the start page, the statistics, every result category in its menu.

    An image is opened with its eye button and read back from the ``<img>`` the report then shows; any other
    result (CSV) is read from the data URI of its eye (download) button. Errors of every step are collected.
    """
    view = ReportView()
    try:
        _visit_report(browser, report, view, screenshot)
    except AssertionError as error:  # a page that cannot be used is a problem to report, with the errors seen
        view.errors.append(f"navigation stopped: {error}")
    view.errors += page_errors(browser.events(), browser.session)
    return view


def _visit_report(browser: Chromium, report: Path, view: ReportView, screenshot: Path | None) -> None:
    page = load_page(browser, report, REPORT_READY)
    view.errors += page.errors
    if screenshot is not None:
        browser.screenshot(screenshot)
    click(browser, "Statistics")
    wait_for(browser, "document.querySelectorAll('#app canvas, #app svg.marks').length > 0", "the statistics plots")
    categories = json.loads(browser.evaluate("JSON.stringify(typeof categories === 'object' ? categories : {})"))
    known = set(json.loads(browser.evaluate("JSON.stringify(Object.keys(typeof results === 'object' ? results : {}))")))
    for category, subcategories in categories.items():
        for subcategory in subcategories:
            page = load_page(browser, report, REPORT_READY)  # back to the start page, as a fresh visit
            view.errors += page.errors
            click(browser, category)
            if len(subcategories) > 1:
                click(browser, subcategory)
            rows = json.loads(wait_for(browser, f"document.querySelector('#app tbody tr') && {RESULT_ROWS}",
                                       f"the results of {category}/{subcategory}"))
            view.listed.setdefault(category, []).extend(path for path, _ in rows if path in known)
            for index, (path, href) in enumerate(rows):
                if path not in known:  # a labelled result (per-run learning curves) shows its labels, not its path
                    continue
                if href and href.startswith("data:"):
                    view.shown[path] = decode_data_uri(href)
                    continue
                browser.evaluate(f"document.querySelectorAll('#app tbody tr')[{index}].querySelector('a[iconname=eye]').click()")
                # the image the report now shows for this result, once decoded (a broken image has no width)
                src = wait_for(browser, f"(() => {{ const uri = (results[{json.dumps(path)}] || {{}}).data_uri;"
                               " const img = [...document.querySelectorAll('#app img')]"
                               ".find(i => uri && i.src === uri && i.complete && i.naturalWidth > 0);"
                               " return img ? img.src : null; })()", f"the image {path}")
                view.shown[path] = decode_data_uri(src)


def report_problems(view: ReportView, expected: dict[str, bytes]) -> list[str]:
    """Everything wrong with a report view: JavaScript errors, expected results not listed or not shown as written."""
    problems = [f"JavaScript error: {error}" for error in view.errors]
    listed = {path for paths in view.listed.values() for path in paths}
    for path, content in expected.items():
        if path not in listed:
            problems.append(f"{path} is not listed in any category of the report ({sorted(listed)})")
        elif path not in view.shown:
            problems.append(f"{path} is listed but cannot be opened")
        elif view.shown[path] != content:
            problems.append(f"{path} as shown in the report ({len(view.shown[path])} bytes) differs from the file "
                            f"({len(content)} bytes)")
    return problems


def expected_results(workdir: Path) -> dict[str, bytes]:
    """Every figure (PNG) and table (CSV) of the study that its report must show, with the bytes on disk."""
    from pretrain_det3d import catalog

    paths = [f"results/figures/{name}.png" for name in catalog.REPORT_FIGURES]
    paths += [f"results/tables/{name}.csv" for name in ("main_results", *catalog.REPORT_TABLES)]
    return {path: (workdir / path).read_bytes() for path in paths}


def artifacts_dir() -> Path:
    """Where test artefacts go: ``$PRETRAIN_DET3D_ARTIFACTS``, default ``results/test-artifacts`` (gitignored)."""
    return Path(os.environ.get("PRETRAIN_DET3D_ARTIFACTS") or REPO / "results" / "test-artifacts")


@pytest.fixture(scope="session", autouse=True)
def chromium_executable() -> str:
    """Fails every test of this module first thing (before the smoke study runs) when Chromium is missing."""
    return find_chromium()


@pytest.fixture(scope="module")
def browser(chromium_executable):
    chromium = Chromium(chromium_executable)
    try:
        chromium.open_page()
        yield chromium
    finally:
        chromium.close()


# --- the checker on hand-made pages: it must fail where the report would be broken ---------------------------


def test_clean_page_has_no_errors(browser, tmp_path):
    page = tmp_path / "clean.html"
    page.write_text("<html><body><h1>Figures</h1><script>console.log('fine');"
                    "document.body.append('ap_by_init')</script></body></html>")
    check = load_page(browser, page)
    assert check.errors == []
    assert "ap_by_init" in check.text


@pytest.mark.parametrize("script, expected", [
    ("undefinedFunction();", "uncaught exception: ReferenceError: undefinedFunction is not defined"),
    ("console.error('broken', 42);", "console.error: broken 42"),
    ("setTimeout(() => { throw new Error('late failure'); }, 50);", "uncaught exception: Error: late failure"),
    ("Promise.reject(new Error('rejected'));", "uncaught exception: Error: rejected"),
])
def test_injected_script_errors_are_caught(browser, tmp_path, script, expected):
    page = tmp_path / "broken.html"
    page.write_text(f"<html><body><p>text</p><script>{script}</script></body></html>")
    errors = load_page(browser, page).errors
    assert any(error.startswith(expected) for error in errors), errors


def test_missing_resource_is_an_error(browser, tmp_path):
    page = tmp_path / "missing.html"
    page.write_text("<html><body><img src='does_not_exist.png'></body></html>")
    errors = load_page(browser, page).errors
    assert any("does_not_exist.png" in error for error in errors), errors


def test_checker_reports_a_missing_or_changed_result():
    expected = {"results/figures/froc.png": b"png", "results/tables/pairwise_tests.csv": b"a,b\n"}
    good = ReportView(listed={"Figures": ["results/figures/froc.png"], "Tables": ["results/tables/pairwise_tests.csv"]},
                      shown=dict(expected))
    assert report_problems(good, expected) == []
    missing = ReportView(listed={"Tables": ["results/tables/pairwise_tests.csv"]},
                         shown={"results/tables/pairwise_tests.csv": b"a,b\n"})
    assert report_problems(missing, expected) == [
        "results/figures/froc.png is not listed in any category of the report (['results/tables/pairwise_tests.csv'])"]
    changed = ReportView(listed=good.listed, shown={**expected, "results/tables/pairwise_tests.csv": b"a,c\n"},
                         errors=["console.error: x"])
    assert report_problems(changed, expected) == [
        "JavaScript error: console.error: x",
        "results/tables/pairwise_tests.csv as shown in the report (4 bytes) differs from the file (4 bytes)"]


def test_data_uris_decode():
    assert decode_data_uri("data:text/csv;charset=utf8;filename=a.csv;base64," + base64.b64encode(b"x,y\n").decode()) == b"x,y\n"
    assert decode_data_uri("data:text/plain,a%20b") == b"a b"
    with pytest.raises(ValueError, match="not a data URI"):
        decode_data_uri("#")


# --- the study's report ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_shows_every_figure_and_table_without_errors(browser, smoke_report, smoke_run):
    screenshot = artifacts_dir() / "report.png"
    screenshot.unlink(missing_ok=True)
    view = inspect_report(browser, smoke_report, screenshot)
    problems = report_problems(view, expected_results(smoke_run))
    assert problems == [], "\n".join(problems)
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert set(view.listed) == {"Figures", "Tables", "Learning curves"}


def _edited_report(report: Path, out: Path, edit) -> Path:
    out.write_text(edit(report.read_text(encoding="utf-8")), encoding="utf-8")
    return out


@pytest.mark.slow
def test_report_without_a_figure_fails_the_check(browser, smoke_report, smoke_run, tmp_path):
    """The same report with one figure taken out of its embedded data: the check names that figure."""
    import re

    def drop_froc(html: str) -> str:
        def edit(match: re.Match) -> str:
            data = json.loads(match.group(2))
            if match.group(1) == "results":
                data.pop("results/figures/froc.png")
            else:
                data["Figures"] = {sub: [p for p in paths if not p.endswith("/froc.png")]
                                   for sub, paths in data["Figures"].items()}
            return f"var {match.group(1)} = {json.dumps(data)};"

        html, count = re.subn(r"var (results|categories) = (\{.*?\});(?=\s*</script>)", edit, html, flags=re.S)
        assert count == 2, "the report's embedded data changed shape"
        return html

    broken = _edited_report(smoke_report, tmp_path / "report.html", drop_froc)
    problems = report_problems(inspect_report(browser, broken), expected_results(smoke_run))
    assert problems == [f"results/figures/froc.png is not listed in any category of the report "
                        f"({sorted(p for p in expected_results(smoke_run) if not p.endswith('froc.png'))})"]


@pytest.mark.slow
def test_report_with_a_script_error_fails_the_check(browser, smoke_report, smoke_run, tmp_path):
    """The same report with a script that throws after start-up appended to its body: the check reports it."""
    injected = "<script>setTimeout(() => { throw new Error('injected failure'); }, 0);</script>"

    def inject(html: str) -> str:  # before the page's own closing tag (library sources also contain "</body>")
        head, tag, tail = html.rpartition("</body>")
        assert tag, "the report has no </body>"
        return head + injected + tag + tail

    broken = _edited_report(smoke_report, tmp_path / "report.html", inject)
    problems = report_problems(inspect_report(browser, broken), expected_results(smoke_run))
    assert problems and all("injected failure" in problem for problem in problems), problems
