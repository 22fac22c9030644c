"""The result of a search: its Pareto front, read from (and written to) the run directory.

Reading a run directory imports nothing it names: the front's weights are rebuilt
from the run's built-in or ``hf:`` model spec, or from the model the caller passes,
and a ``package.module:callable`` / ``file.py:callable`` spec recorded in the run is
used only with ``trust_spec=True`` (``--trust-spec``). ``front.json`` and the trial
records are checked as they are read (:meth:`SearchResult.load`,
:meth:`~autorank.search.rundir.RunDir.trial_records`): a path outside the run
directory, an unknown method or a malformed member is refused with one line
naming the file.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Collection, Optional, Union

from torch import nn

from autorank.cost.budget import parse_budget
from autorank.errors import AutorankError
from autorank.export import export_model
from autorank.fileio import DiskFullError
from autorank.plan import Plan
from autorank.report import pareto_indices, plot_front
from autorank.saving import load, metadata
from autorank.search.rundir import RunDir, RunDirError
from autorank.specs import UntrustedSpecError, is_safe_spec, require_trusted
from autorank.tasks import load_task
from autorank.zoo import example_input

logger = logging.getLogger("autorank")

__all__ = ["FrontMember", "SearchResult", "build_front", "PickError"]

PICKS = ("smallest", "best", "knee")


class PickError(AutorankError, ValueError):
    """No front member meets the user's constraints (the message lists the nearest ones)."""


