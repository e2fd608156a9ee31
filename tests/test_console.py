"""The console page in a real headless browser: Debian's ``chromium`` driven through its ``chromium-driver`` by
Selenium, against live servers on 127.0.0.1 (the bundled experts, and replay experts behind API keys).

``PROMISED`` lists the elements the page promises; the first test fails when one is missing, and another test
removes one to show that the check can fail. With ``CONCILIUM_CONSOLE_SCREENSHOT=path`` the answer test also
saves its screenshot there (``docs/console.png`` is made that way).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from orchestrator.api.security import digest
from tests.conftest import BENCH_DATA
from tests.live import ThreadServer, headless_chrome

PROMISED = [
    "ask-form", "query", "router", "k", "aggregation", "max-tokens", "experts", "ask-button", "plan", "answer",
    "answer-status", "routing", "scores", "skills", "aggregator", "expert-answers", "degraded", "trace",
    "fleet-table", "store-state", "figures", "latency-chart", "ready", "key-form", "api-key", "reload",
]
WAIT_S = 180


def missing(driver: webdriver.Chrome) -> list[str]:
    return [i for i in PROMISED if not driver.find_elements(By.ID, i)]


@pytest.fixture(scope="module")
def browser():
    chrome = headless_chrome()
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def server(ray_cluster, store):
    s = ThreadServer({"ray": {"namespace": f"console-{uuid.uuid4().hex[:6]}"},
                      "routing": {"aggregation": "vote"}, "server": {"max_tokens": 64}})
    yield s
    s.stop()


def text(driver: webdriver.Chrome, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def fleet(driver: webdriver.Chrome) -> list[str]:
    """The expert names in the fleet table, read in one script call.

    The page redraws the table on every refresh, so rows found by one WebDriver call can be gone by the
    next (a stale element); one script reads them all at the same instant.
    """
    return driver.execute_script(
        "return [...document.querySelectorAll('#fleet-table tbody tr td:first-child')].map(c => c.innerText)")


def test_the_page_loads_whole_with_no_console_errors(server, browser):
    for path in ("/", "/console"):
        browser.get(server.url + path)
        WebDriverWait(browser, WAIT_S).until(lambda d: len(fleet(d)) == 2 and "requests" in text(d, "figures"))
        assert missing(browser) == []
        assert sorted(fleet(browser)) == ["gemma3", "smollm2"]  # every configured expert, live from /v1/experts
        assert text(browser, "ready") == "ready" and "store: memory" in text(browser, "store-state")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        assert not browser.find_element(By.ID, "key-form").is_displayed()  # no keys configured


def test_the_element_check_fails_when_an_element_is_missing(server, browser):
    browser.get(server.url + "/")
    browser.execute_script("document.getElementById('fleet-table').remove()")
    assert missing(browser) == ["fleet-table"]


def _ask(driver: webdriver.Chrome, question: str, experts: list[str] = (), aggregation: str = "") -> None:
    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(question)
    for name in experts:
        driver.find_element(By.CSS_SELECTOR, f"#experts input[value='{name}']").click()
    Select(driver.find_element(By.ID, "aggregation")).select_by_visible_text(aggregation or "default")
    driver.find_element(By.ID, "ask-button").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: "$" in text(d, "answer-status") or "error" in text(d, "answer-status"))


def test_a_question_gets_a_streamed_answer_and_its_reasons(server, browser, tmp_path):
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#experts input")) == 2)
    _ask(browser, "What is the capital of France?", experts=["smollm2"], aggregation="best")
    assert "Paris" in text(browser, "answer")
    assert "smollm2 is writing the answer" in text(browser, "plan")  # the page said who streams, then streamed
    assert "router all" in text(browser, "routing")
    recruited = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#scores tbody tr")]
    assert any(r.startswith("smollm2") and r.endswith("yes") for r in recruited)
    answers = browser.find_elements(By.CSS_SELECTOR, "#expert-answers tbody tr")
    assert len(answers) == 1 and answers[0].text.startswith("smollm2") and "Paris" in answers[0].text
    assert re.search(r"trace [0-9a-f]{32}", text(browser, "answer-status")), "the request's trace id is shown"

    browser.find_element(By.CSS_SELECTOR, "#experts input[value='smollm2']").click()  # untick: the router chooses
    _ask(browser, "Name a primary colour.", aggregation="vote")
    assert text(browser, "answer").strip()
    assert "the answer comes when it is complete" in text(browser, "plan")
    rows = browser.find_elements(By.CSS_SELECTOR, "#expert-answers tbody tr")
    assert sorted(r.text.split()[0] for r in rows) == ["gemma3", "smollm2"]
    assert "aggregation vote" in text(browser, "aggregator")
    shot = tmp_path / "console.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("CONCILIUM_CONSOLE_SCREENSHOT"):
        shutil.copy(shot, os.environ["CONCILIUM_CONSOLE_SCREENSHOT"])


def test_with_keys_the_page_refuses_to_work_until_a_key_is_entered(ray_cluster, browser):
    key = "console-key-" + uuid.uuid4().hex[:8]
    folder = BENCH_DATA / "routerbench-arc-wino-mbpp"
    s = ThreadServer({
        "ray": {"namespace": f"console-{uuid.uuid4().hex[:6]}"},
        "server": {"api_key_sha256": [digest(key)]},
        "experts": [{"name": n, "backend": "replay", "path": str(folder), "model": m}
                    for n, m in (("gpt4", "gpt-4-1106-preview"), ("mistral7b", "mistralai/mistral-7b-chat"))],
    })
    try:
        browser.execute_script("sessionStorage.clear()")
        browser.get(s.url + "/")
        WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
        assert not browser.find_element(By.ID, "ask-button").is_enabled() and fleet(browser) == []
        assert "needs an API key" in text(browser, "notice")
        for attempt, works in (("wrong-key", False), (key, True)):
            browser.find_element(By.ID, "api-key").send_keys(attempt)
            browser.find_element(By.ID, "key-save").click()
            WebDriverWait(browser, WAIT_S).until(
                lambda d, w=works: d.find_element(By.ID, "ask-button").is_enabled() == w
                and (text(d, "key-state") == ("using your key" if w else "the key was refused")))
        WebDriverWait(browser, WAIT_S).until(lambda d: sorted(fleet(d)) == ["gpt4", "mistral7b"])
        WebDriverWait(browser, WAIT_S).until(lambda d: "needs an admin key" in text(d, "figures"))  # /metrics
        _ask(browser, "What is 2 + 2?")
        assert text(browser, "answer").strip() and "router all" in text(browser, "routing")
        browser.find_element(By.ID, "reload").click()  # a user key is not an admin key
        WebDriverWait(browser, WAIT_S).until(lambda d: "needs an admin key" in text(d, "notice"))
    finally:
        browser.execute_script("sessionStorage.clear()")
        s.stop()
