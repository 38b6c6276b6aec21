"""A reward model as a linear probe: Bradley-Terry on frozen features of a backbone.

The backbone reads each (prompt, answer) once, tokenized exactly as `format_reward_input`
does for fine-tuning. The hidden states of one layer, averaged over the answer's own tokens
(read in the context of the prompt), are the answer's features; a linear model on them is
fitted by L2-regularized Bradley-Terry (logistic regression on the feature differences of
the judged pairs, with their margins). The layer and the regularization strength are chosen
by cross-validation over the training prompts, then the probe is refitted on every pair.

Why: with hundreds to a few thousand judged pairs, fine-tuning a whole backbone overfits
within an epoch and its result depends on when it stops, while a regularized linear model on
frozen features does not (linear probing: Alain & Bengio, 2016; on probing against
fine-tuning with little data, Kumar et al., 2022). Measured on FineGrainedRLHF
(docs/benchmarks.md), a probe on MiniLM ranked more held-out pairs right than any
fine-tuning run, in a fifth of the time: the backbone reads each answer once and never runs
backward. Which method wins on other data is for the validation split to say
(`method="auto"` in training/reward.py).

A probe version folder holds the backbone (an HF folder), its tokenizer, `reward_probe.json`
(layer, pooling, bias and how they were chosen), `reward_probe.safetensors` (the weights)
and `reward_probe_features.safetensors` (its answers' features, for warm starts).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.consensus import consensus as consensus_column

PROBE_CONFIG = "reward_probe.json"
PROBE_WEIGHTS = "reward_probe.safetensors"
PROBE_FEATURES = "reward_probe_features.safetensors"
# Regularization strengths tried (on standardized features: mean loss + l2 * |w|^2), chosen
# by cross-validation. On FineGrainedRLHF's training questions 0.3-1 won (docs/benchmarks.md):
# a few thousand pairs, hundreds of dimensions.
L2_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
DEFAULT_L2 = 1.0
# Feature columns beside the backbone's (grounding, consensus: a handful beside hundreds)
# are shrunk 32x less than the backbone's: under one strength they were shrunk away with
# them. On FineGrainedRLHF's training questions, by cross-validation: grounding 0.570 with
# the same strength, 0.578 at 8x less, 0.583 at 32x less; consensus 0.576 at 1x, 0.603 at
# 8x, 0.602 at 32x (docs/benchmarks.md). As a scale on their standardized values, sqrt(32).
FEATURE_COLUMN_SCALE = 32**0.5
FOLDS = 5
POOLINGS = ("answer", "mean")


def is_probe(path: str | Path) -> bool:
    return (Path(path) / PROBE_CONFIG).is_file()


@dataclass
class LinearProbe:
    """reward = weight . features + bias: features = mean_pool(hidden_states[layer]), followed
    by the answer's grounding features (training/grounding.py) where `grounding` is set, then
    its consensus with the other answers to its prompt (training/consensus.py) where
    `consensus` is set."""

    layer: int
    weight: torch.Tensor
    bias: float
    pooling: str = "answer"  # over the answer's tokens ("answer") or every token ("mean")
    grounding: bool = False
    consensus: bool = False
    selection: dict[str, Any] = field(default_factory=dict)  # how layer and l2 were chosen

    def save(self, folder: Path) -> None:
        save_file({"weight": self.weight.float().contiguous()}, str(folder / PROBE_WEIGHTS))
        (folder / PROBE_CONFIG).write_text(
            json.dumps(
                {
                    "layer": self.layer,
                    "pooling": self.pooling,
                    "bias": self.bias,
                    "grounding": self.grounding,
                    "consensus": self.consensus,
                    **self.selection,
                },
                indent=2,
            )
        )

    @classmethod
    def load(cls, folder: Path) -> LinearProbe:
        config = json.loads((folder / PROBE_CONFIG).read_text())
        pooling = config.get("pooling", "answer")
        if pooling not in POOLINGS:
            raise ValueError(
                f"{folder / PROBE_CONFIG}: pooling {pooling!r} is not one of {', '.join(POOLINGS)}"
            )
        weight = load_file(str(folder / PROBE_WEIGHTS))["weight"]
        own = ("layer", "pooling", "bias", "grounding", "consensus")
        selection = {k: v for k, v in config.items() if k not in own}
        return cls(
            int(config["layer"]),
            weight,
            float(config["bias"]),
            pooling,
            # Versions from before these feature columns had none.
            bool(config.get("grounding", False)),
            bool(config.get("consensus", False)),
            selection,
        )

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.weight + self.bias


def answer_key(prompt: str, answer: str) -> str:
    return hashlib.sha256(json.dumps([prompt, answer]).encode()).hexdigest()[:16]


@dataclass
class FeatureCache:
    """The pooled features of the answers a probe was fitted on, at its layer, kept in the
    version folder: a warm start in the loop then reads only the new answers, so a retrain
    on a thousand pairs costs the new annotations' forward passes and a refit."""

    rows: dict[str, int]  # answer_key -> row of `features`
    features: torch.Tensor  # [answers, hidden]

    def save(self, folder: Path, max_length: int) -> None:
        metadata = {"keys": json.dumps(list(self.rows)), "max_length": str(max_length)}
        save_file(
            {"features": self.features.float().contiguous()}, str(folder / PROBE_FEATURES), metadata
        )

    @classmethod
    def load(cls, folder: Path, max_length: int) -> FeatureCache | None:
        """None when there is none, or it was read with another token budget."""
        from safetensors import safe_open

        path = folder / PROBE_FEATURES
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("max_length") != str(max_length):
                return None
            features = handle.get_tensor("features")
        keys = json.loads(metadata["keys"])
        return cls({key: row for row, key in enumerate(keys)}, features)


