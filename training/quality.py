"""Annotation quality from a Label Studio export: what Community Label Studio does not compute.

Figures, per project and label config (`quality_report`):

* inter-annotator agreement on tasks labeled by several annotators, per control (each Rating
  is one criterion of one answer): Krippendorff's alpha from the `krippendorff` package
  (nominal for choices, the pairwise side and a ranking's top answer; ordinal for ratings)
  and raw pairwise agreement (the share of annotator pairs on a task that gave one label);
* per annotator: annotations, agreement with the leave-one-out majority (the most common
  label of the *other* annotators of the task; a tie among them is skipped) and position
  bias: the share of first (left / answer 1) choices with a two-sided binomial test
  against 1/2 (scipy), ties and "both bad" left out;
* suggestion acceptance: of the annotations whose task showed a suggestion, the share equal
  to it, and the share submitted unchanged (every result still `origin: "prediction"`);
* suggestion accuracy by shown confidence (the prediction's score): a reliability curve;
* the anchoring guard: agreement with the leave-one-out majority on tasks where the
  suggestion was withheld against tasks where it was shown;
* per reward version: its accuracy on the comparisons annotated after it was made and that
  it did not train on (live accuracy), and its held-out accuracy when it was trained.

Which suggestion an annotation saw: the prediction it names as `parent_prediction`, else the
newest prediction of the task made before the annotation. A prediction that suggests nothing,
of a model version that made suggestions on other tasks, is one whose suggestion the
anchoring guard withheld (`LS_RLHF_WITHHOLD_SUGGESTION_SHARE`, ml_backend/results.py). What cannot be computed is listed in `cannot`, with the reason;
the rest is computed.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import numpy as np

from training.feedback import Comparison, model_comparisons, parse_export
from training.label_config import LabelConfigError, Schema, read_schema

REPORTS_DIR = "reports"  # under the state folder: `ls-rlhf report` writes, /metrics reads
HEADLINE_FILE = "headline.json"  # what the backend's /metrics shows of a report
FIRST = "first"
SECOND = "second"


@dataclass(frozen=True)
class Label:
    """One annotation's answer on one control, and what the model had suggested there."""

    task_id: Any
    annotation_id: Any
    annotator: str
    control: str
    value: Hashable
    position: str | None  # FIRST / SECOND for a choice between two answers, else None
    created_at: float | None
    suggestion: Hashable | None  # the shown suggestion's value on this control
    withheld: bool  # a prediction was made, its suggestion withheld (anchoring guard)
    confidence: float | None  # the shown prediction's score
    unchanged: bool  # submitted exactly as the prediction pre-filled it


@dataclass
class ControlAgreement:
    control: str
    level: str  # Krippendorff level of measurement
    units: int  # tasks with 2+ annotators on this control
    alpha: float | None
    pairwise_agreement: float | None
    pairs: int


@dataclass
class AnnotatorQuality:
    annotator: str
    annotations: int
    majority_agreement: float | None
    majority_compared: int
    first_share: float | None
    first_choices: int
    choices: int
    position_p_value: float | None


@dataclass
class ReliabilityPoint:
    low: float
    high: float
    labels: int
    confidence: float | None
    agreed: float | None


@dataclass
class VersionAccuracy:
    version: str
    created_at: str | None
    held_out_accuracy: float | None
    live_accuracy: float | None
    fresh_pairs: int


