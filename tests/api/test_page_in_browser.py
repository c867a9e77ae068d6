"""The page at ``/`` in a real headless Chromium, driven by Playwright, against a real server.

One uvicorn server (on a free loopback port, in a thread) and one browser serve the whole
module; each test gets a fresh browser context. The server has the trained shapes classifier
(real weights, so no warning) and a random-weight ViT, and requires an API key: each context
starts with the key in the tab's sessionStorage, as if given earlier, except where a test
gives it through the page.

Chromium is Debian's (``apt-get install chromium``; Playwright's own browser download is not
used). Without it, or without the ``playwright`` package, the module is skipped, unless
``GRADCAM_TEST_REQUIRE_BROWSER=1`` (as ``.ci/run`` sets) makes that a failure.
``GRADCAM_TEST_CHROMIUM`` names another Chromium executable. Screenshots are saved under
``GRADCAM_TEST_ARTIFACTS`` (default: a pytest temporary folder, printed); with
``GRADCAM_UPDATE_SCREENSHOT=1`` the upload test also writes the README's ``docs/page.png``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.app import create_app
from service.engine.models.loaded import LoadedModel
from service.engine.models.spec import ModelSpec

CHROMIUM = Path(os.environ.get("GRADCAM_TEST_CHROMIUM", "/usr/bin/chromium"))
REQUIRED = os.environ.get("GRADCAM_TEST_REQUIRE_BROWSER") == "1"
README_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "page.png"


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (GRADCAM_TEST_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, sync_playwright
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
except ImportError:
    _unavailable("the playwright package is not installed: pip install -e '.[test]'")
if not CHROMIUM.is_file():
    _unavailable(f"no Chromium at {CHROMIUM}: apt-get install chromium (or GRADCAM_TEST_CHROMIUM)")

KEY = "browser-test-key-0123456789"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}


# ----------------------------------------------------------------------------- servers


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class _FrontendPage(BaseHTTPRequestHandler):
    """Any GET: an empty page, standing for a frontend on another origin."""

    def do_GET(self) -> None:
        body = b"<!doctype html><title>frontend</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class PostRecorder:
    """ASGI wrapper keeping the path and body of every POST the server receives (Playwright
    cannot show the body of a multipart request that carries a file)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.posts: list[tuple[str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self.posts.append((scope["path"], b"".join(chunks)))
            return message

        await self.app(scope, recording, send)


@dataclass(frozen=True)
class Servers:
    base: str  # the service, serving the page
    allowed: str  # a frontend origin in GRADCAM_CORS_ORIGINS
    other: str  # a frontend origin that is not
    recorder: PostRecorder

    def last_post(self) -> tuple[str, dict[str, list[str]]]:
        """Path and text fields of the last POST the service received."""
        path, body = self.recorder.posts[-1]
        return path, _form(body)


@pytest.fixture(scope="module")
def servers(
    shapes_model: LoadedModel,
    vit_spec: ModelSpec,
    settings_factory: Callable[..., Any],
    until_served: Callable[[str], None],
) -> Iterator[Servers]:
    frontends = [ThreadingHTTPServer(("127.0.0.1", 0), _FrontendPage) for _ in range(2)]
    allowed, other = (f"http://127.0.0.1:{f.server_address[1]}" for f in frontends)
    sock = _listening_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = settings_factory(
        models=[shapes_model.spec, vit_spec],
        cors_origins=[allowed],
        api_keys=[KEY],
        max_upload_bytes=4 << 20,
    )
    recorder = PostRecorder(create_app(settings))
    server = uvicorn.Server(uvicorn.Config(recorder, log_config=None))
    threads = [threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)]
    threads += [threading.Thread(target=f.serve_forever, daemon=True) for f in frontends]
    for thread in threads:
        thread.start()
    try:
        until_served(base)
        yield Servers(base, allowed, other, recorder)
    finally:
        server.should_exit = True
        for frontend in frontends:
            frontend.shutdown()
            frontend.server_close()
        for thread in threads:
            thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("GRADCAM_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("page-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- the page


@dataclass
class Session:
    """A page on the service, with what it logged and every request it made."""

    page: Page
    base: str
    artifacts: Path
    console_errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def load(self) -> None:
        """Open the page and wait until it has its models (or say what its console said)."""
        self.page.goto(self.base + "/")
        try:
            self.page.wait_for_selector("body[data-state=ready]", timeout=10_000)
        except PlaywrightTimeoutError:
            raise AssertionError(f"the page never got ready: {self.console_errors}") from None

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def upload(
        self,
        data: bytes,
        name: str = "shape.png",
        mime: str = "image/png",
        *,
        explained: bool = True,
    ) -> None:
        """Choose the file; unless told otherwise, wait until its explanation is drawn."""
        count = int(self.page.get_attribute("[data-testid=overlay]", "data-explained") or 0)
        self.page.set_input_files(
            "[data-testid=upload]", files=[{"name": name, "mimeType": mime, "buffer": data}]
        )
        if explained:
            self.wait_explained(count + 1)

    def wait_explained(self, count: int) -> None:
        self.page.wait_for_selector(f'[data-testid=overlay][data-explained="{count}"]')

    def api_calls(self) -> list[Request]:
        return [r for r in self.requests if r.url.startswith(f"{self.base}/v1/")]

    def canvas(self, testid: str = "overlay") -> np.ndarray:
        """The canvas's pixels, read back losslessly as PNG (RGB)."""
        url = self.page.eval_on_selector(
            f"[data-testid={testid}], #{testid}", "c => c.toDataURL('image/png')"
        )
        png = base64.b64decode(url.split(",", 1)[1])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _open(
    browser: Browser,
    servers: Servers,
    artifacts: Path,
    viewport: dict[str, int],
    *,
    with_key: bool = True,
) -> Any:
    context = browser.new_context(viewport=viewport, accept_downloads=True)  # type: ignore[arg-type]
    if with_key:
        context.add_init_script(f"sessionStorage.setItem('gradcam.apiKey', {json.dumps(KEY)})")
    page = context.new_page()
    page.set_default_timeout(30_000)
    session = Session(page, servers.base, artifacts)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            session.console_errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: session.console_errors.append(f"pageerror: {error}"))
    page.on("request", lambda request: session.requests.append(request))
    return context, session


@pytest.fixture
def session(browser: Browser, servers: Servers, artifacts: Path) -> Iterator[Session]:
    context, opened = _open(browser, servers, artifacts, DESKTOP)
    opened.load()
    yield opened
    context.close()


def _shape(make_shapes: Callable[[int, torch.Generator], Any], label: int, size: int) -> bytes:
    """A synthetic shape the shapes classifier knows (0 square, 1 cross, 2 disk) as a PNG,
    scaled up from 64x64 so that it looks like a picture on the page."""
    generator = torch.Generator().manual_seed(11)
    for _ in range(50):
        shapes = make_shapes(1, generator)
        if int(shapes.labels[0]) == label:
            break
    pixels = (shapes.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def square(make_shapes_fn: Callable[[int, torch.Generator], Any]) -> bytes:
    return _shape(make_shapes_fn, 0, 256)


def _form(body: bytes) -> dict[str, list[str]]:
    """The text fields of a multipart body the page sent."""
    fields: dict[str, list[str]] = {}
    for name, value in re.findall(rb'name="([^"]+)"\r\n\r\n(.*?)\r\n--', body, flags=re.S):
        fields.setdefault(name.decode(), []).append(value.decode(errors="replace"))
    return fields


# ----------------------------------------------------------------------------- tests


def test_uploading_an_image_shows_its_overlay_and_predictions(
    session: Session, square: bytes
) -> None:
    session.upload(square)
    page = session.page
    page.select_option("[data-testid=layer]", "layer2")
    session.wait_explained(2)

    overlay = session.canvas()
    original = session.canvas("original")
    assert overlay.shape == original.shape == (256, 256, 3)
    assert overlay.std() > 20, "the overlay is blank"
    assert np.abs(overlay - original).mean() > 10, "the overlay is the bare image"
    predictions = page.locator("[data-testid=predictions] li")
    assert predictions.count() == 3
    assert re.fullmatch(r"square\s*\d+\.\d %", predictions.first.inner_text())
    assert (
        page.locator("[data-testid=predictions] [aria-pressed=true]")
        .inner_text()
        .startswith("square")
    )
    assert page.locator("[data-testid=warnings]").is_hidden()  # trained weights: no warning
    assert page.locator("[data-testid=timings] tr").count() == 6
    session.screenshot("upload-1280x800")
    if os.environ.get("GRADCAM_UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(README_SCREENSHOT))


def test_moving_alpha_redraws_the_overlay_without_a_request(
    session: Session, square: bytes
) -> None:
    session.upload(square)
    page = session.page
    calls = len(session.api_calls())
    renders = int(page.get_attribute("[data-testid=overlay]", "data-renders") or 0)
    before = session.canvas()

    page.focus("[data-testid=alpha]")
    page.keyboard.press("End")  # alpha 1: the heatmap alone
    page.wait_for_selector(f'[data-testid=overlay][data-renders="{renders + 1}"]')
    opaque = session.canvas()
    page.select_option("[data-testid=colormap]", "gray")
    page.wait_for_selector(f'[data-testid=overlay][data-renders="{renders + 2}"]')
    gray = session.canvas()
    page.fill("[data-testid=threshold]", "0.5")
    page.wait_for_selector(f'[data-testid=overlay][data-renders="{renders + 3}"]')
    floored = session.canvas()

    assert np.abs(opaque - before).mean() > 5
    assert (gray[..., 0] == gray[..., 1]).all(), "the gray map is not gray"
    assert np.abs(floored - gray).mean() > 5
    assert len(session.api_calls()) == calls, "a display change called the service"
    session.screenshot("alpha-1-gray-threshold")


@pytest.mark.parametrize(
    ("colormap", "alpha", "threshold"), [("jet", 0.5, None), ("viridis", 0.75, 0.25)]
)
def test_the_redrawn_overlay_is_the_one_the_server_draws(
    session: Session,
    servers: Servers,
    make_image: Callable[..., bytes],
    colormap: str,
    alpha: float,
    threshold: float | None,
) -> None:
    """A 200x120 photo-like upload under the shapes model's centre crop: colour table,
    resizing onto the image and blending all match the server's own overlay."""
    image = make_image(200, 120, seed=5)
    session.upload(image, "wide.png")
    page = session.page
    page.select_option("[data-testid=colormap]", colormap)
    page.fill("[data-testid=alpha]", str(alpha))
    page.fill("[data-testid=threshold]", str(threshold or 0))
    drawn = session.canvas()

    target = page.get_attribute("[data-testid=predictions] [aria-pressed=true]", "data-index")
    fields = {"layer": "layer4", "target": target, "colormap": colormap, "alpha": str(alpha)}
    if threshold is not None:
        fields["threshold"] = str(threshold)
    answer = httpx.post(
        f"{servers.base}/v1/models/shapes/explain",
        files={"image": ("wide.png", image, "image/png")},
        data=fields,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    overlay = answer.json()["results"][0]["explanations"][0]["overlay"]
    served = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(overlay["data"]))).convert("RGB"), dtype=np.int16
    )
    assert drawn.shape == served.shape
    difference = np.abs(drawn - served)
    # Identical here; allow a stray rounding step (float64 in the browser, float32 on the server).
    assert difference.max() <= 2, f"{(difference > 2).sum()} values differ by more than 2"
    assert (difference > 0).mean() < 0.001


def test_an_undecodable_upload_shows_the_error_as_a_sentence(session: Session) -> None:
    session.upload(b"these bytes are no picture at all", "broken.png", explained=False)
    error = session.page.locator("[data-testid=error]")
    error.wait_for(state="visible")
    text = error.inner_text()
    assert "The image could not be decoded." in text
    assert "not an image in any recognised format" in text
    assert "{" not in text
    assert "image 0:" not in text
    assert session.page.locator("body[data-state=error]").count() == 1
    session.screenshot("error-undecodable")
    script_errors = [e for e in session.console_errors if "Failed to load resource" not in e]
    assert not script_errors


def test_an_overload_says_when_to_retry_once(session: Session, square: bytes) -> None:
    problem = {
        "type": "urn:gradcam-service:problem:overloaded",
        "title": "Service overloaded",
        "status": 429,
        "detail": "Model 'shapes' is busy: this request would wait about 2.4 s (limit 2 s);"
        " retry after 1 s.",
        "code": "overloaded",
    }

    def refuse(route: Any) -> None:
        route.fulfill(
            status=429,
            headers={"Content-Type": "application/problem+json", "Retry-After": "1"},
            body=json.dumps(problem),
        )

    session.page.route("**/v1/models/shapes/explain", refuse)
    session.upload(square, explained=False)
    error = session.page.locator("[data-testid=error]")
    error.wait_for(state="visible")
    text = error.inner_text()
    assert "would wait about 2.4 s" in text
    assert text.lower().count("retry after") + text.lower().count("try again") == 1, text


def test_a_dicom_upload_is_shown_windowed_and_explained(
    session: Session, dicom_factory: Callable[..., bytes]
) -> None:
    """A 12-bit grey DICOM with a bright square: the page shows it as the service windowed it
    (grey, the square white) and explains it like any image."""
    pixels = np.full((128, 128), 400, dtype=np.uint16)
    pixels[24:56, 72:104] = 3000
    dicom = dicom_factory(pixels, bits_stored=12, WindowCenter=1700, WindowWidth=2600)
    session.upload(dicom, "chest.dcm", "application/dicom")

    original = session.canvas("original")
    assert original.shape == (128, 128, 3)
    assert (original[..., 0] == original[..., 2]).all(), "a grey image shown in colour"
    assert original[40, 88, 0] > 200 > 60 > original[100, 20, 0]
    assert np.abs(session.canvas() - original).mean() > 10
    assert "128×128 DICOM (MONOCHROME2)" in session.page.inner_text("#details")
    session.screenshot("dicom")


def test_another_model_and_layer_can_be_chosen(
    session: Session, servers: Servers, square: bytes
) -> None:
    page = session.page
    session.upload(square)
    page.select_option("[data-testid=model]", "vit")
    session.wait_explained(2)
    layers = page.locator("[data-testid=layer] option").all_inner_texts()
    assert "blocks.1.norm1 · 4×4 (default)" in layers
    page.check("[data-testid=all-layers]")  # blocks.0.norm1 is no stage
    page.select_option("[data-testid=layer]", "blocks.0.norm1")
    session.wait_explained(3)

    path, sent = servers.last_post()
    assert path == "/v1/models/vit/explain"
    assert sent["layer"] == ["blocks.0.norm1"]
    assert "target" not in sent  # the class indices of the first model do not carry over
    assert "blocks.0.norm1" in page.inner_text("#overlay-caption")
    warnings = page.locator("[data-testid=warnings]")
    assert warnings.is_visible()
    assert "RANDOM weights" in warnings.inner_text()
    assert session.canvas().std() > 5
    session.screenshot("second-model-vit")


def test_the_layer_menu_lists_the_stages_first_and_the_rest_under_all_layers(
    session: Session, servers: Servers, square: bytes
) -> None:
    page = session.page
    session.upload(square)
    layers = httpx.get(
        f"{servers.base}/v1/models/shapes/layers",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ).json()
    stages = [layer["name"] for layer in layers["layers"] if layer["stage"]]
    assert stages, "the shapes model has no stage"
    assert 0 < len(stages) < len(layers["layers"])

    menu = "[data-testid=layer]"
    shown = page.eval_on_selector_all(f"{menu} option", "os => os.map(o => o.value)")
    assert set(shown) == {*stages, layers["default_layer"]}
    assert page.locator(f"{menu} optgroup").count() == 0

    page.check("[data-testid=all-layers]")
    groups = page.eval_on_selector_all(
        f"{menu} optgroup",
        "gs => gs.map(g => [g.label, [...g.children].map(o => o.value)])",
    )
    assert [label for label, _ in groups] == ["Stages", "All layers"]
    assert groups[0][1] == shown
    assert sorted(groups[0][1] + groups[1][1]) == sorted(x["name"] for x in layers["layers"])
    assert page.input_value(menu) == layers["default_layer"], "the choice was lost"
    assert f"all layers ({len(layers['layers'])})" in page.inner_text("label[for=all-layers]")
    session.screenshot("layers-grouped")

    # A layer chosen from the full list stays chosen, and listed, when the box is unticked.
    other = groups[1][1][0]
    page.select_option(menu, other)
    session.wait_explained(2)
    page.uncheck("[data-testid=all-layers]")
    assert page.input_value(menu) == other
    listed = page.eval_on_selector_all(f"{menu} option", "os => os.map(o => o.value)")
    assert set(listed) == {*shown, other}


def test_a_wide_upload_shows_its_cropped_away_ends_hatched_and_says_so(
    session: Session, make_image: Callable[..., bytes], square: bytes
) -> None:
    """The shapes model centre-crops a 200x120 upload to its middle 120x120: the 40 columns
    at each end were never seen. At opacity 1 they are grey (hatched), not the map's blue."""
    page = session.page
    session.upload(square)
    assert page.locator("[data-testid=not-seen]").is_hidden(), "a square upload is all seen"
    session.upload(make_image(200, 120, seed=5), "wide.png")
    legend = page.locator("[data-testid=not-seen]")
    assert legend.is_visible()
    assert "not seen by the model" in legend.inner_text()
    page.fill("[data-testid=alpha]", "1")
    drawn = session.canvas()
    for ends in (drawn[:, :38], drawn[:, -38:]):
        assert (ends[..., 0] == ends[..., 1]).all()
        assert (ends[..., 1] == ends[..., 2]).all()
    middle = drawn[:, 42:-42]
    colour = np.abs(middle[..., 0] - middle[..., 1]) + np.abs(middle[..., 1] - middle[..., 2])
    assert colour.mean() > 20, "the seen middle is not coloured"
    session.screenshot("not-seen-ends")


def test_a_failed_explain_of_a_new_image_shows_no_class_of_the_last_one(
    session: Session, square: bytes
) -> None:
    page = session.page
    session.upload(square)
    page.locator("[data-testid=predictions] button").nth(1).click()
    session.wait_explained(2)
    assert "square" not in page.inner_text("#target-hint")
    session.upload(b"not a picture", "broken.png", explained=False)
    page.locator("[data-testid=error]").wait_for(state="visible")
    assert page.inner_text("#target-hint") == "Class: the most probable one."
    for panel in ("#figures", "#display", "#outputs"):
        assert page.locator(panel).is_hidden(), f"{panel} still shows the last image"
    assert page.locator("[data-testid=predictions] li").count() == 0
    session.screenshot("error-after-image")


def test_a_second_explain_before_the_first_answered_cancels_it_without_an_error(
    session: Session, square: bytes
) -> None:
    page = session.page
    session.upload(square)
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(request.failure or ""))
    page.evaluate(
        """() => {
            const button = document.querySelector('[data-testid=explain]');
            button.click();
            button.click();
        }"""
    )
    session.wait_explained(2)
    page.wait_for_timeout(200)  # an answer to the first would be drawn by now
    assert page.get_attribute("[data-testid=overlay]", "data-explained") == "2"
    assert page.locator("[data-testid=error]").is_hidden()
    assert any("ERR_ABORTED" in reason for reason in failed), failed
    assert session.console_errors == []