@dataclass
class FrontMember:
    """One Pareto-optimal compressed model."""

    trial: int
    plan: Plan
    score: float
    zero_shot_score: float
    finetuned: bool
    flops: float
    params: float
    flops_ratio: float
    params_ratio: float
    cost_ratio: float
    summary: str = ""
    origin: str = "sampler"
    latency_estimated_s: Optional[float] = None
    latency_measured_s: Optional[float] = None
    weights: Optional[str] = None
    #: the original's measured latency over this member's, measured side by side on the target
    speedup: Optional[float] = None
    #: True when the re-measured latency breaks the run's latency budget (None: no latency budget or not measured)
    latency_breach: Optional[bool] = None
    #: the original's latency measured beside this member (``speedup`` is over this one)
    latency_original_s: Optional[float] = None
    #: how it was recovered (re-fit, block-wise, fine-tune: scores after each, steps, seconds, why it stopped); None: zero-shot
    recovery: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.trial, "score": self.score, "zero_shot_score": self.zero_shot_score, "finetuned": self.finetuned,
            "flops": self.flops, "params": self.params, "flops_ratio": self.flops_ratio, "params_ratio": self.params_ratio,
            "cost_ratio": self.cost_ratio, "summary": self.summary, "origin": self.origin,
            "latency_estimated_s": self.latency_estimated_s, "latency_measured_s": self.latency_measured_s,
            "speedup": self.speedup, "latency_breach": self.latency_breach, "latency_original_s": self.latency_original_s,
            "recovery": self.recovery,
            "weights": self.weights, "plan": self.plan.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "front member") -> "FrontMember":
        """A member from its ``to_dict()``; RunDirError naming ``source`` when it is not one."""
        if not isinstance(d, dict):
            raise RunDirError(f"{source}: expected an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise RunDirError(f"{source}: unknown key(s) {sorted(map(str, unknown))[:5]}")
        d = dict(d)
        for key in ("trial", "plan", "score", "flops", "params", "flops_ratio", "params_ratio", "cost_ratio"):
            if key not in d:
                raise RunDirError(f"{source}: missing {key!r}")
        if not isinstance(d["trial"], int) or isinstance(d["trial"], bool) or d["trial"] < 0:
            raise RunDirError(f"{source}: 'trial' must be a trial number, got {d['trial']!r}")
        for key in ("score", "zero_shot_score", "flops", "params", "flops_ratio", "params_ratio", "cost_ratio"):
            if key in d and not (isinstance(d[key], (int, float)) and not isinstance(d[key], bool) and math.isfinite(d[key])):
                raise RunDirError(f"{source}: {key!r} must be a finite number, got {d[key]!r}")
        for key in ("latency_estimated_s", "latency_measured_s", "speedup", "latency_original_s"):
            v = d.get(key)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise RunDirError(f"{source}: {key!r} must be a number or null, got {v!r}")
        for key in ("summary", "origin"):
            if key in d and not isinstance(d[key], str):
                raise RunDirError(f"{source}: {key!r} must be a string")
        if d.get("recovery") is not None and not isinstance(d["recovery"], dict):
            raise RunDirError(f"{source}: 'recovery' must be an object or null")
        if d.get("latency_breach") is not None and not isinstance(d["latency_breach"], bool):
            raise RunDirError(f"{source}: 'latency_breach' must be true, false or null")
        if "finetuned" in d and not isinstance(d["finetuned"], bool):
            raise RunDirError(f"{source}: 'finetuned' must be true or false")
        d.setdefault("zero_shot_score", d["score"])
        d.setdefault("finetuned", False)
        try:
            d["plan"] = Plan.from_dict(d["plan"], source=source)
        except AutorankError as exc:
            raise RunDirError(str(exc)) from None
        RunDir(".").check_record(d["trial"], {"plan": d["plan"].to_dict()}, source)
        return cls(**d)


@dataclass
class SearchResult:
    """``front`` sorted by cost; ``trials`` every trial record; numbers about the run."""

    run_dir: Path
    budget: str
    cost_metric: str
    base_score: float
    original: dict[str, float]
    front: list[FrontMember]
    trials: list[dict[str, Any]]
    wasted_fraction: float
    original_latency_s: Optional[float] = None
    #: where the front was re-measured: device, batch size, threads, the device's name, the node (see search/latency.py)
    latency: Optional[dict[str, Any]] = None
    model: Optional[nn.Module] = field(default=None, repr=False)
    #: whether the run's own ``module:callable`` / ``file.py:callable`` specs may be imported (``--trust-spec``)
    trust_spec: bool = False
    #: the files the last :meth:`write` produced (front.json and the plots that could be drawn)
    files: list[Path] = field(default_factory=list)
    #: plans that were on the front until their end-to-end measurement broke the latency budget: left out of it, the
    #: trials they had dominated measured in their place (``trial``, ``summary``, ``score``, ``cost_ratio``,
    #: ``latency_measured_s``, ``original_latency_s`` measured beside it, ``limit_s``)
    over_budget: list[dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------------ summaries
    @property
    def best(self) -> Optional[FrontMember]:
        """The front member with the highest score among those whose re-measured latency keeps the budget."""
        within = [m for m in self.front if not m.latency_breach]
        return max(within, key=lambda m: m.score) if within else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget, "cost_metric": self.cost_metric, "base_score": self.base_score,
            "original": self.original, "original_latency_s": self.original_latency_s, "latency": self.latency,
            "wasted_fraction": self.wasted_fraction, "trials": len(self.trials),
            "front": [m.to_dict() for m in self.front], "over_budget": self.over_budget,
        }

    def write(self) -> list[Path]:
        """Write front.json and the plots; returns the files written (a plot that failed is not among them).

        A full disk raises :class:`~autorank.fileio.DiskFullError`; any other plot failure is a warning.
        """
        run = RunDir(self.run_dir)
        written = [run.write_json("front.json", self.to_dict())]
        try:
            paths = plot_front(self.points(), self.run_dir, budget=self.budget_fraction(), cost_label=self.cost_label(),
                               score_label="score", title=f"autorank front — budget {self.budget}")
        except DiskFullError:
            raise
        except Exception as exc:  # plots are a convenience; a missing backend never fails a search
            logger.warning("could not draw the Pareto plot: %s", exc)
        else:
            written += [Path(p) for p in (paths.values() if isinstance(paths, dict) else paths or ())]
        return [p for p in written if p.exists()]

    def cost_label(self) -> str:
        return {"flops": "FLOPs (% of original)", "params": "parameters (% of original)", "latency": "latency (% of original)"}[self.cost_metric]

    def budget_fraction(self) -> Optional[float]:
        for c in parse_budget(self.budget).constraints:
            if c.metric == self.cost_metric:
                return c.value if c.relative else c.value / self.original[c.metric]
        return None

    def points(self) -> list[dict[str, Any]]:
        front = {m.trial: m for m in self.front}
        over = {o["trial"] for o in self.over_budget}
        pts = []
        for r in self.trials:
            if r.get("state") != "COMPLETE" or r.get("duplicate_of") is not None:
                continue
            ft = (r.get("finetune") or {}).get("score")
            m = front.get(r["number"])
            pts.append({
                "trial": r["number"], "cost": r["ratios"][self.cost_metric], "score": ft if ft is not None else r["score"],
                "feasible": bool(r.get("feasible", True)) and r["number"] not in over, "front": m is not None, "finetuned": ft is not None,
                "label": r.get("summary", ""),
                "latency_ms": (m.latency_measured_s * 1e3) if (m is not None and m.latency_measured_s) else None,
            })
        return pts

    # ------------------------------------------------------------------ models
    def member(self, trial: int) -> FrontMember:
        for m in self.front:
            if m.trial == trial:
                return m
        raise PickError(f"trial {trial} is not on the front of {self.run_dir}; front trials: {', '.join(str(m.trial) for m in self.front)}")

    def build(self, member: Union[FrontMember, int], original: Optional[nn.Module] = None) -> nn.Module:
        """The compressed model of a front member, with its (fine-tuned) weights."""
        member = self.member(member) if isinstance(member, int) else member
        path = self.weights_path(member)
        if path is None or not path.exists():
            raise AutorankError(f"{self.run_dir}: the weights of trial {member.trial} are missing ({path})")
        base = original if original is not None else self.model
        try:
            return load(path, model=base, trust_spec=self.trust_spec)
        except UntrustedSpecError:
            spec = _saved_spec(path)
            require_trusted(spec, False, what="model spec", source=f"{path} (trial {member.trial} of run {self.run_dir})",
                            how="if you trust this run directory, pass --trust-spec (SearchResult.load(run, trust_spec=True)); "
                                "or give the model yourself: --model SPEC (SearchResult.build(member, original=model))")
            raise

    def weights_path(self, member: FrontMember) -> Optional[Path]:
        """Where a member's weights are (stored relative to the run directory, and always inside it)."""
        if not member.weights:
            return None
        return RunDir(self.run_dir).inside(member.weights, Path(self.run_dir) / "front.json")

    def export(self, member: Union[FrontMember, int], path: Union[str, Path], *, format: str = "pt", force: bool = False,
               example_inputs: Any = None):
        """Write a front member's model to ``path`` (pt, onnx or torchscript) with a JSON sidecar."""
        member = self.member(member) if isinstance(member, int) else member
        model = self.build(member)
        if example_inputs is None:
            example_inputs = _example_inputs(self.run_dir, self.trust_spec, format)
        meta = {"plan": member.plan.to_dict(), "metrics": {k: v for k, v in member.to_dict().items() if k != "plan"},
                "source_run": str(Path(self.run_dir).resolve()), "trial": member.trial, "budget": self.budget}
        if self.latency:  # how the latencies above were measured: deploy it so (device, batch, threads, layout)
            meta["latency_measured_as"] = {k: self.latency.get(k) for k in ("device", "device_name", "batch_size", "threads_used")}
            meta["latency_measured_as"]["memory_format"] = self.latency.get("memory_format", "contiguous")
        spec = model.__dict__.get("_autorank_spec")
        return export_model(model, path, format=format, example_inputs=example_inputs, force=force, metadata=meta, spec=spec)

    def pick(self, how: Optional[str] = None, *, trial: Optional[int] = None, max_flops: Optional[float] = None,
             max_params: Optional[float] = None, max_latency: Optional[float] = None, min_score: Optional[float] = None) -> FrontMember:
        """A front member by trial number or by rule (``smallest``, ``best``, ``knee``) among those meeting the limits.

        ``max_flops``/``max_params``: fractions of the original; ``max_latency``: seconds (measured). A rule
        never picks a member whose re-measured latency breaks the run's latency budget (``latency_breach``).
        """
        if not self.front:
            raise PickError(f"{self.run_dir}: the front is empty (no finished trial within the budget)")
        if trial is not None:
            return self.member(trial)
        how = how or "best"
        if how not in PICKS:
            raise PickError(f"unknown pick {how!r}; expected one of {', '.join(PICKS)}")
        def ok(m: FrontMember) -> list[str]:
            bad = []
            if m.latency_breach:
                bad.append(f"re-measured latency {m.latency_measured_s * 1e3:.3g} ms breaks the budget {self.budget}")
            if max_flops is not None and m.flops_ratio > max_flops:
                bad.append(f"FLOPs {m.flops_ratio:.0%}")
            if max_params is not None and m.params_ratio > max_params:
                bad.append(f"params {m.params_ratio:.0%}")
            if max_latency is not None and (m.latency_measured_s is None or m.latency_measured_s > max_latency):
                bad.append("latency " + (f"{m.latency_measured_s * 1e3:.3g} ms" if m.latency_measured_s else "not measured"))
            if min_score is not None and m.score < min_score:
                bad.append(f"score {m.score:.4g}")
            return bad
        fits = [m for m in self.front if not ok(m)]
        if not fits:
            near = sorted(self.front, key=lambda m: len(ok(m)))[:3]
            listing = "; ".join(f"trial {m.trial}: " + ", ".join(ok(m)) for m in near)
            raise PickError(f"no front member meets the constraints; nearest: {listing}")
        if how == "smallest":
            return min(fits, key=lambda m: (m.cost_ratio, -m.score))
        if how == "best":
            return max(fits, key=lambda m: (m.score, -m.cost_ratio))
        return _knee(fits)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, run_dir: Union[str, Path], *, trust_spec: bool = False) -> "SearchResult":
        """The result recorded in a run directory (checked as it is read; nothing it names is imported).

        ``trust_spec``: allow the run's ``module:callable`` / ``file.py:callable`` model and
        task specs to be imported when a member is built or exported (``--trust-spec``).
        """
        rd = RunDir.open_existing(run_dir)
        data = rd.read_json("front.json")
        trials = rd.trial_records()
        if data is None:
            raise AutorankError(
                f"{rd.path} has no front yet ({len(trials)} trial record(s)); run the search to the end (the same command resumes it)"
            )
        source = rd.path / "front.json"
        if not isinstance(data, dict):
            raise RunDirError(f"{source}: expected a JSON object, got {type(data).__name__}")
        for key, kinds in (("budget", str), ("cost_metric", str), ("base_score", (int, float)), ("original", dict),
                           ("front", list), ("wasted_fraction", (int, float))):
            if not isinstance(data.get(key), kinds) or isinstance(data.get(key), bool):
                raise RunDirError(f"{source}: {key!r} is missing or not a {kinds.__name__ if isinstance(kinds, type) else 'number'}")
        if data["cost_metric"] not in ("flops", "params", "latency"):
            raise RunDirError(f"{source}: unknown cost metric {data['cost_metric']!r}")
        if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in data["original"].items()):
            raise RunDirError(f"{source}: 'original' must map metrics to numbers")
        try:
            parse_budget(data["budget"])
        except AutorankError as exc:
            raise RunDirError(f"{source}: {exc}") from None
        front = [FrontMember.from_dict(m, source=f"{source}: front[{i}]") for i, m in enumerate(data["front"])]
        for i, m in enumerate(front):
            if m.weights is not None:
                rd.inside(m.weights, f"{source}: front[{i}].weights")
        latency = data.get("original_latency_s")
        if latency is not None and (not isinstance(latency, (int, float)) or isinstance(latency, bool)):
            raise RunDirError(f"{source}: 'original_latency_s' must be a number or null")
        where = data.get("latency")
        if where is not None and not isinstance(where, dict):
            raise RunDirError(f"{source}: 'latency' must be an object or null")
        over = data.get("over_budget") or []
        if not isinstance(over, list) or not all(
                isinstance(o, dict) and isinstance(o.get("trial"), int) and not isinstance(o["trial"], bool) for o in over):
            raise RunDirError(f"{source}: 'over_budget' must be a list of objects with a trial number")
        return cls(
            run_dir=rd.path, budget=data["budget"], cost_metric=data["cost_metric"], base_score=float(data["base_score"]),
            original=data["original"], front=front, trials=list(trials.values()), wasted_fraction=float(data["wasted_fraction"]),
            original_latency_s=latency, latency=where, trust_spec=bool(trust_spec), over_budget=over,
        )


