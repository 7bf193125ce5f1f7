"""``report.html``: one self-contained page that shows an evaluation (or one ``eval.rank`` call) to a person.

The page holds the accuracy table (hard / soft, Mean@1 and Mean@k under every protocol), the
judge diagnostics with a reliability diagram (an inline SVG), then one section per prompt: its
images best first by soft score as thumbnails, each with the human rank, the soft and hard
scores and the reasoning of its rollouts (collapsed, ``<details>``).

- **Self-contained and small.** Images are inline JPEG thumbnails (``THUMBNAIL`` pixels on the
  longest side, base64 data URIs), never the originals: about 4.5 KB per photograph. Measured
  at ImageReward's test-set size (2,887 photograph crops, 466 prompts, a reasoning each): a page
  of 14.6 MiB that headless Chromium loaded, every image decoded, in 2.8 s on a 2-core CPU.
- **Inert.** Every text from the data or the model (prompts, completions, file names, labels)
  is HTML-escaped, and the page carries no script at all; its Content-Security-Policy allows
  only inline styles and data-URI images, so even markup that slipped through could not run a
  script or load anything.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

THUMBNAIL = 112  # longest side of a thumbnail, pixels
JPEG_QUALITY = 65
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
section.prompt { border-top: 2px solid #ddd; padding-top: .5em; margin-top: 1em; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; align-items: flex-start; }
.card { width: 16em; border: 1px solid #ddd; border-radius: 4px; padding: .4em; }
.card img { display: block; max-width: 100%; margin-bottom: .3em; }
.card pre { white-space: pre-wrap; word-break: break-word; font-size: 12px; background: #f6f6f6; padding: .3em; }
.muted { color: #777; }
"""


@dataclass
class Card:
    """One image of a prompt on the page."""

    name: str
    image: Image.Image | None  # None: the image could not be decoded again
    soft: float
    hard: float
    human_rank: float | None = None
    human_rating: float | None = None
    note: str = ""  # e.g. "anchor"
    rollouts: list[tuple[str, str]] = field(default_factory=list)  # (label, completion text)


def esc(value) -> str:
    """Text as HTML, quotes included."""
    return html.escape(str(value), quote=True)


def thumbnail_uri(image: Image.Image) -> str:
    """A JPEG thumbnail of ``image`` as a ``data:`` URI."""
    im = image.convert("RGB")
    im.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def cards_of(result, k: int, images: list, names: list[str], ranks: list[float] | None = None,
             ratings: list[float] | None = None) -> list[Card]:  # fmt: skip
    """The cards of one ``eval.score.GroupResult``, best Mean@k soft score first (ties keep order).

    Each image gets the rollouts of the requests that show it (a rating; a comparison, labelled
    with the other image), and the anchor is marked."""
    soft, hard = result.scores[f"soft@{k}"], result.scores[f"hard@{k}"]
    rollouts = [[] for _ in range(result.n_images)]
    for idx, j in zip(result.requests, result.judgements):
        for i in idx:
            other = [f"#{o + 1}" for o in idx if o != i]
            where = f"shown {'first' if idx[0] == i else 'second'} against {other[0]}" if other else "rating"
            for r, text in enumerate(j.texts):
                rollouts[i].append(
                    (f"rollout {r + 1}, {where}: soft {j.soft[r]:.3f}, hard {j.hard[r]:g}", text)
                )
    cards = [Card(f"#{i + 1} {names[i]}", images[i], soft[i], hard[i], None if ranks is None else ranks[i],
                  None if ratings is None else ratings[i], "anchor" if i == result.anchor else "", rollouts[i])
             for i in range(result.n_images)]  # fmt: skip
    return sorted(cards, key=lambda c: -c.soft)


def reliability_svg(calibration: dict, lo: float, hi: float, observed: str, size: int = 220) -> str:
    """The reliability diagram: each bin's mean outcome against its mean prediction (a dot whose
    area grows with the bin's count) and the diagonal a calibrated judge lies on."""
    pad = 30
    span = size - 2 * pad

    def x(v):
        return pad + (v - lo) / (hi - lo) * span

    def y(v):
        return size - pad - (v - lo) / (hi - lo) * span

    n = max(1, calibration.get("n") or 1)
    dots = "".join(
        f'<circle cx="{x(b["predicted"]):.1f}" cy="{y(b["observed"]):.1f}" r="{2 + 10 * (b["n"] / n) ** 0.5:.1f}" '
        f'fill="#3870c0" fill-opacity=".6"><title>{b["n"]} predictions in [{b["lo"]:.3g}, {b["hi"]:.3g}]: '
        f"mean {b['predicted']:.3f}, observed {b['observed']:.3f}</title></circle>"
        for b in calibration.get("bins", [])
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img" '
        f'aria-label="reliability diagram">'
        f'<rect x="{pad}" y="{pad}" width="{span}" height="{span}" fill="none" stroke="#999"/>'
        f'<line x1="{x(lo)}" y1="{y(lo)}" x2="{x(hi)}" y2="{y(hi)}" stroke="#999" stroke-dasharray="4 3"/>{dots}'
        f'<text x="{size / 2}" y="{size - 6}" text-anchor="middle" font-size="11">soft score ({lo:g}–{hi:g})</text>'
        f'<text x="10" y="{size / 2}" font-size="11" transform="rotate(-90 10 {size / 2})" text-anchor="middle">'
        f"{esc(observed)}</text></svg>"
    )


