"""`evomerge report`: one self-contained HTML page about a run.

The page holds the exported best (the selection race's winner, or the best
dev fitness) beside the best default merge, with their dev, selection and
held-out scores and the paired held-out verdict; the search's progress
against the baselines, dev against held-out scores, the Pareto front
(multi-objective runs), the best search recipe's parameters per layer and per
source, its route (data-flow runs), the top trials and the run's metadata.
Figures are PNGs drawn with matplotlib's Agg renderer and embedded as data
URIs: the file reads offline, in any browser, with JavaScript off. A small
inline script only records, for tests and the curious, how many images
rendered (``body[data-images]``) and any script errors (``html[data-errors]``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from evomerge.app.export import Scores, describe_recipe, read_scores
from evomerge.app.pareto import pareto_front, share_references, shares
from evomerge.engine.folder import atomic_write
from evomerge.errors import EvomergeError
from evomerge.fitness.baselines import is_source, source_name
from evomerge.run.record import TrialRecord, best_of, rank_key
from evomerge.run.store import RunStore

REPORT_FILE = "report.html"
_PALETTE = [f"C{i}" for i in (0, 1, 2, 4, 5, 6, 7, 8, 9)]  # C3 (red) marks the search
_ANNOTATE_CELLS = 300  # heat maps with more cells than this get no numbers in them


@dataclass
class _Run:
    """What the page is made of, read once from the run's store."""

    run_dir: Path
    record: dict  # run.yaml
    objectives: list[str]
    directions: list[str]  # per optimizer value: "maximize" or "minimize"
    baselines: list[TrialRecord]  # complete baseline trials, by number
    search: list[TrialRecord]  # complete search trials, by number
    best: TrialRecord | None  # the best search trial by dev fitness
    best_overall: TrialRecord | None  # the best trial by dev fitness, baselines included
    scores: Scores  # the exported best, its rule, the selection race, the verdict
    states: dict[str, int]  # trials the study holds that are not complete, by state
    elapsed: float | None  # seconds searched, over every session (None: not recorded)

    @property
    def multi(self) -> bool:
        return len(self.directions) > 1

    @staticmethod
    def ok(records: list[TrialRecord]) -> list[TrialRecord]:
        return [r for r in records if r.ok]


def _name(record: TrialRecord, default: Any = "") -> Any:
    """A baseline's name, or ``default`` for a trial without one."""
    return record.name if record.name is not None else default


def _reason(record: TrialRecord) -> str:
    """Why a trial failed ("?" when it does not say)."""
    return record.reason if record.reason is not None else "?"


def write_report(run_dir: str | Path, out: str | Path | None = None, top: int = 20) -> Path:
    """Write the HTML report of a run (default ``RUN_DIR/report.html``); return its path.

    Args:
        run_dir: the ``--run-dir`` of a search (finished or still running).
        out: the HTML file to write.
        top: how many search trials the top-trials table lists.
    """
    run = _read(Path(run_dir))
    figures = _figures(run)
    page = _page(run, figures, top)
    out = Path(out) if out is not None else run.run_dir / REPORT_FILE
    atomic_write(out, page)
    return out


# -- reading the run ---------------------------------------------------------


def _read(run_dir: Path) -> _Run:
    if not run_dir.is_dir():
        raise EvomergeError(f"run folder {run_dir} does not exist; pass the --run-dir of a search")
    store = RunStore.open(run_dir)  # refuses folders without a run or whose study is not ready
    scores = read_scores(store)
    search = [r for r in scores.records if r.kind == "search"]
    baselines = [r for r in scores.records if r.kind == "baseline"]
    elapsed = store.run_attr("elapsed_s")
    return _Run(
        run_dir=run_dir,
        record=store.record,
        objectives=store.objectives,
        directions=store.directions,
        baselines=baselines,
        search=search,
        best=best_of(search),
        best_overall=best_of(baselines + search),
        scores=scores,
        states=store.other_states(),
        elapsed=elapsed if isinstance(elapsed, (int, float)) else None,
    )


# -- figures -----------------------------------------------------------------


