"""The web console in a real browser (Debian's chromium through chromium-driver, Selenium), driven as a person would
against a live `rayembed up` with API keys on: sign in, upload a dataset, start a job from the form and watch it,
read the model's report card, deploy it, try it, search side by side, and read /docs with the network cut off.
Screenshots of every page go to test-artifacts/console/ (CONSOLE_SCREENSHOTS moves them)."""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster.client import Client
from cluster.local import free_port
from tests.browser import all_css, chromium, css, wait
from tests.conftest import ROOT, SAMPLE, sample_lines
from tests.test_platform import Platform

pytestmark = pytest.mark.timeout(900)
SHOTS = Path(os.environ.get("CONSOLE_SCREENSHOTS", ROOT / "test-artifacts" / "console"))
XSS = "<img src=x onerror=alert(1)>"
STEPS = 200  # long enough on 2 cores that the page sees the run between its first and last record


# ---------------------------------------------------------------- the metrics history, without a browser
def test_the_metrics_history_is_bounded_evenly_spaced_and_paged(tmp_path, monkeypatch):
    from cluster import metrics
    from rayembed import history

    monkeypatch.setattr(history, "WRITE_EVERY_S", 0.0)
    job_dir = tmp_path / "jobs" / "cust-1"
    writer = history.MetricsHistory(str(job_dir / "metrics.json"))
    total = 5000
    for step in range(1, total + 1):
        writer.record(step, total, 1.0 / step, 5e-6, 100.0)
    writer.validate(total, total, {"val_loss": 0.5, "ndcg@10": 0.7})
    stored = json.loads((job_dir / "metrics.json").read_text())
    steps = [p["step"] for p in stored["train"]]
    assert len(steps) <= history.MAX_TRAIN_POINTS and steps[0] == 1 and steps[-1] == total
    gaps = {b - a for a, b in zip(steps[:-2], steps[1:-1])}
    assert gaps == {stored["stride"]} and stored["stride"] == 8, gaps  # evenly spaced: every 8th of 5000 records
    job = {"name": "cust-1", "status": "completed", "output_dir": str(job_dir / "output"), "progress": {}}
    first = metrics.job_metrics(job, page=1, page_size=100, points=300)
    assert first["pagination"]["total_results"] == 300 and len(first["data"]) == 100
    assert first["data"][0]["step"] == 1 and first["stride"] == 8 * math.ceil(len(steps) / 300)
    last = metrics.job_metrics(job, page=3, page_size=100, points=300)
    assert last["data"][-1]["step"] == total and last["validation"][0]["metrics"]["ndcg@10"] == 0.7
    out = metrics.JobMetricsOut.model_validate(last)
    assert out.data[-1].loss == pytest.approx(1 / total) and out.validation[0].step == total
    empty = metrics.job_metrics({**job, "output_dir": str(tmp_path / "none" / "output")}, 1, 10)
    assert empty["data"] == [] and empty["pagination"]["total_results"] == 0


def test_the_wheel_ships_every_console_file(built_wheel):
    """The console works offline only if every file it serves is in the wheel (package data is a list by hand)."""
    import zipfile

    shipped = set(zipfile.ZipFile(built_wheel).namelist())
    static = ROOT / "cluster" / "console" / "static"
    files = {p.relative_to(ROOT).as_posix() for p in static.rglob("*") if p.is_file()}
    assert "cluster/console/static/vendor/swagger-ui/LICENSE" in files and len(files) > 15
    assert files <= shipped, sorted(files - shipped)


# ---------------------------------------------------------------- the live platform and the browser
@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_bert):
    """`rayembed up` closed (keys on), an admin key; the tiny BERT is an allowed base model, registered as
    `tiny-base` (exported by a Ray job while the first tests run) and deployed later as the search's base side."""
    home = tmp_path_factory.mktemp("console")
    p = Platform(home / "rayembed-home", free_port())
    p.env["RAYEMBED_BASE_MODELS"] = str(tiny_bert)
    p.env.pop("RAYEMBED_DATA_ROOTS", None)
    try:
        started = p.cli("up", "--num-cpus", "4", cwd=home).stdout
        assert f"console: {p.base_url}/console" in started, started
        p.key = p.cli("keys", "create", "--all-workspaces", "--label", "console").stdout.strip().splitlines()[-1]
        deadline = time.monotonic() + 30
        while status_of(p.base_url + "/v2/workspaces", p.key) != 200:
            assert time.monotonic() < deadline, "the API never took the key"
            time.sleep(0.3)
        assert status_of(p.base_url + "/v2/workspaces") == 401
        p.api = Client(base_url=p.base_url, api_key=p.key)
        p.api.models.create("tiny-base", base_model=str(tiny_bert))
        p.files = home
        yield p
    finally:
        p.cli("down", check=False)


