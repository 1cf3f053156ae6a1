"""The page in a real browser (Debian's Chromium, headless, through Selenium and chromedriver) against
`mtpd serve` on the default model with an API key: the page asks for the key, streams an answer,
colours every token by its origin, and its counts are the response's, `/health`'s and the request
log's. MTPD_PAGE_SHOT=FILE keeps the screenshot there (docs/page.png is made so)."""

import os
import shutil
import urllib.error
import urllib.request

import pytest
from conftest import Daemon

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(shutil.which("chromedriver") is None, reason="chromedriver is not installed")]

KEY = "browser-key"
PROMPT = "Write a Python function that checks whether a string is a palindrome, with a docstring and tests."
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def keyed():
    daemon = Daemon(env={"MTPD_API_KEY": KEY, "MTPD_PROMPT_CACHE_DISK_BYTES": "0"})
    yield daemon
    assert daemon.stop() == 0, daemon.log()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def status_without_key(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/mtpd/status", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_page_streams_an_answer_coloured_by_origin(keyed, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    assert status_without_key(keyed.url) == 401
    wait = WebDriverWait(browser, 180)
    browser.get(keyed.url + "/")
    wait.until(ready.visibility_of_element_located((By.ID, "key-form")))
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait.until(ready.visibility_of_element_located((By.ID, "main")))
    wait.until(lambda d: d.find_element(By.ID, "model").text == "SmolLM2-135M-Instruct")

    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(MAX_TOKENS))
    Select(browser.find_element(By.ID, "speculation")).select_by_value("adaptive")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "true")
    assert browser.find_element(By.ID, "chat-error").text == ""

    spans = browser.execute_script(
        "return [...document.querySelectorAll('#answer .tok')].map(s => [s.dataset.origin, s.textContent])")
    rounds = browser.execute_script(
        "return [...document.querySelectorAll('#rounds .round')].map(r => [+r.dataset.drafted, +r.dataset.accepted])")
    shown = {name: int(browser.find_element(By.ID, f"sum-{name}").text)
             for name in ("tokens", "drafted", "accepted", "draft-tokens", "lookup-tokens")}

    line = [r for r in keyed.log_records() if r.get("event") == "request" and r.get("endpoint") == "chat"][-1]
    with urllib.request.urlopen(keyed.url + "/health") as r:
        import json

        last = json.loads(r.read())["last_request_speculation"]
    assert line["finish_reason"] == "length"  # no draft was cut by an end of answer: spans and counts agree
    assert len(spans) == shown["tokens"] == line["completion_tokens"] == last["completion_tokens"] == MAX_TOKENS
    assert shown["drafted"] == sum(d for d, _ in rounds) == line["drafted"] == last["drafted"]
    assert shown["accepted"] == sum(a for _, a in rounds) == line["accepted"] == last["accepted"] > 0
    origins = [o for o, _ in spans]
    assert origins.count("draft") == shown["draft-tokens"] == line["accepted"] - line["lookup_accepted"]
    assert origins.count("lookup") == shown["lookup-tokens"] == line["lookup_accepted"]
    assert origins.count("target") == len(rounds)  # each step ends with the target's own token

    plain = keyed.client(api_key=KEY).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS,
        temperature=0, extra_body={"speculation": "off"})
    assert "".join(t for _, t in spans) == plain.choices[0].message.content  # greedy: the same answer

    shot = tmp_path / "page.png"
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("MTPD_PAGE_SHOT"):
        shutil.copyfile(shot, os.environ["MTPD_PAGE_SHOT"])