def _recovery(ft: dict[str, Any]) -> dict[str, Any]:
    """A fine-tuned trial's recovery, as the front shows it (records made before recovery existed: steps and time only)."""
    rec = dict(ft.get("recovery") or {"steps": ft.get("steps"), "seconds": ft.get("time_finetune_s")})
    if ft.get("kept_zero_shot"):
        rec["kept_zero_shot"] = True  # the recovered model scored lower than the zero-shot one (fixed point, say)
    return rec


def _knee(members: list[FrontMember]) -> FrontMember:
    """The member farthest from the line joining the cheapest and the best (normalised axes)."""
    pts = sorted(members, key=lambda m: m.cost_ratio)
    if len(pts) <= 2:
        return max(pts, key=lambda m: m.score)
    c0, c1 = pts[0].cost_ratio, pts[-1].cost_ratio
    s = [m.score for m in pts]
    s0, s1 = min(s), max(s)
    if c1 - c0 <= 0 or s1 - s0 <= 0:
        return max(pts, key=lambda m: m.score)
    xs = [(m.cost_ratio - c0) / (c1 - c0) for m in pts]
    ys = [(m.score - s0) / (s1 - s0) for m in pts]
    (x0, y0), (x1, y1) = (xs[0], ys[0]), (xs[-1], ys[-1])
    norm = math.hypot(x1 - x0, y1 - y0) or 1.0
    dist = [((y1 - y0) * x - (x1 - x0) * y + x1 * y0 - y1 * x0) / norm for x, y in zip(xs, ys)]
    return pts[max(range(len(pts)), key=lambda i: -dist[i])]