def test_choosing_a_class_explains_that_class(
    session: Session, servers: Servers, square: bytes
) -> None:
    page = session.page
    session.upload(square)
    second = page.locator("[data-testid=predictions] button").nth(1)
    label = second.locator(".label").inner_text()
    index = second.get_attribute("data-index")
    second.click()
    session.wait_explained(2)
    assert servers.last_post()[1]["target"] == [index]
    pressed = page.locator("[data-testid=predictions] [aria-pressed=true]")
    assert pressed.locator(".label").inner_text() == label
    assert page.inner_text("#overlay-caption").startswith(label)


def test_the_overlay_downloads_as_a_png(session: Session, square: bytes) -> None:
    session.upload(square)
    with session.page.expect_download() as download:
        session.page.click("[data-testid=download]")
    saved = download.value
    assert saved.suggested_filename == "gradcam-square-layer4-gradcam.png"
    path = saved.path()
    picture = Image.open(path)
    assert (picture.format, picture.size) == ("PNG", (256, 256))
    assert np.array_equal(np.asarray(picture.convert("RGB")), session.canvas())


def test_the_keyboard_alone_chooses_an_image_and_a_class(session: Session, square: bytes) -> None:
    page = session.page
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select')]
            .filter(e => e.labels.length === 0).map(e => e.id)"""
    )
    assert unlabelled == []

    def tab_to(selector: str) -> None:
        for _ in range(25):
            page.keyboard.press("Tab")
            if page.evaluate(f"document.activeElement.matches({json.dumps(selector)})"):
                return
        raise AssertionError(f"Tab never reached {selector}")

    # Intercept file choosers from now on: enabling it inside expect_file_chooser can lose the
    # race with the key press under load, and the native dialog opens instead.
    page.on("filechooser", lambda _: None)
    tab_to("[data-testid=upload]")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(
        files=[{"name": "shape.png", "mimeType": "image/png", "buffer": square}]
    )
    session.wait_explained(1)
    tab_to("[data-testid=predictions] li:nth-child(2) button")
    page.keyboard.press("Enter")
    session.wait_explained(2)
    chosen = "[data-testid=predictions] li:nth-child(2) button"
    assert page.get_attribute(chosen, "aria-pressed") == "true"
    assert page.evaluate(f"document.activeElement.matches({json.dumps(chosen)})")
    session.screenshot("keyboard-second-class")


def test_the_page_asks_for_the_api_key_the_service_requires(
    browser: Browser, servers: Servers, artifacts: Path, square: bytes
) -> None:
    """A tab without a key: the service's 401 (WWW-Authenticate: Bearer) shows the key field;
    a wrong key is refused in words; the right one is kept in sessionStorage only and sent as a
    Bearer token."""
    context, opened = _open(browser, servers, artifacts, DESKTOP, with_key=False)
    try:
        page = opened.page
        page.goto(servers.base + "/")
        page.locator("[data-testid=api-key]").wait_for(state="visible")
        error = page.locator("[data-testid=error]")
        assert "This endpoint needs an API key" in error.inner_text()
        assert "Enter it in the API key field" in error.inner_text()
        assert page.evaluate("document.activeElement.id") == "api-key"
        opened.screenshot("api-key-asked")

        page.keyboard.type("not-the-key-0123456789")
        page.keyboard.press("Enter")
        page.wait_for_function(
            "el => el.textContent.includes('not valid')", arg=error.element_handle()
        )
        assert "Enter another one in the API key field" in error.inner_text()
        page.fill("[data-testid=api-key]", KEY)
        page.keyboard.press("Enter")
        page.wait_for_selector("body[data-state=ready]")
        opened.upload(square)

        assert opened.api_calls()[-1].headers["authorization"] == f"Bearer {KEY}"
        storage = page.evaluate("[{...sessionStorage}, {...localStorage}]")
        assert storage == [{"gradcam.apiKey": KEY}, {}]
        assert error.is_hidden()
        assert page.locator("[data-testid=api-key]").is_hidden()  # a line says one is in use
        assert "An API key is in use" in page.inner_text("#key-section")
    finally:
        context.close()


def test_no_console_error_and_no_request_to_another_origin(session: Session, square: bytes) -> None:
    page = session.page
    session.upload(square)
    page.select_option("[data-testid=method]", "gradcam++")
    session.wait_explained(2)
    page.locator("[data-testid=predictions] button").nth(2).click()
    session.wait_explained(3)
    page.fill("[data-testid=alpha]", "0.3")
    page.select_option("[data-testid=colormap]", "inferno")

    urls = [request.url for request in session.requests]
    assert f"{session.base}/ui/app.js" in urls
    assert f"{session.base}/v1/models/shapes/explain" in urls
    assert [url for url in urls if not url.startswith(session.base + "/")] == []
    assert session.console_errors == []


def test_the_page_comes_with_a_strict_content_security_policy(
    browser: Browser, servers: Servers, artifacts: Path
) -> None:
    context, opened = _open(browser, servers, artifacts, DESKTOP)
    try:
        response = opened.page.goto(servers.base + "/")
        assert response is not None
        policy = response.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["default-src"] == "'none'"
        assert directives["script-src"] == "'self'"
        assert directives["connect-src"] == "'self'"
        assert "unsafe" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        opened.page.wait_for_selector("body[data-state=ready]")
        # Enforced: the page cannot reach another host, even if asked to.
        blocked = opened.page.evaluate(
            f"fetch({json.dumps(servers.allowed)}).then(() => 'sent', () => 'blocked')"
        )
        assert blocked == "blocked"
        assert any("Content Security Policy" in e for e in opened.console_errors)
    finally:
        context.close()


def test_the_page_fits_a_phone_screen(
    browser: Browser, servers: Servers, artifacts: Path, square: bytes
) -> None:
    context, opened = _open(browser, servers, artifacts, PHONE)
    try:
        page = opened.page
        opened.load()
        opened.upload(square)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the page is {width} px wide"
        box = page.locator("[data-testid=overlay]").bounding_box()
        assert box is not None
        assert box["width"] >= 0.8 * PHONE["width"]
        opened.screenshot("phone-390")
        assert opened.console_errors == []
    finally:
        context.close()


# ----------------------------------------------------------------------------- CORS


def _fetch_from(browser: Browser, origin: str, url: str) -> Any:
    """From a page on ``origin``: POST bytes that are no image to ``url``, with the API key."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(origin + "/")
        return page.evaluate(
            """async ([url, key]) => {
                try {
                    const response = await fetch(url, {
                        method: "POST",
                        headers: {
                            "Authorization": `Bearer ${key}`,
                            "Content-Type": "application/json",
                        },
                        body: JSON.stringify({images: [{data: "bm90IGFuIGltYWdl"}]}),
                    });
                    return {status: response.status, body: await response.json()};
                } catch (error) {
                    return {failed: String(error)};
                }
            }""",
            [url, KEY],
        )
    finally:
        context.close()


