"""The page (web/): a real TorchServe, the real page server, driven in headless Chromium.

Chromium is Debian's (/usr/bin/chromium, installed by scripts/setup.sh), driven by Playwright's
Python API. Every step saves a screenshot into the test's temporary folder.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from handlers.layout import read_archive_info
from imagerec.paths import PROJECT_ROOT
from imagerec.torchserve import TorchServe, free_port, install_archive

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
IMAGENET_MODE = "efficientnet_lite0"
ACCURATE_BACKBONE = "efficientnet_lite0_lite2"  # offered beside the served one by default
CLASSES = ("dress", "hat", "shoes")
PHOTOS_PER_CLASS = 6
TRAIN_TIMEOUT_MS = 300_000


class PageServer:
    """``python -m web.server`` as scripts/serve.py starts it, on a free port, against one TorchServe."""

    def __init__(self, torchserve: TorchServe, runtime_dir: Path, log: Path, extra_args: tuple[str, ...] = ()):
        self.torchserve = torchserve
        self.runtime_dir = runtime_dir
        self.log = log
        self.extra_args = extra_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "PageServer":
        command = [sys.executable, "-m", "web.server", "--port", str(self.port),
                   "--inference", self.torchserve.inference_url, "--management", self.torchserve.management_url,
                   "--key-file", str(self.torchserve.key_file), "--model-store", str(self.torchserve.model_store),
                   "--runtime-dir", str(self.runtime_dir), "--backbone", "efficientnet_lite0", *self.extra_args]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT),
                                                 # A cold feature cache: training really extracts features.
                                                 "IMAGEREC_FEATURE_CACHE": str(self.runtime_dir.parent / "features")})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"page server exited: {self.log.read_text()[-2000:]}"
            try:
                if requests.get(self.url + "/api/status", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"page server not answering: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    @property
    def token(self) -> str:
        return (self.runtime_dir / "operator_token").read_text().strip()

    def api(self, method: str, path: str, token: str | None = None, **kwargs) -> requests.Response:
        headers = {"X-Operator-Token": token} if token else {}
        return requests.request(method, self.url + path, headers=headers, timeout=kwargs.pop("timeout", 180), **kwargs)


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory, efficientnet_archive):
    root = tmp_path_factory.mktemp("web-torchserve")
    store = root / "model-store"
    install_archive(efficientnet_archive, store)
    server = TorchServe(model_store=store, workdir=root / "work", models=f"{IMAGENET_MODE}={efficientnet_archive.name}")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page_server(torchserve, tmp_path_factory):
    root = tmp_path_factory.mktemp("web-page")
    server = PageServer(torchserve, root / "runtime", root / "page.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (it installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, page_server):
    """A phone-sized page (375 px wide) in English; console errors fail the test."""
    context = browser.new_context(viewport={"width": 375, "height": 812}, locale="en-US")
    tab = context.new_page()
    errors = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.goto(page_server.url + "/")
    tab.wait_for_selector("body[data-ready=true]", timeout=30_000)
    yield tab
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, tmp_path: Path, name: str, full_page: bool = True) -> Path:
    """A screenshot of the step; ``docs-*`` ones (one screen, not the whole page) are the README's."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def wait_until(page, expression: str, timeout: float = 30.0) -> None:
    """Poll a JavaScript expression (page.wait_for_function evaluates strings, which the page's
    Content-Security-Policy rightly forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout:.0f}s: {expression}"
        time.sleep(0.1)


def results(page) -> list[tuple[str, float]]:
    return [(row.get_attribute("data-label"), float(row.get_attribute("data-probability")))
            for row in page.query_selector_all("#results li[data-label]")]


def unlock(page, token: str) -> None:
    page.fill("#token", token)
    page.press("#token", "Enter")
    page.wait_for_selector("#token-form", state="hidden")


def recognise_in(page, mode: str, photo: Path, tmp_path: Path, step: str) -> list[tuple[str, float]]:
    """Recognise ``photo`` in ``mode`` on the Recognise tab (waiting for the mode to be listed)."""
    page.click("#tab-recognise")
    page.wait_for_selector(f"select[name=mode] option[value={mode}]", state="attached")
    page.select_option("select[name=mode]", mode)
    page.set_input_files("input[type=file][name=photo]", str(photo))
    page.wait_for_selector("#results li[data-label]")
    shot(page, tmp_path, step)
    return results(page)


def default_versions(page_server) -> dict:
    modes = page_server.api("GET", "/api/modes").json()["modes"]
    return {m["name"]: (m["default"], [(v["version"], len(v["workers"])) for v in m["versions"]]) for m in modes}


def test_recognise_coffee_in_the_imagenet_mode(page, samples_dir, tmp_path):
    options = page.eval_on_selector_all("select[name=mode] option", "options => options.map(o => o.value)")
    assert IMAGENET_MODE in options
    page.select_option("select[name=mode]", IMAGENET_MODE)
    page.set_input_files("input[type=file][name=photo]", str(samples_dir / "coffee.png"))
    page.wait_for_selector("#results li[data-label]")
    shot(page, tmp_path, "recognise-coffee")
    shot(page, tmp_path, "docs-recognise", full_page=False)
    top = results(page)
    assert top[0][0] == "espresso" and top[0][1] > 0.5, top
    assert len(top) == 3 and top == sorted(top, key=lambda r: -r[1])
    assert "1.0" in page.inner_text("#answer-meta")
    assert page.is_visible("#preview")
    # Nothing is wider than the phone's screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_the_page_works_by_keyboard(page):
    page.focus("#tab-recognise")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-teach"
    assert page.is_visible("#panel-teach") and not page.is_visible("#panel-recognise")
    page.keyboard.press("ArrowLeft")
    assert page.evaluate("document.activeElement.id") == "tab-recognise"
    # Tab reaches the mode drop-down and the photo input (Enter or Space opens a file chooser).
    reached = []
    for _ in range(8):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.name || document.activeElement.id"))
    assert "mode" in reached and "photo" in reached, reached


def test_the_page_speaks_simplified_chinese(browser, page_server, tmp_path):
    context = browser.new_context(viewport={"width": 375, "height": 812}, locale="zh-CN")
    tab = context.new_page()
    tab.goto(page_server.url + "/")
    tab.wait_for_selector("body[data-ready=true]")
    shot(tab, tmp_path, "chinese")
    assert tab.inner_text("#tab-recognise") == "识别"
    assert tab.evaluate("document.documentElement.lang") == "zh-CN"
    hint = tab.text_content("#backbone-hint-1")  # the accurate choice's cost, the server's figures in Chinese
    assert "倍" in hint and "MB" in hint and "{" not in hint, hint
    context.close()


def test_a_file_that_is_not_an_image_shows_the_error(page, tmp_path):
    fake = tmp_path / "holiday.jpg"
    fake.write_text("these are not the pixels you are looking for\n" * 20)
    page.set_input_files("input[type=file][name=photo]", str(fake))
    page.wait_for_selector("#error:not([hidden])")
    shot(page, tmp_path, "not-an-image")
    assert "not a photo" in page.inner_text("#error")
    assert results(page) == []


def test_the_api_maps_errors_to_plain_words(page_server, samples_dir):
    photo = (samples_dir / "coffee.png").read_bytes()
    unknown = page_server.api("POST", "/api/recognise?mode=no_such_mode", data=photo)
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_mode"
    bad_name = page_server.api("POST", "/api/recognise?mode=../etc", data=photo)
    assert bad_name.status_code == 400
    too_large = page_server.api("POST", f"/api/recognise?mode={IMAGENET_MODE}", data=b"\xff" * (21 * 2**20))
    assert too_large.status_code == 413 and too_large.json()["error"] == "too_large"
    empty = page_server.api("POST", f"/api/recognise?mode={IMAGENET_MODE}", data=b"")
    assert empty.status_code == 400 and empty.json()["error"] == "no_photo"
    answer = page_server.api("PUT", f"/api/recognise?mode={IMAGENET_MODE}", data=photo)
    assert answer.status_code == 200 and answer.json()["top"][0]["label"] == "espresso"
    assert answer.headers["X-Model-Version"] == "1.0"
    # TorchServe's keys never reach the browser.
    keys = json.loads(page_server.torchserve.key_file.read_text())
    everything = "".join(page_server.api("GET", p).text for p in ("/", "/api/status", "/api/modes",
                                                                    "/static/app.js"))
    assert not any(entry["key"] in everything + answer.text for entry in keys.values())


def test_operator_actions_without_the_token_are_refused(page, page_server, tmp_path):
    before = default_versions(page_server)
    for method, path, body in [("POST", f"/api/modes/{IMAGENET_MODE}/scale", {"workers": 2}),
                               ("POST", f"/api/modes/{IMAGENET_MODE}/rollback", {}),
                               ("POST", f"/api/modes/{IMAGENET_MODE}/retire", {"version": "1.0"}),
                               ("POST", f"/api/modes/{IMAGENET_MODE}/default", {"version": "1.0"}),
                               ("GET", "/api/jobs", None)]:
        assert page_server.api(method, path, json=body).status_code == 401, path
        assert page_server.api(method, path, token="not-the-token", json=body).status_code == 403, path
    refused_job = page_server.api("POST", "/api/jobs", files={"name": (None, "sneaky")})
    assert refused_job.status_code == 401
    assert default_versions(page_server) == before
    assert not list((page_server.runtime_dir / "jobs").glob("*/job.json"))

    page.click("#tab-modes")
    page.wait_for_selector("#token-form:not([hidden])")
    page.fill("#token", "not-the-token")
    page.press("#token", "Enter")
    page.wait_for_selector("#token-error:not([hidden])")
    shot(page, tmp_path, "token-refused")
    assert "wrong" in page.inner_text("#token-error")
    assert page.evaluate("sessionStorage.length") == 0
    assert default_versions(page_server) == before


def test_a_zip_escaping_its_folder_is_refused(page_server):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("cats/a.jpg", b"x")
        zf.writestr("../../evil/b.jpg", b"x")
    response = page_server.api("POST", "/api/jobs", token=page_server.token,
                               files={"name": (None, "zipped"), "zip": ("set.zip", buffer.getvalue())})
    assert response.status_code == 400 and response.json()["error"] == "bad_zip", response.text
    assert not (page_server.runtime_dir.parent / "evil").exists()
    assert not list((page_server.runtime_dir / "jobs").glob("*/job.json"))


def _fill_teaching_form(page, datasets_dir: Path, name: str) -> None:
    page.fill("#teach-name", name)
    while len(page.query_selector_all(".class-card")) < len(CLASSES):
        page.click("#add-class")
    for index, class_name in enumerate(CLASSES):
        page.fill(f"#class-name-{index}", class_name)
        folder = datasets_dir / "clothing10" / "train" / class_name
        photos = sorted(folder.iterdir())[:PHOTOS_PER_CLASS]
        page.set_input_files(f"#class-photos-{index}", [str(p) for p in photos])
    wait_until(page, f"document.querySelectorAll('.class-card .thumbs img').length >= {len(CLASSES) * PHOTOS_PER_CLASS}")


def _validation_shoe(datasets_dir: Path) -> Path:
    """A validation photo of shoes: never uploaded for training."""
    return sorted((datasets_dir / "clothing10" / "val" / "shoes").iterdir())[0]


def _train_and_deploy(page, tmp_path: Path, step: str) -> str:
    """Click Train, follow the progress to the end, check the evaluation, deploy. Returns the version."""
    previous = page.inner_text("#job-title") if page.is_visible("#job") else None
    page.click("#train")
    wait_until(page, f"!document.querySelector('#job').hidden && document.querySelector('#job-title').textContent !== {json.dumps(previous)}")
    seen = set()
    deadline = time.monotonic() + TRAIN_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        status = page.get_attribute("#job", "data-status")
        seen.add(page.inner_text("#job-status").split(":")[-1].strip().split(" ")[0])
        if status == "running" and "features" in page.inner_text("#job-status") and f"{step}-progress" not in seen:
            shot(page, tmp_path, f"{step}-progress")
            seen.add(f"{step}-progress")
        if status not in ("queued", "running"):
            break
        time.sleep(0.3)
    assert page.get_attribute("#job", "data-status") == "trained", page.inner_text("#job")
    if step == "v1":  # v2 finds every feature in the cache: too quick to watch
        assert "features" in seen, seen  # the live progress was shown
    page.wait_for_selector("#evaluation:not([hidden])")
    shot(page, tmp_path, f"{step}-evaluation")
    assert "Accuracy" in page.inner_text("#eval-accuracy")
    assert len(page.query_selector_all("#eval-classes tbody tr")) == len(CLASSES)
    assert len(page.query_selector_all("#confusion tr")) == len(CLASSES) + 1
    version = page.inner_text("#job-title").rsplit("v", 1)[1]
    page.click("#deploy")
    page.wait_for_selector("#job[data-status=deployed]", timeout=TRAIN_TIMEOUT_MS)
    assert not page.is_visible("#deploy")  # nothing left to deploy
    shot(page, tmp_path, f"{step}-deployed")
    page.locator("#job").screenshot(path=str(tmp_path / f"docs-teach-{step}.png"))  # the README's job card
    return version


def test_teach_deploy_recognise_and_roll_back(page, page_server, datasets_dir, tmp_path):
    name = "clothes3"
    page.click("#tab-teach")
    unlock(page, page_server.token)
    _fill_teaching_form(page, datasets_dir, name)
    shot(page, tmp_path, "teach-form")
    assert _train_and_deploy(page, tmp_path, "v1") == "1"
    assert default_versions(page_server)[name][0] == "1"

    # Recognise a validation photo (never uploaded for training) with the new mode.
    top = recognise_in(page, name, _validation_shoe(datasets_dir), tmp_path, "recognise-new-mode")
    assert top[0][0] == "shoes", top
    assert {label for label, _ in top} == set(CLASSES)
    assert "version 1 " in page.inner_text("#answer-meta")

    # Changing the mode asks again with the same photo.
    page.select_option("select[name=mode]", IMAGENET_MODE)
    wait_until(page, "document.querySelector('#answer-meta').textContent.includes('1.0')")
    page.wait_for_selector("#results li[data-label]")
    assert results(page)[0][0] not in CLASSES

    # Training the same name again makes its next version; deploying it switches the default.
    page.click("#tab-teach")  # the form still holds the classes and photos: Train again
    assert _train_and_deploy(page, tmp_path, "v2") == "2"
    assert default_versions(page_server)[name][0] == "2"

    page.click("#tab-modes")
    # A locator, not an element handle: the tab re-renders its cards when its list arrives, and a
    # handle taken before that is detached by the time it is clicked.
    card = page.locator(f"article[data-mode={name}]")
    card.wait_for()
    shot(page, tmp_path, "modes-before-rollback")
    assert "(default)" in card.inner_text()
    card.locator("button.rollback").click()
    page.wait_for_selector("#modes-done:not([hidden])")
    shot(page, tmp_path, "modes-rolled-back")
    shot(page, tmp_path, "docs-modes", full_page=False)
    assert default_versions(page_server)[name][0] == "1"
    row = page.wait_for_selector(f"article[data-mode={name}] tr[data-version='1'].default")
    assert "%" in row.inner_text()  # accuracy from the manifest


def _job_files(datasets_dir: Path, name: str, classes=CLASSES) -> list:
    """The Teach form's fields for ``name``: each class with its first PHOTOS_PER_CLASS training photos."""
    files = [("name", (None, name))]
    for index, class_name in enumerate(classes):
        files.append((f"class-{index}", (None, class_name)))
        for photo in sorted((datasets_dir / "clothing10" / "train" / class_name).iterdir())[:PHOTOS_PER_CLASS]:
            files.append((f"photos-{index}", (photo.name, photo.read_bytes())))
    return files