def accuracy_table(metrics: dict) -> str:
    """Rows soft@1, hard@1 (, soft@k, hard@k), columns the protocols, in %."""
    protocols = ("imagereward_accuracy", "hpsv2_accuracy", "pairwise_accuracy")
    head = "".join(f"<th>{esc(p)}</th>" for p in protocols)
    rows = []
    for key, m in metrics.items():
        cells = "".join(f"<td>{'—' if m.get(p) is None else f'{100 * m[p]:.1f}'}</td>" for p in protocols)
        rows.append(f"<tr><td>{esc(key.replace('@', ' Mean@'))}</td>{cells}</tr>")
    return f'<table class="accuracy"><tr><th>score</th>{head}</tr>{"".join(rows)}</table>'


def diagnostics_block(d: dict, lo: float, hi: float) -> str:
    """The diagnostics as a table, with the reliability diagram."""

    def num(v):
        return "—" if v is None else f"{v:.3f}"

    cal = d["calibration"]
    rows = [("ECE", num(d["ece"])), ("calibration basis", f"{cal['basis']} (n = {cal['n']})"),
            ("parse failure rate", num(d["parse_failure_rate"])),
            ("hard answer ≠ soft choice", num(d["hard_soft_disagreement"]))]  # fmt: skip
    pc = d.get("position_consistency")
    if "position_consistency" in d:
        rows += [("position consistency", "not measured") if pc is None else
                 ("position inconsistency / flips / second-slot bias",
                  f"{pc['inconsistency']:.3f} / {pc['flip_rate']:.3f} / {pc['second_slot_bias']:+.3f} "
                  f"over {pc['n_pairs']} pairs")]  # fmt: skip
    table = "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td></tr>" for a, b in rows)
    observed = "human rating" if cal["basis"].endswith("rating") else "share people preferred the second"
    svg = reliability_svg(cal, lo, hi, observed) if cal["bins"] else ""
    return f'<table class="diagnostics">{table}</table>{svg}'


def card_html(card: Card) -> str:
    img = (f'<img src="{thumbnail_uri(card.image)}" alt="{esc(card.name)}">' if card.image is not None
           else '<p class="muted">image could not be decoded</p>')  # fmt: skip
    human = "" if card.human_rank is None else f"human rank {card.human_rank:g} · "
    human += "" if card.human_rating is None else f"rating {card.human_rating:g} · "
    note = f" · <b>{esc(card.note)}</b>" if card.note else ""
    texts = "".join(
        f"<p class='muted'>{esc(label)}</p><pre>{esc(text)}</pre>" for label, text in card.rollouts
    )
    reasoning = (f"<details><summary>reasoning ({len(card.rollouts)})</summary>{texts}</details>"
                 if card.rollouts else "")  # fmt: skip
    return (f'<div class="card">{img}<div class="name">{esc(card.name)}</div>'
            f"<div>{human}soft {card.soft:.3f} · hard {card.hard:g}{note}</div>{reasoning}</div>")  # fmt: skip


def page(title: str, facts: list[tuple[str, str]], prompts: list[tuple[str, str, list[Card]]],
         metrics: dict | None = None, diagnostics: dict | None = None, scale: tuple[float, float] = (0, 1)) -> str:  # fmt: skip
    """The whole page: ``facts`` (label, value) on top, the tables, then ``prompts`` as
    ``(group id, prompt, cards)`` in order."""
    parts = [f"<h1>{esc(title)}</h1>", "<table class='facts'>"]
    parts += [f"<tr><td>{esc(a)}</td><td>{esc(b)}</td></tr>" for a, b in facts]
    parts.append("</table>")
    if metrics:
        parts += ["<h2>Accuracy (%)</h2>", accuracy_table(metrics)]
    if diagnostics:
        parts += ["<h2>Judge diagnostics</h2>", diagnostics_block(diagnostics, *scale)]
    parts.append(f"<h2>Prompts ({len(prompts)})</h2>")
    for group_id, prompt, cards in prompts:
        parts.append(f'<section class="prompt"><h3>{esc(prompt)}</h3><p class="muted">{esc(group_id)} · '
                     f'{len(cards)} images, best soft score first</p><div class="cards">'
                     f'{"".join(card_html(c) for c in cards)}</div></section>')  # fmt: skip
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")  # fmt: skip


def load_or_none(ref) -> Image.Image | None:
    """An ``ImageRef`` decoded again for its thumbnail; None if it no longer decodes."""
    from data.images import BadImageError

    try:
        return ref.load()
    except BadImageError:
        return None


def evaluation_page(report: dict, results: list, kept: list) -> str:
    """The page of one evaluation (``eval.evaluate``): its report, then every prompt."""
    k = report["k"]
    prompts = []
    for result, (group, keep) in zip(results, kept):
        images = [load_or_none(group.images[i]) for i in keep]
        names = [Path(str(group.images[i])).name for i in keep]
        ranks = [group.ranks[i] for i in keep]
        ratings = [group.ratings[i] for i in keep] if len(group.ratings) == len(group.images) else None
        prompts.append((result.group_id, result.prompt, cards_of(result, k, images, names, ranks, ratings)))
    facts = [("model", report.get("model") or report.get("label") or ""), ("dataset", report["kind"]),
             ("method", report["method"] + (" (position-debiased)" if report["debias"] else "")),
             ("rollouts per question (k)", str(k)),
             ("prompts / images / pairs", f"{report['n_groups']} / {report['n_images']} / {report['pairs']}"),
             ("official protocol", report["primary_metric"]), ("skipped", str(report["skipped"] or "nothing"))]  # fmt: skip
    scale = report["rating_values"] or [0, 1]
    lo, hi = (min(scale), max(scale)) if report["method"] == "rating" else (0, 1)
    title = f"Evaluation: {report.get('label') or report.get('model') or 'model'} on {report['kind']}"
    return page(title, facts, prompts, report["metrics"], report.get("diagnostics"), (lo, hi))