def _saved_spec(path: Path) -> Optional[str]:
    try:
        return metadata(path).get("spec")
    except AutorankError:
        return None


def _example_inputs(run_dir: Path, trust_spec: bool = False, fmt: str = "pt") -> Any:
    """The example input of the run's model: from the task when it can be rebuilt, else the built-in spec's.

    The task spec comes from the run's settings.json: a ``module:callable`` / ``file.py:callable``
    one is imported only with ``trust_spec``; without it, the built-in model's example input
    is used, and a ``pt`` export goes without one (its check compares the weights).
    """
    rd = RunDir(run_dir)
    settings = rd.settings()
    model, task = settings.get("model") or {}, settings.get("task") or {}
    if not isinstance(model, dict) or not isinstance(task, dict):
        raise RunDirError(f"{rd.settings_path}: 'model' and 'task' must be objects")
    spec, task_spec = model.get("spec"), task.get("spec")
    for what, v in (("model spec", spec), ("task spec", task_spec)):
        if v is not None and not isinstance(v, str):
            raise RunDirError(f"{rd.settings_path}: the {what} must be a string or null, got {type(v).__name__}")
    if task_spec is not None and not (trust_spec or is_safe_spec(task_spec)):
        x = example_input(spec) if isinstance(spec, str) and is_safe_spec(spec) else None
        if x is not None or fmt == "pt":
            logger.info("not importing the run's task spec %r (untrusted); %s", task_spec,
                        "using the built-in model's example input" if x is not None else "checking the weights only")
            return x
        require_trusted(task_spec, False, what="task spec", source=str(rd.settings_path),
                        how=f"exporting as {fmt} needs the task's example input: if you trust this run directory, pass --trust-spec")
    try:
        return load_task(task_spec, spec).example_inputs()
    except AutorankError:
        x = example_input(spec) if isinstance(spec, str) and is_safe_spec(spec) else None
        if x is None:
            raise
        return x