def answer_token_counts(
    tokenizer: PreTrainedTokenizerBase, answers: Sequence[str], encoded: Sequence[list[int]]
) -> list[int]:
    """How many tokens at the end of each encoded (prompt, answer) to pool over: the answer's
    own tokens and the one token after it (BERT's final [SEP], a chat template's end of
    turn), never the whole sequence. Where chosen and rejected share a long prompt, pooling
    over every token drowns the answers in it: measured on FineGrainedRLHF with passages in
    the prompt (376 tokens on average), 0.56 held-out against 0.59 (docs/benchmarks.md)."""
    if not answers:  # a warm start whose answers were all read before
        return []
    counts = [len(ids) for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"]]
    return [max(1, min(n + 1, len(ids) - 1)) for n, ids in zip(counts, encoded, strict=True)]


def pooled_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoded: Sequence[list[int]],
    layers: Sequence[int],
    last_tokens: Sequence[int] | None = None,
    batch_size: int = 16,
    desc: str = "reading answers",
) -> torch.Tensor:
    """Mean-pooled hidden states of `layers` for each token-id sequence: [layers, n, hidden],
    over its `last_tokens[i]` final tokens (None: over all of them).

    Sequences are batched by length (little padding); `hidden_states[0]` is the embeddings,
    `hidden_states[k]` the output of layer k."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    hidden = model.config.hidden_size
    out = torch.zeros((len(layers), len(encoded), hidden), dtype=torch.float32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    starts = range(0, len(order), batch_size)
    bar = tqdm(
        starts, desc=desc, unit="batch", leave=False, disable=None if len(starts) >= 8 else True
    )
    with torch.inference_mode():
        for start in bar:
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            pool = torch.zeros((len(idx), width), dtype=torch.float32)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                input_ids[row, :n] = torch.tensor(encoded[i])
                mask[row, :n] = 1
                pool[row, n - (last_tokens[i] if last_tokens is not None else n) : n] = 1
            states = model(
                input_ids=input_ids.to(model.device),
                attention_mask=mask.to(model.device),
                output_hidden_states=True,
            ).hidden_states
            weights = pool.to(model.device)[..., None]
            for j, layer in enumerate(layers):
                pooled = (states[layer].float() * weights).sum(1) / weights.sum(1)
                out[j, idx] = pooled.cpu()
    return out


@dataclass
class JudgedPairs:
    """Pairs as rows of a feature matrix: chosen row, rejected row, margin, and the fold of
    their prompt (all pairs of one prompt share a fold, so cross-validation never scores a
    prompt it fitted on)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    margin: torch.Tensor
    fold: torch.Tensor

    def __len__(self) -> int:
        return len(self.chosen)

    def subset(self, keep: torch.Tensor) -> JudgedPairs:
        return JudgedPairs(
            self.chosen[keep], self.rejected[keep], self.margin[keep], self.fold[keep]
        )

    @staticmethod
    def fold_of(prompt: str, folds: int = FOLDS) -> int:
        return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % folds


