"""report.html (eval/report_html.py): escaped and small, and opened in a real headless Chromium.

The browser is the Chromium of the npm package ``@sparticuz/chromium`` (it needs no system
libraries), which ``make test`` installs under ``.venv/node``, driven over the DevTools protocol by
Python's ``playwright``. Without node, the package or playwright the browser test skips, saying why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from data.synthetic import write_hpdv2
from eval.evaluate import main as evaluate_main
from eval.rank import main as rank_main
from eval.report_html import Card, page

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / ".venv" / "node"  # where `make test` installs @sparticuz/chromium
ATTACK = (
    '<script>window.__pwned = 1; document.title = "pwned"</script><img src=x onerror="window.__pwned = 2">'
)


def test_every_text_is_escaped_and_the_page_has_no_script():
    card = Card(f"#1 {ATTACK}.png", Image.new("RGB", (300, 200), "red"), 0.9, 1.0, human_rank=2.0,
                rollouts=[(f"rollout 1 {ATTACK}", f"<think>{ATTACK}</think><answer>1</answer>")])  # fmt: skip
    html = page(f"title {ATTACK}", [("model", ATTACK)], [(ATTACK, f"a prompt {ATTACK}", [card])])
    assert "<script" not in html.lower() and "onerror=" not in html.replace("onerror=&quot;", "")
    # shown as text 9 times: <title> and <h1>, the fact, the group id, the prompt, the image's alt
    # text and name, the rollout's label and its text
    assert html.count("&lt;script&gt;window.__pwned") == 9
    assert "<details><summary>reasoning (1)</summary>" in html, "the reasoning is collapsed"
    (uri,) = [part.split('"')[0] for part in html.split('src="')[1:]]
    assert uri.startswith("data:image/jpeg;base64,") and len(uri) < 8000, "a thumbnail, not the original"


def chromium():
    """``(executable, args)`` of @sparticuz/chromium under ``.venv/node``, or a skip with the reason."""
    pytest.importorskip("playwright.sync_api", reason="playwright (the browser extra; make test installs it)")
    if shutil.which("node") is None:
        pytest.skip("no node on this machine: @sparticuz/chromium cannot be unpacked")
    if not (NODE_DIR / "node_modules" / "@sparticuz" / "chromium").is_dir():
        pytest.skip(f"@sparticuz/chromium is not installed under {NODE_DIR} (make test installs it with npm)")
    script = ("const c = require('@sparticuz/chromium'); const m = c.default || c; "
              "m.executablePath().then(p => console.log(JSON.stringify({path: p, args: m.args})))")  # fmt: skip
    done = subprocess.run(["node", "-e", script], cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"@sparticuz/chromium did not unpack: {done.stderr.strip()[-300:]}")
    found = json.loads(done.stdout)
    return found["path"], found["args"]


def inspect(tab, path: Path) -> dict:
    """Open the page from disk in the browser tab and read what a person would see."""
    tab.goto(path.as_uri())
    seen = tab.evaluate("""() => ({
        images: document.images.length,
        loaded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
        prompts: document.querySelectorAll("section.prompt").length,
        cards: document.querySelectorAll("section.prompt .card").length,
        openDetails: document.querySelectorAll("details[open]").length,
        details: document.querySelectorAll("details").length,
        scripts: document.scripts.length,
        pwned: window.__pwned === undefined ? null : window.__pwned,
        title: document.title,
        headings: [...document.querySelectorAll("section.prompt h3")].map(h => h.textContent),
    })""")
    return seen


@pytest.mark.usefixtures("one_thread")
def test_the_page_in_a_real_browser(tiny_dir, tmp_path, capsys):
    executable, args = chromium()
    from playwright.sync_api import sync_playwright

    data = tmp_path / "hp"
    write_hpdv2(data, prompts=4, seed=0)
    rows = json.loads((data / "test.json").read_text())
    rows[0]["prompt"] = f"a red circle {ATTACK}"
    (data / "test.json").write_text(json.dumps(rows))
    out = tmp_path / "eval"
    evaluate_main([str(ROOT / "experiments/tiny_hpsv2.yaml"), f"model.name_or_path={tiny_dir}", f"data.root={data}",
                   "eval.max_groups=3", "eval.max_new_tokens=8", "eval.swap_groups=1", "--out", str(out),
                   "--no-progress"])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert {"ece", "parse_failure_rate", "position_consistency"} <= set(report["diagnostics"])
    assert (out / "report.html").stat().st_size < 8000 * report["n_images"] + 50_000, (
        "thumbnails keep it small"
    )

    images = [tmp_path / f"img_{i}.png" for i in range(3)]
    for path, colour in zip(images, ("red", "green", "blue")):
        Image.new("RGB", (640, 480), colour).save(path)
    rank_html = tmp_path / "rank.html"
    rank_main(["--model", str(tiny_dir), "--prompt", f"a square {ATTACK}", "--max-new-tokens", "8",
               "--html", str(rank_html), *map(str, images)])  # fmt: skip
    capsys.readouterr()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=args, headless=True)
        try:  # one tab: with the package's --single-process, closing a tab ends the browser
            tab = browser.new_page()
            seen = inspect(tab, out / "report.html")
            ranked = inspect(tab, rank_html)
        finally:
            browser.close()
    assert seen["prompts"] == report["n_groups"] == 3
    assert seen["images"] == seen["cards"] == report["n_images"], "one thumbnail per evaluated image"
    assert seen["loaded"] == seen["images"], "every image loads (non-zero natural width)"
    assert seen["details"] == report["n_images"] and seen["openDetails"] == 0, (
        "every image's reasoning, collapsed"
    )
    assert seen["scripts"] == 0 and seen["pwned"] is None and seen["title"].startswith("Evaluation")
    assert "<script>window.__pwned = 1" in seen["headings"][0], "the prompt's markup shows as text"
    assert ranked["images"] == ranked["loaded"] == ranked["cards"] == 3 and ranked["prompts"] == 1
    assert ranked["pwned"] is None and ranked["scripts"] == 0 and "<script>" in ranked["headings"][0]
