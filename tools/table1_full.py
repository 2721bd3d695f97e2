"""Table 1's paper-model rows from the full-protocol runs, into their table and the README.

    python tools/table1_full.py          # write results/citation/full/<ds>/table1.md and the cells
    python tools/table1_full.py --check  # exit 1 if the README's or reproducing.md's are stale

The paper's protocol for the paper-model rows runs in ``results/citation/full/<dataset>/``,
and on a machine with spare cores in more workers beside it, ``<dataset>-<name>/`` (each a
resumable ``rbp citation`` run over some of the seeds). This merges each dataset's runs
(``rbp.apps.citation.tables.merge_runs``: per (method, seed) one record), writes the merged
``table1.md`` into ``results/citation/full/<dataset>/``, and puts the merged cells (mean ± sample
std, n, epochs) into the README's Table 1 for the datasets whose full run has finished a seed,
with the sentence that names the orderings that differ from the paper's and their paired
intervals. The merged run of ``results/citation`` (our models and the baselines, which the
README's Table 1 and Fig. 3 point to) gets the same paper-model entries, its ``table1.md`` and
``fig3_<dataset>.png`` redrawn.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from rbp.apps.citation.tables import _fmt, merge_runs, paired_differences, write_table1

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"bptt": "BPTT", "tbptt": "TBPTT", "rbp": "RBP", "cg": "CG-RBP",
          "neumann": "Neumann-RBP", "gmres": "GMRES-RBP"}
DATASETS = ("cora", "pubmed")  # the README's column order
PROTOCOL_SEEDS = 10           # the paper's protocol: seeds 0-9 per (dataset, method)


def _read_run(path: Path) -> dict[str, Any]:
    """A run's ``results.json``; a damaged one ends the tool in one line naming it."""
    try:
        res = json.loads(path.read_text())
    except ValueError as exc:
        raise SystemExit(f"table1_full: {path} is not valid JSON ({exc}); restore it "
                         "(git checkout) or rerun that run with --resume") from None
    if not isinstance(res, dict) or not isinstance(res.get("datasets") or {}, dict):
        raise SystemExit(f"table1_full: {path} is not a citation run's results (no "
                         "'datasets' mapping); restore it (git checkout) or rerun that run")
    return res


def merged(dataset: str, full: Path) -> dict[str, Any] | None:
    """The runs of ``dataset`` (its folder and its workers' ``<dataset>-*``) merged, or None
    when none has finished a paper-model seed."""
    runs = []
    for folder in sorted([full / dataset, *full.glob(f"{dataset}-*")]):
        path = folder / "results.json"
        if path.is_file():
            res = _read_run(path)
            if dataset in (res.get("datasets") or {}):
                runs.append(res)
    if not runs:
        return None
    try:
        out = merge_runs(runs)
    except (AttributeError, KeyError, TypeError) as exc:
        raise SystemExit(f"table1_full: the {dataset} runs in {full} do not have a citation "
                         f"run's layout ({type(exc).__name__}: {exc}); restore their "
                         "results.json (git checkout) or rerun them") from None
    paper = out["datasets"].get(dataset, {}).get("models", {}).get("paper")
    return out if paper else None


def ordering_clause(results: dict[str, Any], dataset: str) -> str:
    """``on Cora ...``: the pairs whose order differs from the paper's, with their intervals."""
    name = dataset.capitalize()
    pairs = paired_differences(results, dataset)
    if not pairs:
        return f"on {name} none"
    parts = [f"{LABELS[p['a']]} against {LABELS[p['b']]} ({p['mean']:+.1f} ± {p['std']:.1f} "
             f"points, n = {p['n']}, 95 % interval [{p['ci'][0]:+.1f}, {p['ci'][1]:+.1f}]: "
             f"{'a real difference' if p['real'] else 'no difference at this n'})"
             for p in pairs]
    return f"on {name} {'only ' if len(parts) == 1 else ''}{'; '.join(parts)}"


def update_cells(text: str, dataset: str, results: dict[str, Any]) -> str:
    """``text`` with ``dataset``'s paper-model cells of Table 1 set."""
    column = 2 + 2 * DATASETS.index(dataset)  # | method | cora (paper) | cora (ours) | ...
    paper = results["datasets"][dataset]["models"]["paper"]
    for method, summary in paper.items():
        row = re.compile(r"^\| " + re.escape(LABELS[method]) + r" \|.*\|$", re.M)
        found = row.search(text)
        if found is None:
            raise ValueError(f"the README has no Table 1 row {LABELS[method]!r}")
        cells = found.group(0).split(" | ")
        cells[column] = _fmt(summary) if column < len(cells) - 1 else _fmt(summary) + " |"
        text = text[: found.start()] + " | ".join(cells) + text[found.end():]
    return text


# a clause ends in ")" (its interval) or "none"; ", so far" while seeds are missing
SENTENCE = re.compile(r"(?<=excludes 0: )on [A-Z][a-z]+ [^|#]{0,1600}?(?:, so far\.|\)\.|none\.)")


def complete(runs: dict[str, dict[str, Any]]) -> bool:
    """Whether every dataset of Table 1 has a full run with every method at the protocol's
    seeds (then the ordering sentence is final)."""
    for ds in DATASETS:
        paper = runs.get(ds, {}).get("datasets", {}).get(ds, {}).get("models", {}).get("paper")
        if not paper or len(paper) < len(LABELS) or any(
                m.get("n", 0) < PROTOCOL_SEEDS for m in paper.values()):
            return False
    return True


