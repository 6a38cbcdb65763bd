"""The web chat page in a real headless Chromium (Debian's, driven by Playwright): type, see tokens stream in."""

from __future__ import annotations

import os

import pytest
from playwright import sync_api

from test_serve import start_server, stop_server

CHROMIUM = os.environ.get("CHATFORGE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]



@pytest.fixture(scope="module")
def page_url(base_model_dir):
    # a failure, not a skip: the README's test command installs Debian's chromium, and a silently
    # skipped browser test would hide a broken page
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no browser at {CHROMIUM}: apt-get install chromium (or set CHATFORGE_CHROMIUM)")
    proc, addr = start_server(base_model_dir)
    yield f"http://{addr}/"
    stop_server(proc)


def test_chat_page_streams_and_stops(page_url, tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=1)  # a phone
        errors, posts = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: r.method == "POST" and posts.append(r.headers.get("content-type", "")))
        page.goto(page_url)
        page.click("summary")
        page.fill("#system", "You are a helpful assistant.")
        # greedy, so that the answers are the same every run (sampling through the page: test_web_races)
        page.fill("#temperature", "0")
        page.fill("#maxtokens", "24")  # two turns fit the test model's 128-token window

        # SSE chunks counted as they arrive show the answer really streams
        page.evaluate("""() => { window.deltas = 0; const orig = TextDecoder.prototype.decode;
            TextDecoder.prototype.decode = function (...a) { window.deltas++; return orig.apply(this, a); }; }""")
        for turn, text in enumerate(["Hello! Who are you?", "Tell me more."], start=1):
            page.fill("#input", text)
            page.press("#input", "Enter")
            page.wait_for_function("n => document.querySelectorAll('.msg.user').length === n", arg=turn)
            page.wait_for_function(  # an answer appears (or an error does: fail fast below)
                "n => { const a = document.querySelectorAll('.msg.assistant'); "
                "return document.querySelector('.msg.error') || a.length === n && a[n - 1].textContent.trim() "
                "&& !document.getElementById('send').hidden; }", arg=turn, timeout=30_000)
            assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").all_inner_texts()
        assert page.evaluate("window.deltas") > 2
        assert page.locator(".msg.error").count() == 0
        answers = page.locator(".msg.assistant").all_inner_texts()
        assert len(answers) == 2 and all(answers)
        # nothing wider than the phone screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        shot = tmp_path / "chat.png"  # CHATFORGE_SCREENSHOT=path keeps a copy
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 5_000
        if os.environ.get("CHATFORGE_SCREENSHOT"):
            page.screenshot(path=os.environ["CHATFORGE_SCREENSHOT"], full_page=True)

        # a new chat clears the conversation; the stop button aborts a running answer
        page.click("#new")
        assert page.locator(".msg").count() == 0
        page.fill("#input", "Write a very long story.")
        page.press("#input", "Enter")
        try:
            page.click("#stop", timeout=3_000)
        except sync_api.TimeoutError:
            pass  # this tiny model answered before the click
        page.wait_for_selector("#send", state="visible", timeout=10_000)
        assert page.locator(".msg.error").count() == 0
        # the server takes only JSON POSTs; no script error on the way
        assert posts and all(c.split(";")[0].strip() == "application/json" for c in posts), posts
        assert not errors, errors
        browser.close()
