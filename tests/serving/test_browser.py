"""The chat page in real headless Chromium (Debian's, driven by Selenium): type a prompt, watch
the answer grow, press Stop, see the stream end and the slot freed.

Uses the real model: its tokens come at a pace a person (and this test) can watch."""

import shutil
import time

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.serving.conftest import wait_for

pytestmark = pytest.mark.slow
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
  pytest.skip("Debian chromium / chromium-driver are not installed (scripts/install_browser.sh "
              "installs them)", allow_module_level=True)


@pytest.fixture
def browser(tmp_path):
  options = Options()
  options.binary_location = CHROMIUM
  for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run",
              "--disable-dev-shm-usage", "--window-size=1200,900",
              f"--user-data-dir={tmp_path / 'profile'}"):
    options.add_argument(arg)
  # An explicit driver path: Selenium Manager never tries to download one.
  driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
  driver.set_page_load_timeout(60)
  yield driver
  driver.quit()


def test_page_streams_tokens_and_stop_ends_the_stream(real_server, browser):
  browser.get(real_server.url + "/")
  text = lambda: browser.find_element(By.ID, "status").text
  assert text() == "idle"
  max_tokens = browser.find_element(By.ID, "max_tokens")
  max_tokens.clear()
  max_tokens.send_keys("300")
  browser.find_element(By.ID, "prompt").send_keys("Tell me a long story about a lighthouse keeper.")
  browser.find_element(By.ID, "send").click()

  def answer():
    found = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    return found[-1].text if found else ""

  seen = []  # distinct lengths of the answer as it grows

  def grown_three_times():
    n = len(answer())
    if n and (not seen or n > seen[-1]):
      seen.append(n)
    return len(seen) >= 3
  wait_for(grown_three_times, 180, "the answer to grow", interval=0.1)
  assert text() == "streaming"
  assert browser.find_element(By.ID, "ttft").text.endswith(" ms")
  assert int(browser.find_element(By.ID, "tokens").text) > 0
  assert browser.find_element(By.ID, "send").get_attribute("disabled")

  browser.find_element(By.ID, "stop").click()
  wait_for(lambda: text() == "stopped", 60, "the stream to stop")
  at_stop = answer()
  tokens = int(browser.find_element(By.ID, "tokens").text)
  assert 0 < tokens < 300
  assert browser.find_element(By.ID, "tps").text != "–"
  time.sleep(1.0)  # nothing arrives after the end
  assert answer() == at_stop and int(browser.find_element(By.ID, "tokens").text) == tokens
  assert not browser.find_element(By.ID, "send").get_attribute("disabled")
  assert browser.find_element(By.ID, "stop").get_attribute("disabled")
  real_server.wait_idle()