@dataclass
class QualityReport:
    project: int | None
    config_kind: str | None
    tasks: int
    annotations: int
    annotators: int
    agreement: list[ControlAgreement] = field(default_factory=list)
    per_annotator: list[AnnotatorQuality] = field(default_factory=list)
    suggestions_shown: int = 0
    suggestion_equal_share: float | None = None
    suggestion_unchanged_share: float | None = None
    reliability: list[ReliabilityPoint] = field(default_factory=list)
    calibration_error: float | None = None
    majority_agreement_shown: float | None = None
    majority_agreement_withheld: float | None = None
    compared_shown: int = 0
    compared_withheld: int = 0
    versions: list[VersionAccuracy] = field(default_factory=list)
    # People's verdicts between two models' answers, on tasks recording the answers' sources.
    models: list[dict[str, Any]] = field(default_factory=list)
    cannot: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))

    def headline(self) -> dict[str, float]:
        """The figures /metrics shows as gauges (names without the ls_rlhf_ prefix)."""
        figures: dict[str, float] = {"annotations": self.annotations, "annotators": self.annotators}
        for key in (
            "suggestion_equal_share",
            "suggestion_unchanged_share",
            "calibration_error",
            "majority_agreement_shown",
            "majority_agreement_withheld",
        ):
            value = getattr(self, key)
            if value is not None:
                figures[key] = value
        for row in self.agreement:
            if row.alpha is not None:
                figures[f'krippendorff_alpha{{control="{row.control}"}}'] = row.alpha
            if row.pairwise_agreement is not None:
                figures[f'pairwise_agreement{{control="{row.control}"}}'] = row.pairwise_agreement
        for pair in self.models:
            name = f'human_win_rate{{model="{pair["first"]}",against="{pair["second"]}"}}'
            figures[name] = pair["first_win_rate"]
        for version in self.versions:
            if version.live_accuracy is not None:
                figures[f'live_accuracy{{version="{version.version}"}}'] = version.live_accuracy
        return figures


# -- reading labels out of an export ----------------------------------------------------------


def annotator_of(annotation: dict) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return str(who) if who is not None else "unknown"