def status_of(url: str, key: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def browser(live):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with chromium() as driver:
        yield driver


def shot(driver, name: str) -> None:
    """The whole page (up to 2,400 pixels tall) at the window's width."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    tall = min(2400, driver.execute_script("return document.documentElement.scrollHeight") + 140)
    driver.set_window_size(width, max(height, tall))
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.2)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(width, height)


def go(driver, live, hash_: str, heading: str) -> None:
    driver.get(f"{live.base_url}/console#{hash_}") if not driver.current_url.startswith(live.base_url + "/console") \
        else driver.execute_script("location.hash = arguments[0]", hash_)
    wait(driver, lambda d: css(d, "main h1").text.startswith(heading) and css(d, "main").get_attribute("aria-busy") is None)


def csp_violations(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


def test_sign_in_with_a_key_and_a_wrong_key_is_refused(live, browser):
    browser.get(live.base_url + "/console")
    key = wait(browser, lambda d: css(d, "#api-key"))
    assert not css(browser, "#nav").is_displayed()
    shot(browser, "sign-in")
    key.send_keys("rek_000000000000_not-a-real-key-at-all-000000")
    css(browser, "#login button[type=submit]").click()
    refused = wait(browser, lambda d: css(d, "#login-status .error"))
    assert "refused" in refused.text and "invalid API key" in refused.text
    assert browser.execute_script("return sessionStorage.getItem('rayembed.key')") is None
    key = css(browser, "#api-key")
    key.clear()
    key.send_keys(live.key)
    css(browser, "#login button[type=submit]").click()
    wait(browser, lambda d: css(d, "main h1").text == "Overview")
    assert css(browser, "#nav").is_displayed() and css(browser, "#workspace").get_attribute("value") == "default"
    assert browser.execute_script("return sessionStorage.getItem('rayembed.key')") == live.key
    wait(browser, lambda d: css(d, "#health dd").text.startswith("passed"))
    assert css(browser, "[data-count='models'] .stat").text == "1"  # tiny-base, registered by the fixture
    shot(browser, "overview")
    assert csp_violations(browser) == []


def _upload(browser, name: str, description: str, files: dict[str, Path]) -> None:
    css(browser, "#ds-name").send_keys(name)
    css(browser, "#ds-description").send_keys(description)
    slug = lambda p: "".join(c if c.isalnum() else "-" for c in p)  # noqa: E731 - datasets.js's ids
    for path, local in files.items():
        css(browser, f"#file-{slug(path)}").send_keys(str(local))
    css(browser, "#new-dataset button[type=submit]").click()


def test_what_a_user_types_while_a_page_loads_is_kept(live, browser):
    """A form's fields exist before its page's data arrives. On a slow link a user types into them at once; when
    the page has rendered, the console must not move focus away (their next keystrokes would be lost)."""
    from selenium.webdriver.common.keys import Keys

    go(browser, live, "/", "Overview")
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": False, "latency": 1500, "downloadThroughput": -1, "uploadThroughput": -1})
    try:
        browser.execute_script("location.hash = '#/datasets'")
        field = wait(browser, lambda d: css(d, "#ds-description"))
        assert css(browser, "main").get_attribute("aria-busy") == "true"  # the list is still on its way
        field.click()
        field.send_keys("typed ")
        wait(browser, lambda d: css(d, "main").get_attribute("aria-busy") is None, timeout=20)
        browser.switch_to.active_element.send_keys("while it loaded", Keys.TAB)
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    assert css(browser, "#ds-description").get_attribute("value") == "typed while it loaded"
    browser.refresh()  # an empty form for the next test
    wait(browser, lambda d: css(d, "#ds-name") and css(d, "main").get_attribute("aria-busy") is None)


def test_upload_shows_the_bad_line_and_a_description_is_only_text(live, browser):
    from selenium.common.exceptions import NoAlertPresentException

    lines = sample_lines(64)
    bad = live.files / "bad" / "training.jsonl"
    bad.parent.mkdir()
    bad.write_text("".join(json.dumps(ex) + "\n" for ex in lines[:2]) + json.dumps({**lines[2], "neg_doc": "one string"})
                   + "\n" + json.dumps(lines[3]) + "\n")
    go(browser, live, "/datasets", "Datasets")
    _upload(browser, "broken", XSS, {"training.jsonl": bad})
    error = wait(browser, lambda d: css(d, "#upload-error"), timeout=60)
    assert "training.jsonl:3: field 'neg_doc' must be a list" in error.text, error.text
    cells = [c.text for c in all_css(browser, "#upload-problems tbody td")]
    assert cells[:2] == ["3", "neg_doc"], css(browser, "#upload-status").get_attribute("outerHTML")  # line, field
    shot(browser, "datasets-upload-error")

    good = live.files / "good" / "training.jsonl"
    good.parent.mkdir()
    good.write_text("".join(json.dumps(ex) + "\n" for ex in lines))
    browser.refresh()
    wait(browser, lambda d: css(d, "#ds-name"))
    _upload(browser, "tiny-data", "64 Debian examples", {"training.jsonl": good, **{
        f"evaluation/{p}": SAMPLE / "eval" / p for p in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv")}})
    wait(browser, lambda d: css(d, "#upload-done"), timeout=90)
    assert "training.jsonl: 64 records stored" in css(browser, "#upload-status").text
    # the hostile description: shown as the characters it is, nothing ran, the DOM holds no such element
    cells = wait(browser, lambda d: [c.text for c in all_css(d, "#datasets .description")] or None)
    assert XSS in cells
    assert all_css(browser, "img") == []
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018
    go(browser, live, "/datasets/broken", "Dataset broken")
    assert css(browser, "#ds-desc").text == XSS and all_css(browser, "#ds-desc *") == []
    assert browser.execute_script("return document.querySelectorAll('[onerror]').length") == 0
    go(browser, live, "/datasets/tiny-data", "Dataset tiny-data")
    assert "64 training examples: the model card suggests 5,000-10,000" in css(browser, "main").text
    shot(browser, "dataset")


def test_a_job_from_the_form_shows_its_progress_and_loss_curve_moving(live, browser, tiny_bert):
    go(browser, live, "/jobs/new?dataset=tiny-data", "New job")
    wait(browser, lambda d: css(d, "#job-lr"))
    # the model card's conservative defaults, and its advice against this dataset's size
    assert [css(browser, f"#job-{f}").get_attribute("value") for f in ("lr", "wd", "epochs")] == ["5e-6", "0.01", "1"]
    assert "5,000-10,000" in css(browser, "#size-advice").text and "has 64" in css(browser, "#size-advice").text
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('main input, main select, main textarea')].filter(e => "
        "!(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id)")
    assert unlabelled == []
    css(browser, "#job-model").send_keys(str(tiny_bert))
    css(browser, "#job-output").send_keys("tiny-tuned")
    css(browser, "#ft-lora").click()
    assert css(browser, "#lora-settings").is_enabled()
    for field, value in {"lora-rank": "4", "lora-alpha": "8"}.items():
        css(browser, f"#{field}").clear()
        css(browser, f"#{field}").send_keys(value)
    css(browser, "#new-job details summary").click()
    for field, value in {"job-steps": str(STEPS), "job-batch": "8", "job-seq": "32", "job-dims": "16, 32",
                         "job-log-every": "1"}.items():
        css(browser, f"#{field}").clear()
        css(browser, f"#{field}").send_keys(value)
    shot(browser, "job-form")
    css(browser, "#new-job button[type=submit]").click()
    wait(browser, lambda d: css(d, "main h1").text.startswith("Job cust-"))
    job_id = css(browser, "main h1").text.split()[-1]
    seen = []  # (progress %, loss-curve points) as the page showed them, until the job finished
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        try:
            pct = float(css(browser, "#job-progress progress").get_attribute("value"))
            lines = all_css(browser, "#loss-chart polyline[data-series='training loss']")
            points = int(lines[0].get_attribute("data-points")) if lines else 0
            status = css(browser, "#job-head .badge").text
        except Exception:  # noqa: BLE001 - the page re-rendered under us
            continue
        if not seen or seen[-1] != (pct, points):
            seen.append((pct, points))
        if status in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.25)
    assert status == "completed", css(browser, "main").text[-3000:]
    wait(browser, lambda d: css(d, "#job-progress progress").get_attribute("value") == "100")
    wait(browser, lambda d: all_css(d, "#validation td"))
    shot(browser, "job")
    assert any(0 < pct < 100 for pct, _ in seen), seen  # the bar moved through the run, not only to its end
    print(json.dumps({"seen": seen}))
    growing = sorted({p for _, p in seen if p})
    assert len(growing) >= 2 and growing[-1] <= STEPS, seen  # the curve grew while the job ran
    final = int(css(browser, "#loss-chart polyline[data-series='training loss']").get_attribute("data-points"))
    assert final == STEPS
    api = live.api.customization.jobs.retrieve(job_id)
    assert api.progress.step == STEPS
    assert "val_loss" in css(browser, "#validation").text
    assert "rayembed-progress" in css(browser, "#log-tail").text
    live.job_id = job_id


def test_the_finished_model_shows_its_report_card(live, browser):
    model = live.api.models.retrieve("tiny-tuned")
    card = model.evaluation.card
    go(browser, live, "/models", "Models")
    rows = wait(browser, lambda d: [r.text for r in all_css(d, "#models tbody tr")] if len(all_css(d, "#models tbody tr")) == 2
                else None)
    tuned = next(r for r in rows if r.startswith("tiny-tuned"))
    assert model.evaluation.verdict in tuned and "95% CI" in tuned and "16, 32" in tuned
    go(browser, live, "/models/tiny-tuned", "Model tiny-tuned")
    shown = [r.text for r in all_css(browser, "#report-card tbody tr")]
    assert len(shown) == len(card.sizes) * len(card.precisions) == len(card.rows)
    first = sorted(card.rows, key=lambda r: (r.dims, card.precisions.index(r.precision)))[0]
    assert shown[0].split()[:3] == [str(first.dims), first.precision, f"{first.bytes_per_vector:,}"]
    assert f"{first.tuned['ndcg@10']:.4f}" in shown[0]
    assert css(browser, "#artifact-digest").text == model.artifact.sha256
    assert css(browser, "#artifact-uri").text == model.artifact.uri
    lineage = css(browser, "#lineage").text
    assert f"job {live.job_id}" in lineage and "model tiny-tuned" in lineage and "not deployed" in lineage
    assert f"{model.evaluation.tuned['ndcg@10']:.4f}" in css(browser, "#evaluation").text
    shot(browser, "model")


def test_deploy_it_try_it_and_search_side_by_side(live, browser):
    live.api.models.wait_ready("tiny-base", timeout_s=300)
    live.api.deployments.create("tiny-base", model="tiny-base", num_cpus=0.25)  # the search's other side
    go(browser, live, "/deployments?model=tiny-tuned", "Deployments")
    wait(browser, lambda d: css(d, "#dep-cpus"))
    css(browser, "#dep-cpus").clear()
    css(browser, "#dep-cpus").send_keys("0.25")
    shot(browser, "deployments")
    css(browser, "#new-deployment button[type=submit]").click()
    wait(browser, lambda d: css(d, "main h1").text == "Deployment tiny-tuned")
    wait(browser, lambda d: css(d, "#dep-head .badge").text == "READY", timeout=300, every=1)
    live.api.deployments.wait_ready("tiny-base", timeout_s=300)
    assert "READY" in css(browser, "#dep-history").text and css(browser, "#verification .badge").text == "passed"
    # try it: 16 of the model's 32 dimensions, a unit vector, its tokens and latency
    from selenium.webdriver.support.select import Select

    Select(wait(browser, lambda d: css(d, "#try-dims"))).select_by_value("16")
    css(browser, "#try-form button[type=submit]").click()
    dims = wait(browser, lambda d: css(d, "#try-dimensions"), timeout=60)
    assert dims.text == "16" and abs(float(css(browser, "#try-norm").text) - 1.0) < 1e-4
    assert int(css(browser, "#try-tokens").text) > 2 and css(browser, "#try-latency").text.endswith(" ms")
    assert css(browser, "#try-head").text.count(",") == 8  # eight values, then the ellipsis
    # side by side: an evaluation query, the tuned model against the base model's deployment
    query = json.loads((SAMPLE / "eval" / "queries.jsonl").read_text().splitlines()[0])["text"]
    browser.refresh()
    box = wait(browser, lambda d: css(d, "#search-query"), timeout=30)
    assert Select(css(browser, "#search-compare")).first_selected_option.get_attribute("value") == "tiny-base"
    box.send_keys(query)
    css(browser, "#search-form button[type=submit]").click()
    sides = wait(browser, lambda d: (lambda found: found if len(found) == 2 else None)(all_css(d, "#search-out section.hits")),
                 timeout=120)
    assert [s.get_attribute("data-deployment") for s in sides] == ["tiny-tuned", "tiny-base"]
    for side in sides:
        texts = [t.text for t in side.find_elements("css selector", ".doc-text")]
        assert len(texts) == 5 and all(texts), texts
    assert "judged relevant" in css(browser, "#search-out").text
    assert "$RAYEMBED_API_KEY" in css(browser, "#snippet-curl").text and live.key not in css(browser, "main").text
    shot(browser, "deployment")
    assert csp_violations(browser) == []


def test_every_page_reads_at_1280_and_narrow_and_a_401_asks_again(live, browser):
    for hash_, heading, name in [("/jobs", "Jobs", "jobs"), ("/sweeps", "Sweeps", "sweeps"),
                                 ("/", "Overview", "overview-after")]:
        go(browser, live, hash_, heading)
        time.sleep(0.5)
        shot(browser, name)
    browser.set_window_size(420, 860)
    try:
        for hash_, heading in [("/models/tiny-tuned", "Model tiny-tuned"), ("/jobs", "Jobs")]:
            go(browser, live, hash_, heading)
            overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 1, (hash_, overflow)
        shot(browser, "narrow-model")
    finally:
        browser.set_window_size(1280, 800)
    # keyboard only: the skip link comes first, then the brand and the sections; Enter opens one
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    go(browser, live, "/", "Overview")
    browser.refresh()
    wait(browser, lambda d: css(d, "main h1").text == "Overview")
    ActionChains(browser).send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element.text == "Skip to content"
    ActionChains(browser).send_keys(Keys.TAB, Keys.TAB, Keys.TAB).perform()
    assert browser.switch_to.active_element.text == "Models"
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    wait(browser, lambda d: css(d, "main h1").text == "Models")
    wait(browser, lambda d: d.switch_to.active_element.get_attribute("id") == "main")  # focus moved to the new page
    # a key the API no longer takes: the console asks for one again
    browser.execute_script("sessionStorage.setItem('rayembed.key', 'rek_000000000000_revoked-key-000000000000')")
    go(browser, live, "/datasets", "Sign in")
    assert "sign in again" in css(browser, "#login-status").text.lower()
    css(browser, "#api-key").send_keys(live.key)
    css(browser, "#login button[type=submit]").click()
    wait(browser, lambda d: css(d, "main h1").text == "Datasets")  # back where the user was


def test_a_paged_list_of_a_hundred_answers_in_under_a_second_and_undeploy(live, browser):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: live.api.datasets.create(f"many-{i:03d}", description=f"dataset {i}"), range(100)))
    go(browser, live, "/models", "Models")
    start = time.monotonic()
    browser.execute_script("location.hash = '#/datasets'")
    wait(browser, lambda d: "(102 in all)" in css(d, "#datasets .pager").text, every=0.02)
    seconds = time.monotonic() - start
    assert len(all_css(browser, "#datasets tbody tr")) == 20 and seconds < 1.0, seconds
    print(json.dumps({"datasets page, 102 datasets": round(seconds, 3)}))
    # undeploy from the deployment's page (the browser's confirm, accepted): the list no longer serves it
    go(browser, live, "/deployments/tiny-base", "Deployment tiny-base")
    wait(browser, lambda d: css(d, "#undeploy")).click()
    browser.switch_to.alert.accept()
    wait(browser, lambda d: css(d, "main h1").text == "Deployments")
    wait(browser, lambda d: "tiny-base" not in css(d, "#deployments").text or "DELETING" in css(d, "#deployments").text)
    assert live.api.deployments.retrieve("tiny-tuned").status == "READY"


def test_docs_lists_the_operations_with_no_request_leaving_loopback(live, browser):
    browser.get_log("performance")  # drop what the console's pages sent
    browser.get(live.base_url + "/docs")  # this tab's key (sessionStorage) reads /openapi.json
    ops = wait(browser, lambda d: all_css(d, ".opblock") if len(all_css(d, ".opblock")) >= 40 else None, timeout=60)
    spec = json.loads(urllib.request.urlopen(urllib.request.Request(
        live.base_url + "/openapi.json", headers={"Authorization": f"Bearer {live.key}"}), timeout=30).read())
    documented = sum(len(v) for v in spec["paths"].values())
    assert len(ops) == documented
    assert "/v2/workspaces/{workspace}/customization/jobs/{job_id}/metrics" in css(browser, "#swagger-ui").text
    shot(browser, "docs")
    urls = [json.loads(e["message"])["message"]["params"]["request"]["url"] for e in browser.get_log("performance")
            if json.loads(e["message"])["message"]["method"] == "Network.requestWillBeSent"]
    assert urls and any(u.endswith("/openapi.json") for u in urls)
    outside = [u for u in urls if not u.startswith(("http://127.0.0.1:", "data:"))]
    assert outside == [], outside
    assert csp_violations(browser) == []
    policy = urllib.request.urlopen(live.base_url + "/docs", timeout=30).headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "default-src 'none'" in policy  # no inline script, no other origin