def _teach_by_api(page_server, datasets_dir: Path, name: str) -> dict:
    """Train a version of ``name`` and deploy it through the page's API (what the Teach tab does), so
    a test sets up its own modes instead of relying on what an earlier test left. Returns the job."""
    token = page_server.token
    created = page_server.api("POST", "/api/jobs", token=token, files=_job_files(datasets_dir, name))
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + TRAIN_TIMEOUT_MS / 1000
    while (job := page_server.api("GET", f"/api/jobs/{job_id}", token=token).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert job["status"] == "trained", job
    deployed = page_server.api("POST", f"/api/jobs/{job_id}/deploy", token=token, timeout=TRAIN_TIMEOUT_MS / 1000)
    assert deployed.status_code == 200 and deployed.json()["status"] == "deployed", deployed.text
    return deployed.json()


def test_make_default_and_retire_from_the_modes_tab(page, page_server, datasets_dir, tmp_path):
    name = "clothes4"
    assert _teach_by_api(page_server, datasets_dir, name)["version"] == "1"
    assert _teach_by_api(page_server, datasets_dir, name)["version"] == "2"
    rolled_back = page_server.api("POST", f"/api/modes/{name}/rollback", token=page_server.token, json={})
    assert rolled_back.status_code == 200, rolled_back.text
    assert default_versions(page_server)[name][0] == "1"  # v1 default, v2 registered
    page.click("#tab-modes")
    unlock(page, page_server.token)
    page.click(f"article[data-mode={name}] tr.actions-row[data-version='2'] button.make-default")
    page.wait_for_selector(f"article[data-mode={name}] tr[data-version='2'].default")
    page.wait_for_selector("#modes-done:not([hidden])")
    assert default_versions(page_server)[name][0] == "2"

    page.once("dialog", lambda dialog: dialog.accept())  # "Retire clothes3 version 1?"
    page.click(f"article[data-mode={name}] tr.actions-row[data-version='1'] button.retire")
    page.wait_for_selector(f"article[data-mode={name}] tr[data-version='1']", state="detached", timeout=120_000)
    shot(page, tmp_path, "modes-retired")
    default, versions = default_versions(page_server)[name]
    assert default == "2" and [v for v, _ in versions] == ["2"]
    # The default itself cannot be retired: the page offers no button, the API refuses.
    assert not page.query_selector(f"article[data-mode={name}] tr.actions-row[data-version='2'] button.retire")
    refused = page_server.api("POST", f"/api/modes/{name}/retire", token=page_server.token, json={"version": "2"})
    assert refused.status_code == 409 and refused.json()["error"] == "refused"


def test_jobs_survive_a_restart_and_a_cut_off_job_is_interrupted(page_server, datasets_dir, browser, tmp_path):
    token = page_server.token
    deployed = [_teach_by_api(page_server, datasets_dir, "survivor")]

    created = page_server.api("POST", "/api/jobs", token=token, files=_job_files(datasets_dir, "cutoff", CLASSES[:2]))
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    deadline = time.monotonic() + 60
    while page_server.api("GET", f"/api/jobs/{job_id}", token=token).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    page_server.stop(signal.SIGKILL)  # no chance to clean up: as a crash or a power cut
    page_server.start()
    after = {j["id"]: j for j in page_server.api("GET", "/api/jobs", token=token).json()["jobs"]}
    assert after[job_id]["status"] == "interrupted", after[job_id]
    assert "cutoff" not in default_versions(page_server)
    for job in deployed:
        assert after[job["id"]]["status"] == "deployed"

    context = browser.new_context(viewport={"width": 375, "height": 812}, locale="en-US")
    tab = context.new_page()
    tab.goto(page_server.url + "/")
    tab.wait_for_selector("body[data-ready=true]")
    tab.click("#tab-teach")
    unlock(tab, token)
    tab.wait_for_selector(f"button.job-link[data-job='{job_id}']")
    shot(tab, tmp_path, "jobs-after-restart")
    assert "Interrupted" in tab.inner_text(f"button.job-link[data-job='{job_id}']")
    context.close()


def test_teach_a_mode_on_the_accurate_backbone(page, page_server, datasets_dir, tmp_path):
    """The Teach form offers the served backbone (the default) and the accurate one; a mode trained
    on the accurate one records it in its job and its archive, and answers once deployed."""
    name = "clothes_accurate"
    page.click("#tab-teach")
    unlock(page, page_server.token)
    page.wait_for_selector("#teach-backbone:not([hidden])")
    choices = page.locator("#teach-backbone input[name=backbone]")
    assert [choices.nth(i).get_attribute("value") for i in range(choices.count())] == [IMAGENET_MODE,
                                                                                        ACCURATE_BACKBONE]
    assert choices.nth(0).is_checked()  # the served backbone is the default
    accurate = page.locator(f"#teach-backbone input[value={ACCURATE_BACKBONE}]")
    hint = page.inner_text("#" + accurate.get_attribute("aria-describedby"))
    # The hint quotes the figures the server states, with no placeholder left over.
    cost = next(c["cost"] for c in page_server.api("GET", "/api/status").json()["training_backbones"]
                if c["name"] == ACCURATE_BACKBONE)
    assert "slower answers" in hint and "{" not in hint, hint
    assert f"{cost['cpu_ratio']}× the CPU of {cost['baseline']}" in hint and f"{cost['extra_worker_mb']} MB" in hint, hint
    accurate.check()
    _fill_teaching_form(page, datasets_dir, name)
    shot(page, tmp_path, "teach-form-accurate")
    page.locator("#teach-backbone").screenshot(path=str(tmp_path / "docs-teach-backbone.png"))  # the README's choice
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    assert _train_and_deploy(page, tmp_path, "accurate") == "1"
    assert ACCURATE_BACKBONE in page.inner_text("#job-backbone")

    job = next(j for j in page_server.api("GET", "/api/jobs", token=page_server.token).json()["jobs"]
               if j["name"] == name)
    assert job["backbone"] == ACCURATE_BACKBONE
    assert ACCURATE_BACKBONE in page.inner_text(f"button.job-link[data-job='{job['id']}']")
    archive = page_server.runtime_dir / "jobs" / job["id"] / "out" / job["archive_file"]
    assert read_archive_info(archive)["backbone"] == ACCURATE_BACKBONE
    served = page_server.api("GET", "/api/modes").json()["modes"]
    assert [v["backbone"] for m in served if m["name"] == name for v in m["versions"]] == [ACCURATE_BACKBONE]

    top = recognise_in(page, name, _validation_shoe(datasets_dir), tmp_path, "recognise-accurate-mode")
    assert top[0][0] == "shoes", top
    page.click("#tab-modes")  # the Modes tab names each version's backbone, within a phone's width
    row = page.wait_for_selector(f"article[data-mode={name}] tr[data-version='1']")
    assert row.query_selector(".backbone").inner_text() == ACCURATE_BACKBONE
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_a_backbone_the_page_does_not_offer_is_refused(page_server, datasets_dir):
    status = page_server.api("GET", "/api/status").json()
    fast, accurate = status["training_backbones"]
    assert fast == {"name": IMAGENET_MODE, "role": "fast"}  # no cost: the page claims nothing for it
    assert (accurate["name"], accurate["role"], accurate["cost"]["baseline"]) == (ACCURATE_BACKBONE, "accurate",
                                                                                  IMAGENET_MODE)
    assert accurate["cost"]["cpu_ratio"] > 1 and accurate["cost"]["extra_worker_mb"] > 0, accurate
    jobs = page_server.runtime_dir / "jobs"
    before = sorted(jobs.iterdir())
    # Registered but not offered, and not registered at all; before the photos (the page's order)
    # and after them (the photos were already on disk when the field arrived).
    for backbone, first in (("efficientnet_lite2", True), ("no_such_backbone", False)):
        field = [("backbone", (None, backbone))]
        photos = _job_files(datasets_dir, "refused")
        response = page_server.api("POST", "/api/jobs", token=page_server.token,
                                   files=field + photos if first else photos + field)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error"] == "bad_backbone", body
        assert all(name in body["message"] for name in (backbone, IMAGENET_MODE, ACCURATE_BACKBONE)), body
    assert sorted(jobs.iterdir()) == before  # nothing of the refused uploads is left behind


def test_with_one_training_backbone_the_form_offers_no_choice(torchserve, browser, tmp_path):
    server = PageServer(torchserve, tmp_path / "runtime", tmp_path / "page.log",
                        extra_args=("--training-backbones", IMAGENET_MODE)).start()
    try:
        status = server.api("GET", "/api/status").json()
        assert status["training_backbones"] == [{"name": IMAGENET_MODE, "role": "fast"}]
        context = browser.new_context(viewport={"width": 375, "height": 812}, locale="en-US")
        tab = context.new_page()
        tab.goto(server.url + "/")
        tab.wait_for_selector("body[data-ready=true]")
        tab.click("#tab-teach")
        unlock(tab, server.token)
        assert tab.locator("#teach-backbone").is_hidden()
        context.close()
    finally:
        server.stop()


@pytest.mark.parametrize("flag, value", [("--training-backbones", f"{IMAGENET_MODE},nope"), ("--backbone", "nope")])
def test_an_unknown_backbone_is_a_usage_error(flag, value):
    result = subprocess.run([sys.executable, "-m", "web.server", flag, value],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert flag in result.stderr and "'nope'" in result.stderr
    assert ACCURATE_BACKBONE in result.stderr  # the message lists the registered ones