def update_sentence(text: str, runs: dict[str, dict[str, Any]]) -> str:
    """``text`` with the sentence that names, per dataset with a full run, the orderings that
    differ from the paper's (``excludes 0: on Cora ...; on Pubmed ....``, with ``, so far``
    before the full stop until every cell has the protocol's seeds)."""
    clauses = "; ".join(ordering_clause(res, ds) for ds, res in runs.items())
    end = "." if complete(runs) else ", so far."
    new, n = SENTENCE.subn(lambda _: clauses + end, text, count=1)
    if n != 1:
        raise ValueError("the README's Table 1 text has no 'excludes 0: on <dataset> ....' "
                         "sentence to update")
    return new


def with_full_runs(top: dict[str, Any], runs: dict[str, dict[str, Any]],
                   sources: list[str]) -> dict[str, Any]:
    """The merged Table 1 run of ``results/citation`` (``top``: our models, the baselines)
    with its paper-model entries replaced by the full-protocol runs' (``runs``; the curves of
    the first seed only, which Fig. 3 draws), and the runs' ``results.json`` named in its
    ``merged_from``. The entries it replaces the first time go to ``earlier_paper_runs``
    (without curves)."""
    out = json.loads(json.dumps(top))
    for dataset, results in runs.items():
        paper = json.loads(json.dumps(results["datasets"][dataset]["models"]["paper"]))
        for method in paper.values():  # Fig. 3 draws the first seed: the runs keep the rest
            for unit in (method.get("per_seed") or [])[1:]:
                unit.pop("curves", None)
                unit.pop("traces", None)
        entry = out.setdefault("datasets", {}).setdefault(dataset, {"models": {}})
        before = entry.setdefault("models", {}).get("paper")
        if before and before != paper and dataset not in out.get("earlier_paper_runs", {}):
            # the runs this merge held before the full protocol's (Pubmed: the scaled 120-epoch
            # run), kept without their curves: nothing computed is lost
            out.setdefault("earlier_paper_runs", {})[dataset] = _without_curves(before)
        entry["models"]["paper"] = paper
    merged_from = out.setdefault("merged_from", [])
    merged_from += [s for s in sources if s not in merged_from]
    return out


def _without_curves(paper: dict[str, Any]) -> dict[str, Any]:
    """A copy of a model's per-method entries without the per-seed curves and traces."""
    out = json.loads(json.dumps(paper))
    for method in out.values():
        for unit in method.get("per_seed") or []:
            unit.pop("curves", None)
            unit.pop("traces", None)
    return out


def refresh_merge(root: Path, runs: dict[str, dict[str, Any]], check: bool) -> bool:
    """Bring ``results/citation`` (results.json, table1.md, fig3_<dataset>.png: the merge the
    README's Table 1 and Fig. 3 point to) up to the full-protocol runs; with ``check``,
    change nothing. Whether it was (or would be) changed."""
    top_dir = root / "results" / "citation"
    path = top_dir / "results.json"
    if not runs or not path.is_file():
        return False
    top = _read_run(path)
    full = top_dir / "full"
    sources = sorted(str(f.relative_to(root)) for ds in runs
                     for f in [full / ds / "results.json", *full.glob(f"{ds}-*/results.json")]
                     if f.is_file())
    new = with_full_runs(top, runs, sources)
    if new == top:
        return False
    if not check:
        from rbp.apps.citation.figures import write_figures
        from rbp.runner.results import write_json

        write_json(path, new)
        write_table1(top_dir / "table1.md", new)
        write_figures(top_dir, new)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if the README's cells are stale")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the checkout (README.md, docs/reproducing.md, results/)")
    args = parser.parse_args(argv)
    for page in ("README.md", "docs/reproducing.md"):
        if not (args.root / page).is_file():
            parser.error(f"--root {args.root} has no {page}; pass the checkout's root folder")
    full = args.root / "results" / "citation" / "full"
    runs = {ds: merged(ds, full) for ds in DATASETS}
    runs = {ds: res for ds, res in runs.items() if res is not None}
    pages = {args.root / "README.md": True, args.root / "docs" / "reproducing.md": False}
    updated: dict[Path, str] = {}
    for page, sentence in pages.items():
        text = new = page.read_text()
        try:
            for dataset, results in runs.items():
                new = update_cells(new, dataset, results)
            if sentence and runs:
                new = update_sentence(new, runs)
        except ValueError as exc:  # nothing is written unless every page takes its cells
            print(f"table1_full: {page}: {exc}", file=sys.stderr)
            return 2
        if new != text:
            updated[page] = new
    if args.check:
        for page in updated:
            print(f"{page}: Table 1's paper-model cells differ from the merged runs in {full}; "
                  "run python tools/table1_full.py", file=sys.stderr)
        stale_merge = refresh_merge(args.root, runs, check=True)
        if stale_merge:
            print(f"{full.parent}: the merged Table 1 run holds other paper-model entries than "
                  f"the runs in {full}; run python tools/table1_full.py", file=sys.stderr)
        return 1 if updated or stale_merge else 0
    for page, new in updated.items():
        page.write_text(new)
    for dataset, results in runs.items():
        write_table1(full / dataset / "table1.md", results)
    refresh_merge(args.root, runs, check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