def _figures(run: _Run) -> list[tuple[str, str, str, bytes | None]]:
    """(id, title, caption, PNG or None) for every figure, in page order."""
    out = [("progress", "Best score against trials", *_progress(run))]
    out.append(("heldout", "Dev against held-out", *_heldout(run)))
    if run.multi:
        out.append(("pareto", "Pareto front", *_pareto(run)))
    recipe = run.best.recipe if run.best is not None else None
    out.append(("recipe", "Best search recipe per layer and source", *_heatmap(run, recipe)))
    if recipe is not None and recipe.get("route"):
        out.append(("route", "Route of the best search recipe", *_route(run, recipe)))
    return out


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float, height: float):
    # A bare Figure, not pyplot: no global state, no GUI backend, nothing to close.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _progress(run: _Run) -> tuple[str, bytes | None]:
    from matplotlib.ticker import MaxNLocator

    ok = run.ok(run.search)
    if not run.search:
        return "No search trial has finished yet.", None
    fig = _figure(9, 4.2)
    ax = fig.add_subplot()
    full = [r for r in ok if r.complete]
    xs = [r.number for r in full]
    ys = [r.fitness for r in full]
    if full:
        ax.scatter(xs, ys, s=14, color="0.55", label="search trial", zorder=2)
        running = [max(ys[: i + 1]) for i in range(len(ys))]
        ax.step(xs, running, where="post", color="C3", lw=2, label="best so far", zorder=3)
    stopped = [r for r in ok if r.stopped]
    if stopped:
        ax.scatter(
            [r.number for r in stopped],
            [r.fitness for r in stopped],
            s=14,
            facecolors="none",
            edgecolors="0.55",
            label="stopped early (estimate)",
            zorder=2,
        )
    colors = _colors(run)
    for baseline in run.ok(run.baselines):
        ax.axhline(
            baseline.fitness, ls="--", lw=1, color=colors[_name(baseline)], label=_name(baseline, baseline.number)
        )
    scored = {r.number for r in ok}
    failed = [r.number for r in run.search if r.number not in scored]
    if failed:
        low = ax.get_ylim()[0]
        ax.scatter(failed, [low] * len(failed), marker="x", color="C3", label="failed (penalised)", clip_on=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    rule = {"sum": "the weighted sum", "mean": "the weighted mean", "min": "the worst term", "softmin": "a soft min"}
    what = rule.get(run.scores.rules["eval"].rule, "")
    ax.set_ylabel("fitness (dev)" + (f", {what}" if len(run.objectives) > 1 and what else ""))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    caption = f"{len(run.search)} search trials; the line is the best fitness so far"
    caption += ", dashed lines are the baselines." if run.baselines else "."
    caption += f" {len(failed)} failed trials sit on the bottom axis." if failed else ""
    caption += f" {len(stopped)} trials stopped early (hollow): their fitness is estimated." if stopped else ""
    return caption, _png(fig)


def _heldout(run: _Run) -> tuple[str, bytes | None]:
    points = [r for r in run.ok(run.baselines + run.search) if r.heldout_fitness is not None]
    if not points:
        if run.record.get("config", {}).get("heldout") is None:
            return "The run's config has no held-out set.", None
        return "No held-out score yet: the search scores its best recipe on the held-out set when it ends.", None
    fig = _figure(7.5, 4.6)
    ax = fig.add_subplot()
    dev = [r.fitness for r in points]
    held = [r.heldout_fitness for r in points]
    gap = max(0.0, min(held) - max(dev), min(dev) - max(held))
    if gap <= 0.5 * max(abs(v) for v in dev + held):  # scores of one scale: a square plot with its diagonal
        lo, hi = min(dev + held), max(dev + held)
        pad = 0.08 * (hi - lo) or 0.05 * abs(hi) or 0.05
        ax.axline((lo, lo), (hi, hi), ls=":", color="0.6", label="held-out = dev")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
    colors = _colors(run)
    for record, x, y in zip(points, dev, held):
        if record.kind == "baseline":
            ax.scatter([x], [y], marker="s", s=40, color=colors[_name(record)], label=record.name, zorder=3)
        else:
            label = f"search trial {record.number}" + (" (exported)" if _is_chosen(run, record) else "")
            ax.scatter([x], [y], marker="*", s=180, color="C3", label=label, zorder=4)
    ax.set_xlabel("dev fitness")
    ax.set_ylabel("held-out fitness")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    caption = "The baselines and the best search recipe are scored on the held-out set, which the search never sees."
    if not any(r.kind == "search" for r in points) and run.best_overall is not None:
        caption += (
            " No search trial has a held-out score yet: the best trial of the run is a baseline, "
            "or the search has not finished."
        )
    return caption, _png(fig)


def _colors(run: _Run) -> dict[str, str]:
    """A color per baseline name, the same in every figure: the sources in the
    config's order first (a route colors each model as its source's baseline),
    then the default merges. Red (C3) is the search's."""
    cfg = run.record.get("config", {})
    names = [source_name(ref) for ref in [cfg.get("base_model"), *cfg.get("models", [])] if ref]
    names += [_name(r) for r in run.baselines]
    return {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(dict.fromkeys(names))}


def _pareto(run: _Run) -> tuple[str, bytes | None]:
    trials = run.ok(run.baselines + run.search)
    if not trials:
        return "No successful trial yet.", None
    values = [list(r.told) for r in trials]
    front = set(pareto_front(values, run.directions))
    names = (
        run.objectives if len(run.objectives) == len(run.directions) else [f"value {i}" for i in range(len(values[0]))]
    )
    rule = run.scores.rules["eval"]
    references = share_references(trials, rule)
    labels = {}
    for n in front:
        kept = shares(trials[n], references, rule)
        tail = "/".join(f"{100 * kept[o]:.0f}" for o in names if o in kept)
        labels[n] = f"{trials[n].number}" + (f" ({tail}%)" if tail else "")
    pairs = list(combinations(range(len(run.directions)), 2))
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig = _figure(5.2 * cols, 4.3 * rows)
    for k, (i, j) in enumerate(pairs):
        ax = fig.add_subplot(rows, cols, k + 1)
        for group, style in (
            ([n for n, r in enumerate(trials) if r.kind == "search"], {"color": "0.6", "s": 16}),
            ([n for n, r in enumerate(trials) if r.kind == "baseline"], {"color": "C0", "marker": "s"}),
        ):
            ax.scatter([values[n][i] for n in group], [values[n][j] for n in group], zorder=2, **style)
        on = sorted(front, key=lambda n: values[n][i])
        ax.scatter([values[n][i] for n in on], [values[n][j] for n in on], color="C3", s=40, zorder=3)
        if len(run.directions) == 2:
            ax.plot([values[n][i] for n in on], [values[n][j] for n in on], color="C3", lw=1.2, zorder=3)
        for n in on:
            ax.annotate(
                labels[n],
                (values[n][i], values[n][j]),
                xytext=(4, 3),
                textcoords="offset points",
                fontsize=7,
            )
        ax.set_xlabel(f"{names[i]} ({'higher' if run.directions[i] == 'maximize' else 'lower'} is better)")
        ax.set_ylabel(f"{names[j]} ({'higher' if run.directions[j] == 'maximize' else 'lower'} is better)")
        ax.grid(alpha=0.3)
    ax.scatter([], [], color="0.6", s=16, label="search trial")
    ax.scatter([], [], color="C0", marker="s", label="baseline")
    ax.scatter([], [], color="C3", s=40, label="Pareto front (trial number)")
    ax.legend(fontsize=8, loc="best")
    caption = f"{len(front)} of {len(trials)} successful trials (baselines included) are on the front."
    if any("%" in label for label in labels.values()):
        caption += (
            " Each point is labelled with its trial number and the share it keeps of each objective's reference "
            "(its normalize reference, else the best source's dev score), in the order "
            + ", ".join(o for o in names if o in references)
            + "; evomerge export --pick max-min exports the point whose smallest share is largest."
        )
    return caption, _png(fig)


def _setting(raw: Any) -> Any:
    """A stored (JSON) parameter setting as the recipe model holds it."""
    from evomerge.engine.recipe import Conditional

    if isinstance(raw, dict):
        return Conditional.model_validate(raw)
    if isinstance(raw, list) and raw and isinstance(raw[0], dict):
        return [Conditional.model_validate(r) for r in raw]
    return raw


def layer_rows(recipe: dict, num_layers: int) -> list[tuple[str, list[float]]]:
    """Every numeric parameter of a recipe, resolved at each of ``num_layers``
    layers: (label, values). Gradients interpolate as in mergekit (a list of k
    values spread linearly over the depth); a filtered setting gives one row
    per filter; booleans and strings are left out."""
    from evomerge.engine.recipe import Conditional, evaluate_setting

    scopes = [("all models", recipe.get("parameters"))]
    scopes += [(Path(s["model"]).name, s.get("parameters")) for s in recipe.get("sources", [])]
    rows = []
    for who, settings in scopes:
        for name, raw in (settings or {}).items():
            setting = _setting(raw)
            parts = (
                setting if isinstance(setting, list) and setting and isinstance(setting[0], Conditional) else [setting]
            )
            for part in parts:
                label = f"{who}: {name}"
                if isinstance(part, Conditional):
                    label += f" [{part.filter or 'rest'}]" if len(parts) > 1 or part.filter else ""
                    part = part.value
                values = [
                    evaluate_setting(part, "", k / (num_layers - 1) if num_layers > 1 else 1.0, lambda v: v)
                    for k in range(num_layers)
                ]
                if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                    rows.append((label, [float(v) for v in values]))
    return rows


def _num_layers(run: _Run, recipe: dict) -> int:
    """The merge's depth: from the first source's config.json, else the longest gradient."""
    root = Path(run.record.get("config_path", ".")).parent
    for ref in [s["model"] for s in recipe.get("sources", [])]:
        path = Path(ref) if Path(ref).is_absolute() else root / ref
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            continue
        n = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
        if isinstance(n, int) and n > 0:
            return n
    from evomerge.engine.recipe import gradient_lengths

    scopes = [recipe.get("parameters"), *(s.get("parameters") for s in recipe.get("sources", []))]
    return max(
        (n for settings in scopes for raw in (settings or {}).values() for n in gradient_lengths(_setting(raw))),
        default=1,
    )


def _heatmap(run: _Run, recipe: dict | None) -> tuple[str, bytes | None]:
    if recipe is None:
        return "No successful search trial yet.", None
    if recipe.get("slices"):
        return "The best recipe is built from slices; its per-slice parameters are not drawn.", None
    if not recipe.get("method"):
        return "The best recipe is a route only: it merges nothing, so it has no per-layer weights.", None
    n = _num_layers(run, recipe)
    rows = layer_rows(recipe, n)
    if not rows:
        return f"The best recipe ({recipe['method']}) has no numeric parameters.", None
    import numpy as np

    grid = np.array([values for _, values in rows])  # (parameters x sources, layers)
    fig = _figure(min(16.0, 3.5 + 0.45 * n), 1.4 + 0.42 * len(rows))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    step = max(1, n // 32)
    ax.set_xticks(range(0, n, step), [str(k) for k in range(0, n, step)], fontsize=8)
    ax.set_xlabel("layer")
    if grid.size <= _ANNOTATE_CELLS:
        mid = (grid.max() + grid.min()) / 2
        for (r, c), v in np.ndenumerate(grid):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > mid else "white")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    method = recipe["method"]
    caption = (
        f"Search trial {run.best.number} ({method}): each row is one parameter of one source, resolved at every layer."
    )
    chosen = run.scores.chosen
    if chosen is not None and chosen.number != run.best.number:
        caption += f" The exported best is trial {chosen.number}, {run.scores.rule_text()}."
    top = run.best_overall
    if top is not None and top.number != run.best.number:
        than = "higher than" if top.fitness > run.best.fitness else "as high as"
        caption += f" Baseline {_name(top, top.number)} scored {than} every search trial."
    return caption, _png(fig)


def _route(run: _Run, recipe: dict) -> tuple[str, bytes | None]:
    from matplotlib.patches import FancyBboxPatch, Patch

    from evomerge.engine.recipe import MERGED

    route = recipe["route"]
    steps = route["layers"]
    models = list(dict.fromkeys(s["model"] for s in steps))
    # Each model in the color of its source's baseline; the merge in red, as the search.
    named = _colors(run)
    spare = iter(c for c in _PALETTE[::-1] if c not in named.values())
    color = {m: named.get(source_name(m)) or next(spare, "0.5") for m in models if m != MERGED}
    color[MERGED] = "C3"
    embed = route.get("embed") or steps[0]["model"]
    head = route.get("head") or steps[-1]["model"]
    boxes = [("embed", embed, None), *((f"L{s['layer']}", s["model"], s.get("scale", 1.0)) for s in steps)]
    boxes.append(("head", head, None))
    per_row = 12
    rows = math.ceil(len(boxes) / per_row)
    fig = _figure(13, 0.6 + 1.25 * rows)
    ax = fig.add_subplot()
    for k, (text, model, scale) in enumerate(boxes):
        x, y = (k % per_row) * 1.3, -(k // per_row) * 1.5
        plain = scale is None
        ax.add_patch(
            FancyBboxPatch(
                (x, y),
                1.0,
                0.8,
                boxstyle="round,pad=0.02",
                facecolor="white" if plain else color[model],
                edgecolor=color.get(model, "0.3"),
                lw=2 if plain else 1,
                alpha=1.0 if plain else 0.85,
            )
        )
        ax.text(x + 0.5, y + 0.4, text, ha="center", va="center", fontsize=9, color="black" if plain else "white")
        if scale is not None and scale != 1.0:
            ax.text(x + 0.5, y - 0.18, f"x{scale:.2f}", ha="center", va="center", fontsize=8)
        if k + 1 < len(boxes) and (k + 1) % per_row:
            ax.annotate("", (x + 1.28, y + 0.4), (x + 1.02, y + 0.4), arrowprops={"arrowstyle": "->", "color": "0.4"})
    ax.set_xlim(-0.1, per_row * 1.3)
    ax.set_ylim(-(rows - 1) * 1.5 - 0.4, 0.9)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(
        handles=[Patch(color=color[m], label=Path(m).name) for m in models],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(6, len(models)),
        fontsize=8,
        frameon=False,
    )
    scaled = sum(1 for s in steps if s.get("scale", 1.0) != 1.0)
    caption = (
        f"{len(steps)} layers in order (left to right, then down), colored by model; "
        f"{scaled} steps scale their input (x s below the box)."
    )
    return caption, _png(fig)


# -- the page ----------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best { background: #fff4e0; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; height: auto; }
code { font-size: 0.9em; }
"""

# Optional: records whether every image rendered, and any script error; the
# page reads the same without it.
_SCRIPT = """
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    errors.push(e.message || "failed to load " + ((e.target && e.target.tagName) || "a resource"));
    document.documentElement.setAttribute("data-errors", errors.join(" | "));
  }, true);
  window.addEventListener("load", function () {
    var images = document.images, shown = 0;
    for (var i = 0; i < images.length; i++) {
      if (images[i].complete && images[i].naturalWidth > 0) shown++;
    }
    document.body.setAttribute("data-images", shown + "/" + images.length);
  });
})();
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _table(header: list[str], rows: list[tuple[str, list[tuple[str, bool]]]]) -> str:
    """rows: (tr attributes, [(cell text, numeric)])."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        f"<tr{attrs}>" + "".join(f"<td{' class=num' if num else ''}>{_esc(c)}</td>" for c, num in cells) + "</tr>"
        for attrs, cells in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _score_cells(run: _Run, record: TrialRecord) -> list[tuple[str, bool]]:
    fitness = _num(record.fitness)
    if record.stopped and record.fitness_se is not None:
        fitness += f" ±{1.96 * record.fitness_se:.4f}"  # the estimate's error against the full-dev fitness
    cells = [(fitness, True), (str(record.documents) if record.documents is not None else "-", True)]
    if len(run.objectives) > 1:
        cells += [(_num(record.values.get(o)), True) for o in run.objectives]
    selection = run.scores.selection(record)
    cells.append((_num(selection.value if selection is not None else None), True))
    cells.append((_num(record.heldout_fitness), True))
    return cells


def _score_header(run: _Run) -> list[str]:
    return ["fitness", "docs", *(run.objectives if len(run.objectives) > 1 else []), "selection", "held-out"]


def _is_chosen(run: _Run, record: TrialRecord) -> bool:
    return run.scores.chosen is not None and record.number == run.scores.chosen.number


def _row_attrs(run: _Run, record: TrialRecord) -> str:
    return f' data-trial="{record.number}"' + (' class="best"' if _is_chosen(run, record) else "")


def _top_table(run: _Run, top: int) -> str:
    # Trials scored on every dev document first; those stopped early (their
    # fitness an estimate) after them.
    ok = run.ok(run.search)
    ranked = [*sorted((r for r in ok if r.complete), key=rank_key), *sorted((r for r in ok if r.stopped), key=rank_key)]
    ranked = ranked[:top]
    if not ranked:
        return "<p>No successful search trial yet.</p>"
    front = set()
    if run.multi:
        ok = run.ok(run.baselines + run.search)
        front = {ok[i].number for i in pareto_front([list(r.told) for r in ok], run.directions)}
    header = ["rank", "trial", *_score_header(run), *(["Pareto"] if run.multi else []), "status", "recipe"]
    rows = []
    for rank, r in enumerate(ranked, 1):
        cells = [(str(rank), True), (str(r.number), True), *_score_cells(run, r)]
        if run.multi:
            cells.append(("yes" if r.number in front else "", False))
        status = "stopped early" if r.stopped else "ok"
        cells += [(status + (" (cached)" if r.cached else ""), False), (describe_recipe(r.recipe), False)]
        rows.append((_row_attrs(run, r), cells))
    return _table(header, rows) + _highlight_note(run, ranked)


def _baseline_table(run: _Run) -> str:
    if not run.baselines:
        return "<p>This run scored no baselines.</p>"
    rows = []
    for baseline in run.baselines:
        if baseline.status == "ok":
            cells = [*_score_cells(run, baseline), ("ok", False)]
        else:
            cells = [("-", True)] * len(_score_header(run)) + [(f"failed: {_reason(baseline)[:80]}", False)]
        rows.append((_row_attrs(run, baseline), [(str(baseline.number), True), (_name(baseline), False), *cells]))
    return _table(["trial", "baseline", *_score_header(run), "status"], rows) + _highlight_note(run, run.baselines)


def _highlight_note(run: _Run, records: list[TrialRecord]) -> str:
    if not any(_is_chosen(run, r) for r in records):
        return ""
    return f"<p>The highlighted row is the exported best (trial {run.scores.chosen.number}).</p>"


def _failed_table(run: _Run, limit: int = 20) -> str:
    scored = {r.number for r in run.ok(run.search)}
    failed = [r for r in run.search if r.number not in scored]
    if not failed:
        return ""
    rows = [(f' data-trial="{r.number}"', [(str(r.number), True), (_reason(r)[:200], False)]) for r in failed[:limit]]
    more = f"<p>and {len(failed) - limit} more.</p>" if len(failed) > limit else ""
    return "<h3>Failed search trials</h3>" + _table(["trial", "reason"], rows) + more


def _summary(run: _Run) -> str:
    ok = run.ok(run.search)
    cached = sum(1 for r in ok if r.cached)
    failed = len(run.search) - len(ok)
    stopped = sum(1 for r in ok if r.stopped)
    items = [f"{len(run.search)} search trials: {len(ok)} scored ({cached} from the cache), {failed} failed"]
    config = run.record.get("config") or {}
    if stopped or any((config.get(k) or {}).get("enabled") for k in ("early_stop", "fidelity")):
        items[0] += f", {stopped} stopped early" + (
            " (their fitness estimated on part of the documents, ± its 95% interval against the full-dev fitness)"
            if stopped
            else ""
        )
    scored = [r for r in ok if not r.cached and r.documents]
    if scored:
        items.append(
            f"dev documents scored: {sum(r.documents for r in scored):,} by search trials, "
            f"{sum(r.documents for r in scored) / len(scored):.0f} per candidate"
        )
    states = run.states
    if states:
        items.append(
            "not complete in the study: "
            + ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
            + " (fail: interrupted or stale; running: being scored)"
        )
    base_ok = [r.fitness for r in run.ok(run.baselines)]
    items.append(f"{len(run.baselines)} baselines" + (f", best {max(base_ok):.4f}" if base_ok else ""))
    scores, chosen = run.scores, run.scores.chosen
    if chosen is not None:
        items.append(f"exported best: {_who(chosen)}, {scores.rule_text()}; {_estimates(run, chosen)}")
    best = run.best
    if best is not None and (chosen is None or best.number != chosen.number):
        text = f"best search trial by dev fitness: trial {best.number}, fitness {best.fitness:.4f}"
        if best.heldout_fitness is not None:
            text += f", held-out {best.heldout_fitness:.4f}"
        items.append(text)
    if scores.verdict is not None:
        items.append(f"verdict: {scores.verdict.line()}")
    return "<ul>" + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul>"


def _who(record: TrialRecord) -> str:
    return f"trial {record.number}" + (f" ({record.name})" if record.kind == "baseline" else "")


def _estimates(run: _Run, record: TrialRecord) -> str:
    """Dev, selection and held-out fitness, with their 95% intervals where known."""
    scores = run.scores
    parts = [
        ("dev", scores.dev(record)),
        ("selection", scores.selection(record)),
        ("held-out", scores.heldout(record)),
    ]
    return ", ".join(f"{name} {value if value is not None else '-'}" for name, value in parts)


def _chosen_section(run: _Run) -> str:
    """The exported best beside the best default merge (and the best search
    trial by dev fitness when the race chose another), with intervals."""
    scores, chosen = run.scores, run.scores.chosen
    if chosen is None:
        return "<p>No trial has been scored on every dev document yet.</p>"
    default = best_of([r for r in run.baselines if not is_source(r.name)])
    picks = [("exported best", chosen)]
    if default is not None:
        picks.append(("best default merge (by dev fitness)", default))
    if run.best is not None:
        picks.append(("best search trial by dev fitness", run.best))
    rows, seen = [], set()
    for role, r in picks:
        if r.number in seen:
            continue
        seen.add(r.number)
        what = _name(r) if r.kind == "baseline" else f"search ({describe_recipe(r.recipe)})"
        cells = [(role, False), (str(r.number), True), (what, False)]
        for value in (scores.dev(r), scores.selection(r), scores.heldout(r)):
            cells.append((str(value) if value is not None else "-", True))
        rows.append((' class="best"' if _is_chosen(run, r) else "", cells))
    table = _table(["", "trial", "what", "dev", "selection", "held-out"], rows)
    text = f"<p>Trial {chosen.number} is exported, {_esc(scores.rule_text())}. "
    text += "Scores are fitness with its 95% interval where per-document scores exist"
    text += (
        "; a selection score is on the documents the trial reached in the race.</p>" if scores.selections else ".</p>"
    )
    return text + table


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _metadata(run: _Run) -> str:
    rec, cfg = run.record, run.record.get("config", {})

    def compact(d: Any) -> str:
        if isinstance(d, dict):
            return ", ".join(f"{k}: {v}" for k, v in d.items() if v is not None)
        return str(d)

    def objectives(section: dict | None) -> str:
        if not section:
            return "none"
        return "; ".join(
            f"{o.get('task') or o.get('perplexity') or o.get('custom')} {o.get('metric') or ''} "
            f"({o.get('direction')}, weight {o.get('weight')})"
            for o in section.get("objectives", [])
        )

    space = cfg.get("space")
    rows = [
        ("config", rec.get("config_path")),
        ("config fingerprint", rec.get("config_fingerprint")),
        ("space fingerprint", rec.get("space_fingerprint")),
        ("space", space if isinstance(space, str) else json.dumps(space)),
        ("base model", cfg.get("base_model") or "none"),
        ("models", ", ".join(cfg.get("models", []))),
        ("driver", compact(cfg.get("driver", {}))),
        ("budget", compact(cfg.get("budget", {}))),
        ("elapsed", _duration(run.elapsed) if run.elapsed is not None else "unknown"),
        ("dev objectives", objectives(cfg.get("eval"))),
        ("held-out objectives", objectives(cfg.get("heldout"))),
        ("selection race", compact(cfg["select"]) if cfg.get("select") else "none"),
        ("early stopping", compact(cfg["early_stop"]) if (cfg.get("early_stop") or {}).get("enabled") else "off"),
        ("executor", (cfg.get("executor") or {}).get("name")),
        ("seed", cfg.get("seed")),
        ("storage", rec.get("storage")),
    ]
    body = "".join(f"<tr><th>{_esc(k)}</th><td><code>{_esc(v)}</code></td></tr>" for k, v in rows if v is not None)
    return f"<table>{body}</table>"


def _page(run: _Run, figures, top: int) -> str:
    import evomerge

    parts = []
    for fig_id, title, caption, png in figures:
        parts.append(f"<h2 id='{fig_id}'>{_esc(title)}</h2>")
        if png is None:
            parts.append(f"<p>{_esc(caption)}</p>")
            continue
        data = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<figure><img id='fig-{fig_id}' alt='{_esc(title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_esc(caption)}</figcaption></figure>"
        )
    title = f"evomerge report: {run.run_dir.resolve().name}"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
<script>{_SCRIPT}</script>
</head>
<body>
<h1>{_esc(title)}</h1>
<p>Run folder <code>{_esc(run.run_dir.resolve())}</code>; written {_esc(time.strftime("%Y-%m-%d %H:%M"))}
by evomerge {_esc(evomerge.__version__)}.</p>
{_summary(run)}
<h2 id="chosen">Exported best</h2>
{_chosen_section(run)}
{"".join(parts)}
<h2 id="top">Top search trials</h2>
{_top_table(run, top)}
<h2 id="baselines">Baselines</h2>
{_baseline_table(run)}
{_failed_table(run)}
<h2 id="metadata">Run</h2>
{_metadata(run)}
</body>
</html>
"""