@dataclass
class CounterfactualVariants:
    """Pairs of texts that differ only in a sensitive attribute's group ("The man ..." /
    "The woman ..."), read by the same frozen backbone as the answers: the probe's
    counterfactual penalty (`fit_probe`).

    `features` is [layers, texts, hidden] in the layer order of the answers' features;
    pair k is rows `first[k]` and `second[k]`, of attribute `attribute[k]`."""

    features: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    attribute: torch.Tensor
    weight: float
    names: list[str] = field(default_factory=list)  # attribute index -> name

    def __len__(self) -> int:
        return len(self.first)


class _Penalty:
    """weight x the mean over attributes of the mean squared reward difference of their
    variant pairs, on features standardized like the answers'.

    Per attribute, then averaged: every attribute weighs the same however many variant
    pairs it has (gender swaps of answers outnumber the rest by far). Squared, not absolute
    as in fine-tuning's penalty, so that the objective stays smooth and convex for L-BFGS:
    it is a ridge penalty along the directions in which swapping the group moves the
    features, which the probe then learns to ignore."""

    def __init__(self, difference: torch.Tensor, attribute: torch.Tensor, weight: float) -> None:
        present, self.attribute = torch.unique(attribute, return_inverse=True)
        self.difference, self.weight = difference, weight
        self.count = torch.bincount(self.attribute, minlength=len(present)).float()

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        squared = (self.difference @ w) ** 2
        per_attribute = torch.zeros(len(self.count)).index_add(0, self.attribute, squared)
        return self.weight * (per_attribute / self.count).mean()


def _fit(
    z: torch.Tensor, pairs: JudgedPairs, l2: float, penalty: _Penalty | None = None
) -> torch.Tensor:
    """Weights minimizing mean -log sigmoid(d.w - margin) + l2 |w|^2 (d: feature differences),
    plus the counterfactual penalty where there is one."""
    difference = z[pairs.chosen] - z[pairs.rejected]
    w = torch.zeros(z.shape[1], dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-(difference @ w - pairs.margin)).mean()
        loss = loss + l2 * (w * w).sum()
        if penalty is not None:
            loss = loss + penalty(w)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def _loss_and_accuracy(z: torch.Tensor, pairs: JudgedPairs, w: torch.Tensor) -> tuple[float, float]:
    return bradley_terry_figures((z[pairs.chosen] - z[pairs.rejected]) @ w, pairs.margin)


def bradley_terry_figures(difference: torch.Tensor, margin: torch.Tensor) -> tuple[float, float]:
    """(Bradley-Terry loss, accuracy) of reward differences r(chosen) - r(rejected)."""
    loss = float(torch.nn.functional.softplus(-(difference - margin)).mean())
    return loss, float((difference > 0).float().mean())


def _uses(offered: bool, kept: bool | None) -> list[bool]:
    """Whether to try a group of feature columns without and with: not where it is not
    offered, the parent's choice where a warm start keeps one."""
    if not offered:
        return [False]
    return [kept] if kept is not None else [False, True]


