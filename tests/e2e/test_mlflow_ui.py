"""The MLflow UI, in Debian's headless Chromium, lists the smoke sweep's runs and accuracy_cosine.

The server runs MLflow's basic-auth app: the browser sends the e2e user's Authorization header
on every request (Chrome DevTools' Network.setExtraHTTPHeaders), as a logged-in user's would.

Selenium drives Debian's headless Chromium (the `chromium` fixture of tests/e2e/conftest.py).
"""

import shutil
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # slow too: `-m "not slow"` must not need the services

SCREENSHOT = Path(__file__).resolve().parents[2] / ".e2e" / "screenshots" / "mlflow_ui.png"
METRIC_COL = "metrics.`accuracy_cosine`"  # ag-grid column id of a metric in MLflow 3's runs table


@pytest.fixture
def browser(chromium, mlflow_credentials):
    """The browser as a logged-in user: the e2e user's Authorization header on every request."""
    import base64

    token = base64.b64encode(f"{mlflow_credentials.user}:{mlflow_credentials.password}".encode()).decode()
    chromium.execute_cdp_cmd("Network.enable", {})
    chromium.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
    return chromium


def test_mlflow_ui_shows_the_smoke_runs(browser, smoke_sweep, mlflow_uri: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    # The sweep is one row (its parent run) that opens into its fine-tune run; the baseline-* run beside it.
    everything = MlflowClient(tracking_uri=mlflow_uri).search_runs([smoke_sweep.experiment_id])
    parent = next(r for r in everything if r.data.tags.get("embft.role") == "sweep")
    runs = [r for r in everything if r is not parent]
    names = {r.info.run_id: r.info.run_name for r in runs}
    assert len(names) == 2  # the fine-tuned run and its baseline-* run

    def body_text() -> str:
        return browser.find_element(By.TAG_NAME, "body").text

    def headers() -> set:
        return {h.get_attribute("col-id") for h in browser.find_elements(By.CSS_SELECTOR, ".ag-header-cell")}

    def column_entry(title: str):
        return browser.find_element(By.XPATH, f"//span[contains(@class, 'tree-title') and normalize-space()='{title}']")

    try:
        # MLflow 3 opens experiments in its GenAI view; the runs table is the "machine_learning" one.
        browser.get(f"{mlflow_uri}/#/experiments/{smoke_sweep.experiment_id}/runs?workflowType=machine_learning")
        parent_row = f".ag-row[row-id='{parent.info.run_id}']"
        WebDriverWait(browser, 120).until(lambda _: browser.find_elements(By.CSS_SELECTOR, f"{parent_row} button"))
        browser.find_element(By.CSS_SELECTOR, f"{parent_row} button").click()  # the [+] that opens the sweep
        WebDriverWait(browser, 120).until(lambda _: all(n in body_text() for n in names.values()))
        for close in browser.find_elements(
            By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"
        ):
            close.click()  # the assistant panel would hide half of the table in the screenshot

        # Metrics are not shown by default: pick accuracy_cosine in "Columns" (and drop the empty
        # Dataset/Source/Models columns so it is in view).
        browser.find_element(By.CSS_SELECTOR, "[data-testid=column-selection-dropdown]").click()
        search = WebDriverWait(browser, 30).until(
            lambda _: browser.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']")
        )
        for title in ("Dataset", "Source", "Models"):
            if f"attributes.`{title}`" in headers():
                column_entry(title).click()
        if METRIC_COL not in headers():
            search.send_keys("accuracy_cosine")
            WebDriverWait(browser, 30).until(lambda _: column_entry("accuracy_cosine")).click()
        search.send_keys(Keys.ESCAPE)
        WebDriverWait(browser, 30).until(lambda _: METRIC_COL in headers())

        for run in runs:  # rows are keyed by run id; each shows its name and its accuracy_cosine
            row = f".ag-row[row-id='{run.info.run_id}']"
            cell = WebDriverWait(browser, 30).until(
                lambda _, row=row: browser.find_element(By.CSS_SELECTOR, f"{row} [col-id='{METRIC_COL}']")
            )
            assert float(cell.text) == pytest.approx(run.data.metrics["accuracy_cosine"], abs=1e-9)
            row_text = " ".join(r.text for r in browser.find_elements(By.CSS_SELECTOR, row))
            assert run.info.run_name in row_text
        assert "accuracy_cosine" in body_text()
        time.sleep(1)  # let the column finish rendering before the screenshot
    finally:
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))
        shutil.copy(SCREENSHOT, tmp_path / SCREENSHOT.name)