def test_a_page_on_an_allowed_origin_calls_the_api(browser: Browser, servers: Servers) -> None:
    """The Authorization header makes the browser send a preflight first; both pass, and the
    problem of the answer is readable by the other origin's script."""
    answer = _fetch_from(browser, servers.allowed, f"{servers.base}/v1/models/shapes/explain")
    assert answer.get("status") == 400, answer
    assert answer["body"]["code"] == "invalid_image"


def test_a_page_on_another_origin_is_refused(browser: Browser, servers: Servers) -> None:
    answer = _fetch_from(browser, servers.other, f"{servers.base}/v1/models/shapes/explain")
    assert "failed" in answer, answer


@pytest.mark.parametrize(
    ("path", "operation"),
    [("/docs", ".opblock-summary-path"), ("/redoc", "[data-section-id^='operation']")],
)
def test_the_api_documentation_works_with_the_network_blocked(
    browser: Browser, servers: Servers, artifacts: Path, path: str, operation: str
) -> None:
    context = browser.new_context(viewport=DESKTOP)  # type: ignore[arg-type]
    elsewhere: list[str] = []

    def only_this_service(route: Any) -> None:
        if route.request.url.startswith(servers.base + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_service)
    errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(servers.base + path)
        page.wait_for_selector(operation, timeout=30_000)
        listed = page.locator(operation).all_inner_texts()
        shot = artifacts / f"api-docs-{path.strip('/')}.png"
        page.screenshot(path=str(shot))
        print(f"screenshot: {shot}")
    finally:
        context.close()
    assert elsewhere == []
    assert errors == []
    assert len(listed) >= 5, listed
    assert any("explain" in text.lower() for text in listed), listed