def _time(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    return None


def control_values(results: list, schema: Schema) -> dict[str, tuple[Hashable, str | None]]:
    """{control: (value, position)} of one annotation's or prediction's results."""
    found: dict[str, tuple[Hashable, str | None]] = {}
    first_tag = schema.answer_tags[0] if schema.answer_tags else None
    for result in results or []:
        if not isinstance(result, dict):
            continue
        name, kind, value = result.get("from_name"), result.get("type"), result.get("value")
        if not isinstance(value, dict) or not isinstance(name, str):
            continue
        if kind == "pairwise" and name == schema.pairwise:
            selected = value.get("selected")
            if selected in ("left", "right"):
                found[name] = (selected, FIRST if selected == "left" else SECOND)
        elif kind == "rating" and isinstance(value.get("rating"), (int, float)):
            found[name] = (float(value["rating"]), None)
        elif kind == "choices" and isinstance(value.get("choices"), list):
            chosen = sorted(str(c) for c in value["choices"])
            position = None
            if name == schema.choices and len(chosen) == 1:
                tag = schema.choice_values.get(chosen[0])
                if tag is not None and first_tag is not None:
                    position = FIRST if tag == first_tag else SECOND
            found[name] = ("|".join(chosen), position)
        elif kind == "ranker" and name == schema.ranker and not schema.buckets:
            ranker = value.get("ranker")
            order = ranker.get(name) if isinstance(ranker, dict) else None
            if isinstance(order, list) and order:
                found[name] = (str(order[0]), None)  # the top answer
    if schema.tie_choices in found and schema.pairwise:
        # "tie" / "both bad" is the comparison's answer, whatever side was clicked with it.
        verdict, _ = found.pop(schema.tie_choices)
        if verdict:
            found[schema.pairwise] = (f"tie: {verdict}", None)
    return found


def _shown_prediction(task: dict, annotation: dict) -> dict | None:
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    parent = annotation.get("parent_prediction")
    if parent is not None:
        for p in predictions:
            if p.get("id") == parent:
                return p
    made = _time(annotation.get("created_at"))
    before = [p for p in predictions if made is None or (_time(p.get("created_at")) or 0.0) <= made]
    return max(before, key=lambda p: _time(p.get("created_at")) or 0.0, default=None)


def read_labels(tasks: list[dict], schema: Schema) -> list[Label]:
    # Model versions that suggested something somewhere: a prediction of one of them that
    # suggests nothing is one the anchoring guard withheld.
    suggesting = {
        p.get("model_version")
        for task in tasks
        if isinstance(task, dict)
        for p in task.get("predictions") or []
        if isinstance(p, dict) and control_values(p.get("result") or [], schema)
    }
    labels = []
    for task in tasks:
        if not isinstance(task, dict):
            continue
        for annotation in task.get("annotations") or []:
            if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
                continue
            results = annotation.get("result") or []
            prediction = _shown_prediction(task, annotation)
            predicted = control_values(prediction.get("result") or [], schema) if prediction else {}
            score = prediction.get("score") if prediction else None
            withheld = (
                prediction is not None
                and not predicted
                and prediction.get("model_version") in suggesting
            )
            origins = [r.get("origin") for r in results if isinstance(r, dict)]
            unchanged = bool(origins) and all(o == "prediction" for o in origins)
            for control, (value, position) in control_values(results, schema).items():
                suggestion = predicted.get(control, (None, None))[0]
                labels.append(
                    Label(
                        task.get("id"),
                        annotation.get("id"),
                        annotator_of(annotation),
                        control,
                        value,
                        position,
                        _time(annotation.get("created_at")),
                        suggestion,
                        withheld=withheld,
                        confidence=float(score)
                        if suggestion is not None and isinstance(score, (int, float))
                        else None,
                        unchanged=unchanged and suggestion is not None,
                    )
                )
    return labels


# -- the figures -------------------------------------------------------------------------------


def agreement_by_control(labels: list[Label], schema: Schema) -> list[ControlAgreement]:
    import krippendorff

    ratings = {r.name for r in schema.ratings}
    rows = []
    by_control: dict[str, list[Label]] = defaultdict(list)
    for label in labels:
        by_control[label.control].append(label)
    for control, group in sorted(by_control.items()):
        units: dict[Any, dict[str, Hashable]] = defaultdict(dict)
        for label in group:
            units[label.task_id][label.annotator] = label.value
        shared = {u: v for u, v in units.items() if len(v) >= 2}
        level: Literal["ordinal", "nominal"] = "ordinal" if control in ratings else "nominal"
        agree = total = 0
        for values in shared.values():
            for a, b in combinations(values.values(), 2):
                total += 1
                agree += a == b
        alpha = None
        if shared:
            annotators = sorted({a for v in shared.values() for a in v})
            codes = {
                v: i
                for i, v in enumerate(
                    sorted({v for u in shared.values() for v in u.values()}, key=str)
                )
            }
            matrix = np.full((len(annotators), len(shared)), np.nan)
            for j, values in enumerate(shared.values()):
                for annotator, value in values.items():
                    # Ordinal ratings keep their order (the numbers themselves); nominal labels
                    # become arbitrary codes.
                    matrix[annotators.index(annotator), j] = (
                        float(value) if level == "ordinal" else codes[value]  # type: ignore[arg-type]
                    )
            if len(codes) >= 2:
                alpha = float(
                    krippendorff.alpha(reliability_data=matrix, level_of_measurement=level)
                )
            elif total:
                alpha = None  # one label everywhere: alpha is 0/0
        rows.append(
            ControlAgreement(
                control,
                level,
                len(shared),
                alpha,
                agree / total if total else None,
                total,
            )
        )
    return rows


def _others_majority(labels: list[Label]) -> dict[tuple[Any, Any], Hashable]:
    """(annotation id, control) -> the most common label of the task's other annotators."""
    by_unit: dict[tuple[Any, str], list[Label]] = defaultdict(list)
    for label in labels:
        by_unit[(label.task_id, label.control)].append(label)
    majority = {}
    for group in by_unit.values():
        for label in group:
            others = Counter(o.value for o in group if o.annotator != label.annotator)
            if not others:
                continue
            (top, count), *rest = others.most_common(2) + [(None, -1)]
            if rest[0][1] == count:
                continue  # the others are split: no majority to agree with
            majority[(label.annotation_id, label.control)] = top
    return majority


def per_annotator(labels: list[Label], majority: dict) -> list[AnnotatorQuality]:
    from scipy.stats import binomtest

    rows = []
    for annotator in sorted({label.annotator for label in labels}):
        mine = [label for label in labels if label.annotator == annotator]
        compared = [
            label.value == majority[(label.annotation_id, label.control)]
            for label in mine
            if (label.annotation_id, label.control) in majority
        ]
        positions = [label.position for label in mine if label.position is not None]
        firsts = positions.count(FIRST)
        rows.append(
            AnnotatorQuality(
                annotator,
                len({label.annotation_id for label in mine}),
                sum(compared) / len(compared) if compared else None,
                len(compared),
                firsts / len(positions) if positions else None,
                firsts,
                len(positions),
                float(binomtest(firsts, len(positions), 0.5).pvalue) if positions else None,
            )
        )
    return rows


def suggestion_reliability(
    labels: list[Label], bins: int = 5
) -> tuple[list[ReliabilityPoint], float | None, Any]:
    """Shown confidence against how often annotators chose the suggestion; with the
    RewardEvaluation that `training.reward_eval.plot_reliability` draws."""
    from training.reward_eval import evaluation_from_differences

    shown = [
        label for label in labels if label.suggestion is not None and label.confidence is not None
    ]
    if not shown:
        return [], None, None
    # reward_eval reads a confidence c as sigmoid(|d|) and "right" as d > 0: d = +-logit(c).
    confidence = np.clip([label.confidence for label in shown], 0.5, 1 - 1e-9)
    logit = np.log(confidence / (1 - confidence))
    agreed = np.array([label.value == label.suggestion for label in shown])
    difference = np.where(agreed, logit, -logit)
    difference[difference == 0] = -1e-12  # a 0.5 suggestion not followed counts as not agreed
    evaluation = evaluation_from_differences(
        difference,
        [str(label.task_id) for label in shown],
        [0] * len(shown),
        [0] * len(shown),
        bins=bins,
        resamples=200,
    )
    points = [
        ReliabilityPoint(b.low, b.high, b.pairs, b.confidence, b.accuracy)
        for b in evaluation.reliability
    ]
    return points, evaluation.expected_calibration_error, evaluation


def version_accuracy(tasks: list[dict], config: str, registry: Any) -> list[VersionAccuracy]:
    """Each reward version's accuracy on the comparisons annotated after it was made (and not
    among the pairs it trained on)."""
    from datasets import Dataset

    from training.datasets import preference_votes
    from training.reward import RewardModel, pair_key, trained_pairs
    from training.reward_eval import reward_differences

    rows = []
    for version in registry.versions("reward"):
        made = _time(version.metadata.get("created_at"))
        metrics = version.metadata.get("metrics") or {}
        held_out = metrics.get("accuracy_after", version.metadata.get("accuracy_after"))
        fresh_tasks = []
        for task in tasks:
            after = [
                a
                for a in task.get("annotations") or []
                if isinstance(a, dict)
                and made is not None
                and (_time(a.get("created_at")) or 0.0) > made
            ]
            if after:
                fresh_tasks.append({**task, "annotations": after})
        seen = trained_pairs(version.path)
        votes = [
            (p, w, lose)
            for p, w, lose, _ in preference_votes(parse_export(fresh_tasks, config).records)
            if pair_key(p, w, lose) not in seen and pair_key(p, lose, w) not in seen
        ]
        live = None
        if votes:
            model = RewardModel.load(version.path)
            pairs = Dataset.from_dict(
                {
                    "prompt": [v[0] for v in votes],
                    "chosen": [v[1] for v in votes],
                    "rejected": [v[2] for v in votes],
                }
            )
            live = float((reward_differences(model.score, pairs) > 0).mean())
        rows.append(
            VersionAccuracy(
                version.label,
                version.metadata.get("created_at"),
                float(held_out) if isinstance(held_out, (int, float)) else None,
                live,
                len(votes),
            )
        )
    return rows


def quality_report(
    tasks: list[dict],
    config: str,
    project: int | None = None,
    registry: Any = None,
) -> QualityReport:
    """Every figure the export allows; `cannot` says which it does not, and why."""
    report = QualityReport(project, None, len(tasks), 0, 0)
    try:
        schema = read_schema(config)
    except LabelConfigError as err:
        report.cannot.append(
            f"the label config fits no kind the report knows ({err}): only counts are computed"
        )
        report.annotations = sum(len(t.get("annotations") or []) for t in tasks)
        return report
    report.config_kind = schema.kind
    labels = read_labels(tasks, schema)
    report.annotations = len({(label.task_id, label.annotation_id) for label in labels})
    annotators = {label.annotator for label in labels}
    report.annotators = len(annotators)
    if not labels:
        report.cannot.append(
            "no annotation with a choice, ranking or rating: nothing to measure agreement, "
            "acceptance or accuracy on"
        )
        return report

    report.agreement = agreement_by_control(labels, schema)
    if len(annotators) < 2:
        report.cannot.append(
            "agreement between annotators and with the majority: only one annotator "
            f"({next(iter(annotators))}) labeled this project"
        )
    elif not any(row.units for row in report.agreement):
        report.cannot.append(
            "agreement between annotators: no task was labeled by two or more annotators"
        )
    for row in report.agreement:
        if row.units and row.alpha is None:
            report.cannot.append(
                f"Krippendorff's alpha on {row.control}: every annotator gave the same label "
                "on every shared task (alpha is 0/0)"
            )
    majority = _others_majority(labels)
    report.per_annotator = per_annotator(labels, majority)
    if not any(label.position for label in labels):
        report.cannot.append(
            "position bias: the config has no choice between a first and a second answer"
        )

    shown = [label for label in labels if label.suggestion is not None]
    report.suggestions_shown = len(shown)
    if shown:
        report.suggestion_equal_share = sum(lab.value == lab.suggestion for lab in shown) / len(
            shown
        )
        report.suggestion_unchanged_share = sum(lab.unchanged for lab in shown) / len(shown)
        report.reliability, report.calibration_error, _ = suggestion_reliability(labels)
    else:
        report.cannot.append(
            "suggestion acceptance and accuracy: no annotation was made on a task showing a "
            "suggestion of the model"
        )

    compared_shown = [
        lab.value == majority[(lab.annotation_id, lab.control)]
        for lab in shown
        if (lab.annotation_id, lab.control) in majority
    ]
    compared_withheld = [
        lab.value == majority[(lab.annotation_id, lab.control)]
        for lab in labels
        if lab.withheld and (lab.annotation_id, lab.control) in majority
    ]
    report.compared_shown, report.compared_withheld = len(compared_shown), len(compared_withheld)
    if compared_shown:
        report.majority_agreement_shown = sum(compared_shown) / len(compared_shown)
    if compared_withheld:
        report.majority_agreement_withheld = sum(compared_withheld) / len(compared_withheld)
    if not compared_withheld:
        report.cannot.append(
            "the anchoring check: no task with several annotators had its suggestion withheld "
            "(set LS_RLHF_WITHHOLD_SUGGESTION_SHARE)"
        )

    report.models = [
        {**asdict(row), "first_win_rate": row.first_win_rate}
        for row in model_comparisons(parse_export(tasks, config).of_type(Comparison))
    ]
    if registry is None or not registry.versions("reward"):
        report.cannot.append("live accuracy: no reward version in the registry")
    else:
        report.versions = version_accuracy(tasks, config, registry)
    return report


# -- writing it --------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def to_markdown(report: QualityReport, plots: dict[str, str]) -> str:
    title = f"project {report.project}" if report.project is not None else "export"
    lines = [
        f"# Annotation quality: {title}",
        "",
        f"{report.tasks} tasks, {report.annotations} annotations by {report.annotators} "
        f"annotators; label config kind: {report.config_kind or 'unknown'}.",
        "",
    ]
    if report.cannot:
        lines += ["## Not computed", ""] + [f"- {reason}" for reason in report.cannot] + [""]
    if report.agreement:
        lines += [
            "## Agreement between annotators",
            "",
            "| control | level | shared tasks | Krippendorff's alpha | pairwise agreement | pairs |",
            "|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.control} | {r.level} | {r.units} | {_fmt(r.alpha)} | "
            f"{_fmt(r.pairwise_agreement)} | {r.pairs} |"
            for r in report.agreement
        ]
        lines.append("")
    if report.per_annotator:
        lines += [
            "## Annotators",
            "",
            "Agreement with the majority of the task's other annotators; position bias is the "
            "share of first (left / answer 1) choices, p from a two-sided binomial test "
            "against 1/2 (small p: a side is favoured).",
            "",
            "| annotator | annotations | agrees with majority | compared | first choices | "
            "share first | p |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {a.annotator} | {a.annotations} | {_fmt(a.majority_agreement)} | "
            f"{a.majority_compared} | {a.first_choices} of {a.choices} | {_fmt(a.first_share)} "
            f"| {_fmt(a.position_p_value, 4)} |"
            for a in report.per_annotator
        ]
        lines.append("")
        if "annotators" in plots:
            lines += [f"![agreement per annotator]({plots['annotators']})", ""]
    if report.suggestions_shown:
        lines += [
            "## Suggestions",
            "",
            f"- labels on tasks showing a suggestion: {report.suggestions_shown}",
            f"- equal to the suggestion: {_fmt(report.suggestion_equal_share)}",
            f"- submitted unchanged from the prediction: {_fmt(report.suggestion_unchanged_share)}",
            f"- calibration error of the shown confidence: {_fmt(report.calibration_error)}",
            "",
            "| shown confidence | labels | mean confidence | chose the suggestion |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {p.low:.1f}-{p.high:.1f} | {p.labels} | {_fmt(p.confidence)} | {_fmt(p.agreed)} |"
            for p in report.reliability
        ]
        lines.append("")
        if "reliability" in plots:
            lines += [f"![suggestion reliability]({plots['reliability']})", ""]
    lines += [
        "## Anchoring check",
        "",
        "Agreement with the other annotators' majority where the suggestion was shown and "
        "where the anchoring guard withheld it. Much higher agreement with the suggestion "
        "shown than without, on similar tasks, means the suggestion sways annotators.",
        "",
        "| suggestion | labels compared | agrees with majority |",
        "|---|---:|---:|",
        f"| shown | {report.compared_shown} | {_fmt(report.majority_agreement_shown)} |",
        f"| withheld | {report.compared_withheld} | {_fmt(report.majority_agreement_withheld)} |",
        "",
    ]
    if report.models:
        lines += [
            "## Models compared by annotators",
            "",
            "Tasks whose two answers came from two models, on sides drawn at random and "
            "recorded in the task (`answer_sources`): the first model's win rate, a tie "
            "counting half.",
            "",
            "| model | against | comparisons | wins | ties | losses | win rate |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {m['first']} | {m['second']} | {m['comparisons']} | {m['first_wins']} | "
            f"{m['ties']} | {m['second_wins']} | {_fmt(m['first_win_rate'])} |"
            for m in report.models
        ]
        lines.append("")
    if report.versions:
        lines += [
            "## Reward versions",
            "",
            "Live accuracy: on comparisons annotated after the version was made, that it did "
            "not train on.",
            "",
            "| version | made | held-out accuracy | live accuracy | fresh pairs |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {v.version} | {v.created_at or 'n/a'} | {_fmt(v.held_out_accuracy)} | "
            f"{_fmt(v.live_accuracy)} | {v.fresh_pairs} |"
            for v in report.versions
        ]
        lines.append("")
        if "versions" in plots:
            lines += [f"![accuracy per reward version]({plots['versions']})", ""]
    return "\n".join(lines)


def write_report(report: QualityReport, folder: Path) -> dict[str, Path]:
    """report.md, report.json and the PNG plots in `folder`; returns their paths."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.reward_eval import plot_reliability

    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    plots: dict[str, str] = {}
    if report.reliability:
        labels_shown = [p for p in report.reliability if p.labels]
        if labels_shown:
            # Rebuild the evaluation reward_eval's plot draws from the report's own figures.
            from training.reward_eval import ReliabilityBin, RewardEvaluation

            evaluation = RewardEvaluation(
                pairs=report.suggestions_shown,
                prompts=0,
                accuracy=report.suggestion_equal_share or 0.0,
                accuracy_low=0.0,
                accuracy_high=0.0,
                longer_answer_accuracy=0.0,
                shorter_chosen_pairs=0,
                shorter_chosen_accuracy=None,
                expected_calibration_error=report.calibration_error or 0.0,
                mean_confidence=0.0,
                reliability=[
                    ReliabilityBin(p.low, p.high, p.labels, p.confidence, p.agreed)
                    for p in report.reliability
                ],
            )
            written["reliability"] = plot_reliability(evaluation, folder / "reliability.png")
    rated = [a for a in report.per_annotator if a.majority_agreement is not None]
    if rated:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([a.annotator for a in rated], [a.majority_agreement or 0.0 for a in rated])
        ax.set(ylim=(0, 1), ylabel="agrees with the others' majority", title="Annotators")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(folder / "annotators.png", dpi=100)
        plt.close(fig)
        written["annotators"] = folder / "annotators.png"
    if report.versions:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [v.version for v in report.versions]
        for key, name in (("held_out_accuracy", "held-out"), ("live_accuracy", "live")):
            values = [getattr(v, key) for v in report.versions]
            ax.plot(names, [math.nan if x is None else x for x in values], marker="o", label=name)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set(ylim=(0, 1), ylabel="accuracy", title="Reward versions")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "versions.png", dpi=100)
        plt.close(fig)
        written["versions"] = folder / "versions.png"
    plots = {name: path.name for name, path in written.items()}
    (folder / "report.md").write_text(to_markdown(report, plots))
    (folder / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    (folder / HEADLINE_FILE).write_text(json.dumps(report.headline(), indent=2))
    written["markdown"], written["json"] = folder / "report.md", folder / "report.json"
    return written


def metric_lines(reports: Path) -> list[str]:
    """Prometheus gauges of the headline figures of each report folder under `reports`
    (`ls_rlhf_report_<figure>{report="project-3",...}`); a folder that cannot be read is
    skipped."""
    import json
    import re

    lines: list[str] = []
    typed: set[str] = set()
    if not reports.is_dir():
        return lines
    for path in sorted(reports.glob(f"*/{HEADLINE_FILE}")):
        try:
            figures = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(figures, dict):
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.parent.name)
        for key, value in figures.items():
            if not isinstance(value, (int, float)) or not isinstance(key, str):
                continue
            figure, _, labels = key.partition("{")
            metric = "ls_rlhf_report_" + re.sub(r"[^a-z0-9_]", "_", figure)
            extra = ("," + labels.rstrip("}")) if labels else ""
            if metric not in typed:
                typed.add(metric)
                lines.append(f"# TYPE {metric} gauge")
            lines.append(f'{metric}{{report="{name}"{extra}}} {value}')
    return lines


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
