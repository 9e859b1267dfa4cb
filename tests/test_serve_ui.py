"""The web UI in a real browser: Debian's Chromium driven by playwright against a live `adamba serve` app on
127.0.0.1. Every request the page makes is checked to stay on the machine."""

from __future__ import annotations

import json
import re
import shutil
from urllib.parse import urlparse

import pytest
from playwright.sync_api import sync_playwright
from test_serve import Running, model, tokenizer  # noqa: F401  (fixtures)

from adamba.serve.api import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def page(model, tokenizer):  # noqa: F811
    if CHROMIUM is None:
        raise RuntimeError("the UI test needs Chromium: apt-get install chromium (.ci/run does)")
    with Running(create_app(model, tokenizer, "tiny", tools=False)) as running, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1000, "height": 800})
        page = context.new_page()
        page.requests = []  # every URL the page asks for, and the chat requests' bodies
        page.bodies = []

        def route(request_route):
            url = request_route.request.url
            page.requests.append(url)
            if urlparse(url).hostname != "127.0.0.1":
                return request_route.abort()
            if url.endswith("/v1/chat/completions"):
                page.bodies.append(json.loads(request_route.request.post_data))
            return request_route.continue_()

        page.route("**/*", route)
        page.goto(running.url + "/")
        page.get_by_text("tiny · context 256").wait_for()
        page.click("summary")  # the settings: short replies keep the test quick
        page.fill("#max-tokens", "24")
        yield page
        browser.close()


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")
    wait_for_reply(page)


def wait_for_reply(page) -> None:
    """Until the newest message is a finished reply (its cost is shown)."""
    page.wait_for_function("() => { const all = document.querySelectorAll('.message');"
                           " const last = all[all.length - 1];"
                           " return last && last.matches('.assistant') && last.querySelector('[data-testid=flops]')"
                           " && !document.getElementById('send').disabled; }", timeout=60_000)


def test_chat_in_a_browser_streams_replies_shows_flops_and_compute_per_token(page, tmp_path):
    send(page, "the king and the queen")
    assert page.locator(".message.user").count() == 1 and page.locator(".message.assistant").count() == 1
    cost_full = page.locator("[data-testid=flops]").last.inner_text()
    assert "tokens" in cost_full and "FLOPs" in cost_full
    assert "attention at 100% of full width" in page.locator(".legend").last.inner_text()
    assert page.locator("[data-testid=token-view] span").count() >= 1

    page.select_option("#mode", "ghost")
    send(page, "a sword")
    assert "attention at 25% of full width" in page.locator(".legend").last.inner_text()
    assert page.bodies[-1]["compute"] == {"mode": "ghost"} and page.bodies[-1]["stream"] is True
    assert page.bodies[-1]["max_tokens"] == 24
    assert [m["role"] for m in page.bodies[-1]["messages"]] == ["user", "assistant", "user"]

    page.locator(".message.assistant button", has_text="regenerate").last.click()  # the last reply, again
    wait_for_reply(page)
    assert page.locator(".message.assistant").count() == 2 and page.locator("[data-testid=flops]").count() == 2
    assert [m["role"] for m in page.bodies[-1]["messages"]] == ["user", "assistant", "user"]

    page.fill("#system", "Be brief.")
    page.locator(".message.user button", has_text="edit").first.click()  # back to the first message
    assert page.input_value("#input") == "the king and the queen" and page.locator(".message").count() == 0
    send(page, "the night")
    assert page.bodies[-1]["messages"] == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "the night"}]
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
    assert (tmp_path / "chat.png").stat().st_size > 10_000

    page.click("#clear")
    assert page.locator(".message").count() == 0
    page.select_option("#mode", "")
    page.select_option("#draft", "exit:1")  # the server offers ghost and exit:1 for this 2-layer model
    send(page, "a sword")
    assert page.bodies[-1]["compute"] == {"mode": "", "speculative": "exit:1"}
    assert re.search(r"draft exit:1: \d+ of \d+ accepted", page.locator("[data-testid=flops]").last.inner_text())
    assert all(urlparse(url).hostname == "127.0.0.1" for url in page.requests), page.requests


def test_markdown_is_rendered_and_sanitised_and_the_page_fits_a_phone(page, tmp_path):
    html = page.evaluate("markdown('**bold** <img src=x onerror=alert(1)> <script>alert(2)</script> `code`')")
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "onerror" not in html and "<script" not in html
    page.set_viewport_size({"width": 390, "height": 800})
    send(page, "the king")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(tmp_path / "phone.png"))