def fit_probe(
    features: torch.Tensor,
    layers: Sequence[int],
    pairs: JudgedPairs,
    l2_grid: Sequence[float] = L2_GRID,
    layer: int | None = None,
    variants: CounterfactualVariants | None = None,
    grounding: int = 0,
    use_grounding: bool | None = None,
    prompts: Sequence[str] | None = None,
    use_consensus: bool | None = None,
) -> LinearProbe:
    """Choose the layer and L2 strength by cross-validation over prompts, refit on all pairs.

    `features` is [layers, n, hidden] (pooled_features). Each (layer, l2) is fitted on all
    folds but one and scored (Bradley-Terry loss) on that one, in turn; the lowest mean loss
    wins. Cross-validation costs only refits of a linear model (the backbone read each answer
    once), and with a few hundred prompts it is far less noisy than one validation split.
    With `layer` given (a warm start keeps its layer), only l2 is chosen. With `variants`,
    every fit adds their counterfactual penalty; the choice is still by the judged pairs'
    loss alone.

    Feature columns beside the backbone's are tried on and off with every layer, unless
    `use_...` says which (a warm start keeps its parent's choice):
    - the last `grounding` columns of `features` are the answers' grounding features
      (training/grounding.py);
    - with `prompts` (the prompt of each row of `features`), the consensus column
      (training/consensus.py), computed from each layer's own features; tried only where
      some prompt has three answers or more."""
    rows = torch.unique(torch.cat([pairs.chosen, pairs.rejected]))
    layer_candidates = [layer] if layer is not None else list(layers)
    grounding_uses = _uses(bool(grounding), use_grounding)
    # Consensus is 0 wherever a prompt has fewer than three answers: not worth a try there.
    siblings = prompts is not None and max(Counter(prompts).values(), default=0) >= 3
    consensus_uses = _uses(
        prompts is not None and (siblings or use_consensus is not None), use_consensus
    )
    candidates = [
        (c, g, k) for c in layer_candidates for g in grounding_uses for k in consensus_uses
    ]
    folds = [
        f
        for f in torch.unique(pairs.fold).tolist()
        if 0 < int((pairs.fold == f).sum()) < len(pairs)
    ]
    hidden = features.shape[-1] - grounding

    def columns(
        x: torch.Tensor, use_g: bool, use_c: bool, of: Sequence[str] | None
    ) -> torch.Tensor:
        """The backbone's columns, then the grounding and consensus ones in use (`of`: the
        rows' prompts; None: no siblings known, consensus 0)."""
        parts = [x[..., : hidden + (grounding if use_g else 0)]]
        if use_c:
            parts.append(
                consensus_column(of, x[:, :hidden])[:, None]
                if of is not None
                else torch.zeros(len(x), 1)
            )
        return torch.cat(parts, -1)

    def design(
        index: int, use_g: bool, use_c: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = columns(features[index], use_g, use_c, prompts)
        center, scale = x[rows].mean(0), x[rows].std(0) + 1e-6
        scale[hidden:] /= FEATURE_COLUMN_SCALE
        return (x - center) / scale, center, scale

    def penalty_at(
        index: int, use_g: bool, use_c: bool, center: torch.Tensor, scale: torch.Tensor
    ) -> _Penalty | None:
        if variants is None or not len(variants):
            return None
        # A variant pair is two texts of one prompt: no siblings to agree with, consensus 0.
        v = (columns(variants.features[index], use_g, use_c, None) - center) / scale
        return _Penalty(v[variants.first] - v[variants.second], variants.attribute, variants.weight)

    grid: list[dict[str, Any]] = []
    for candidate, use_g, use_c in candidates:
        index = list(layers).index(candidate)
        z, center, scale = design(index, use_g, use_c)
        penalty = penalty_at(index, use_g, use_c, center, scale)
        for l2 in l2_grid if folds else ():
            scores = [
                _loss_and_accuracy(
                    z,
                    pairs.subset(pairs.fold == f),
                    _fit(z, pairs.subset(pairs.fold != f), l2, penalty),
                )
                for f in folds
            ]
            grid.append(
                {
                    "layer": candidate,
                    "grounding": use_g,
                    "consensus": use_c,
                    "l2": l2,
                    "loss": sum(s[0] for s in scores) / len(scores),
                    "accuracy": sum(s[1] for s in scores) / len(scores),
                }
            )
    # Too few prompts to hold any out: the first candidate and a middling strength.
    best = (
        min(grid, key=lambda g: g["loss"])
        if grid
        else {
            "layer": candidates[0][0],
            "grounding": candidates[0][1],
            "consensus": candidates[0][2],
            "l2": DEFAULT_L2,
        }
    )
    chosen_layer, l2 = int(best["layer"]), float(best["l2"])
    use_g, use_c = bool(best["grounding"]), bool(best["consensus"])
    index = list(layers).index(chosen_layer)
    z, center, scale = design(index, use_g, use_c)
    penalty = penalty_at(index, use_g, use_c, center, scale)
    w = _fit(z, pairs, l2, penalty)
    # Fold the standardization in: reward = (x - center) / scale . w = x . (w / scale) - center . (w / scale)
    weight = w / scale
    selection: dict[str, Any] = {
        "l2": l2,
        "folds": len(folds),
        "cross_validation_loss": best.get("loss"),
        "cross_validation_accuracy": best.get("accuracy"),
        "grid": grid,
    }
    if penalty is not None and variants is not None:
        selection["counterfactual_weight"] = variants.weight
        selection["counterfactual_pairs"] = {
            name: int((variants.attribute == i).sum()) for i, name in enumerate(variants.names)
        }
    return LinearProbe(
        chosen_layer,
        weight,
        -float(center @ weight),
        grounding=use_g,
        consensus=use_c,
        selection=selection,
    )


def candidate_layers(model: PreTrainedModel) -> list[int]:
    """Every layer's output (hidden_states[1..depth]); the embeddings alone are left out."""
    return list(range(1, int(model.config.num_hidden_layers) + 1))