def build_front(run: RunDir, study, cost, budget, base_score: float, layers=None, over: Collection[int] = ()) -> SearchResult:
    """The Pareto front (score up, cost down) over the finished, feasible trials, best-known scores.

    ``layers``: the searched layers; records naming others are refused (see RunDir.trial_records).
    A trial that repeated an already scored plan (``duplicate_of``) is not a separate member, nor is
    one of ``over`` (measured over the latency budget end to end).
    """
    records = run.trial_records(layers)
    rows = []
    for number, r in sorted(records.items()):
        if (r.get("state") != "COMPLETE" or not r.get("feasible", True) or r.get("duplicate_of") is not None
                or number in over):
            continue
        ft = r.get("finetune") or {}
        score = ft.get("score") if ft.get("score") is not None else r.get("score")
        if score is None or not math.isfinite(score):
            continue
        rows.append((number, r, float(score), ft.get("score") is not None))
    idx = pareto_indices([r["ratios"][cost.objective_metric] for _, r, _, _ in rows], [s for _, _, s, _ in rows])
    front = []
    for i in idx:
        number, r, score, tuned = rows[i]
        latency_est = None
        if "latency" in r["costs"] and "latency" in cost.original:
            latency_est = r["costs"]["latency"]
        front.append(FrontMember(
            trial=number, plan=Plan.from_dict(r["plan"]), score=score, zero_shot_score=float(r["score"]), finetuned=tuned,
            flops=r["costs"]["flops"], params=r["costs"]["params"], flops_ratio=r["ratios"]["flops"],
            params_ratio=r["ratios"]["params"], cost_ratio=r["ratios"][cost.objective_metric], summary=r.get("summary", ""),
            origin=r.get("origin", "sampler"), latency_estimated_s=latency_est,
            weights=(r.get("finetune") or {}).get("weights") or r.get("weights"),
            recovery=_recovery(r.get("finetune") or {}) if tuned else None,
        ))
    front.sort(key=lambda m: (m.cost_ratio, -m.score))
    finished = [r for r in records.values() if r.get("state") in ("COMPLETE", "FAIL")]
    wasted = sum(1 for r in finished if r.get("state") == "FAIL" or not r.get("feasible", True))
    return SearchResult(
        run_dir=run.path, budget=budget.text(), cost_metric=cost.objective_metric, base_score=base_score,
        original=dict(cost.original), front=front, trials=[records[k] for k in sorted(records)],
        wasted_fraction=wasted / len(finished) if finished else 0.0,
    )
