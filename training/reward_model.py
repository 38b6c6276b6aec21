"""Scoring with a reward model: what serving, PPO and evaluation need, without TRL.

A reward model maps (prompt, answer) to a scalar. One function, `format_reward_input`, turns
(prompt, answer) into token ids for training and for scoring alike, so a model is always
scored the way it was trained:

* encoders without a chat template (BERT, the default MiniLM): `[CLS] prompt [SEP] answer [SEP]`
  as one segment; the prompt is cut from the LEFT first, so the answer (where chosen and
  rejected differ) and the end of the prompt (usually the question) survive; only an answer
  that alone is too long is cut, from the right;
* decoders with a chat template: the user/assistant dialogue, cut from the left.

A version is either a fine-tuned sequence classifier (an HF folder with a score head) or a
linear probe on a frozen backbone (training/reward_probe.py); `RewardModel.load` reads both.
Training lives in training/reward.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from training.consensus import consensus
from training.grounding import grounding_features
from training.models import load_backbone, load_sequence_classifier
from training.reward_eval import reward_differences
from training.reward_probe import LinearProbe, answer_token_counts, is_probe, pooled_features


def format_reward_input(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, max_length: int = 512
) -> list[int]:
    """Token ids of (prompt, answer) for a reward model, at most `max_length` long."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            tokenize=True,
        )
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding (not a dict)
            ids = ids["input_ids"]
        return list(ids)[-max_length:]
    # Encoder: one "[CLS] prompt [SEP] answer [SEP]" sequence, prompt cut from the left.
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    keep_prompt = min(16, budget // 4)  # an answer alone too long still leaves the question's end
    if len(answer_ids) > budget - keep_prompt:
        answer = str(tokenizer.decode(answer_ids[: budget - keep_prompt]))
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        encoded = tokenizer(prompt, answer, truncation="only_first", max_length=max_length)
    finally:
        tokenizer.truncation_side = side
    return list(encoded["input_ids"])[:max_length]


class RewardModel:
    """A trained reward model (a registry version) or any HF sequence classifier.

    With `probe` set, `model` is the frozen backbone (an HF base model) and the reward is the
    probe applied to its pooled hidden states; otherwise `model` is a sequence classifier
    whose single logit is the reward."""

    def __init__(
        self,
        model,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        max_length: int = 512,
        autocast: bool = False,
        probe: LinearProbe | None = None,
    ) -> None:
        self.model, self.tokenizer, self.name, self.max_length = model, tokenizer, name, max_length
        # bfloat16 autocast over float32 weights: the model being trained, scored cheaply.
        self.autocast = autocast
        self.probe = probe

    @classmethod
    def load(
        cls, path_or_id: str | Path, max_length: int | None = None, dtype: str | None = None
    ) -> RewardModel:
        """Load a version folder or any HF model; weights in `dtype` (None: the
        LS_RLHF_DTYPE setting, `auto` by default: bfloat16 where the hardware has it)."""
        if dtype is None:
            from training.settings import Settings

            dtype = Settings.from_env().dtype
        probe = LinearProbe.load(Path(path_or_id)) if is_probe(path_or_id) else None
        if probe is not None:
            model, tokenizer = load_backbone(str(path_or_id), dtype=dtype)
        else:
            model, tokenizer = load_sequence_classifier(str(path_or_id), dtype=dtype)
        name = str(path_or_id)
        metadata_file = Path(path_or_id) / "metadata.json"
        if metadata_file.is_file():
            metadata = json.loads(metadata_file.read_text())
            name = (
                f"{metadata.get('kind', 'reward')}-{metadata.get('version', Path(path_or_id).name)}"
            )
            max_length = max_length or metadata.get("config", {}).get("max_length")
        return cls(model, tokenizer, name, max_length or 512, probe=probe)

    def encode(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list[int]]:
        if len(prompts) != len(answers):
            raise ValueError(
                f"{len(prompts)} prompts but {len(answers)} answers: give one prompt per answer"
            )
        return [
            format_reward_input(self.tokenizer, p, a, self.max_length)
            for p, a in zip(prompts, answers, strict=True)
        ]

    @torch.inference_mode()
    def score(
        self, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32
    ) -> list[float]:
        """The reward of each (prompt, answer), in input order.

        A probe that kept the consensus column (training/consensus.py) ranks the answers to
        one prompt by how much each agrees with the others in this call: score a prompt's
        answers together, as a ranking task shows them; alone or in pairs their consensus
        is 0."""
        encoded = self.encode(prompts, answers)
        if self.probe is not None:
            last = (
                answer_token_counts(self.tokenizer, answers, encoded)
                if self.probe.pooling == "answer"
                else None
            )
            features = pooled_features(
                self.model,
                self.tokenizer,
                encoded,
                [self.probe.layer],
                last_tokens=last,
                batch_size=batch_size,
                desc=f"scoring with {self.name}",
            )[0]
            columns = [features]
            if self.probe.grounding:
                columns.append(grounding_features(prompts, answers))
            if self.probe.consensus:
                columns.append(consensus(prompts, features)[:, None])
            return self.probe(torch.cat(columns, -1)).tolist()
        order = sorted(
            range(len(encoded)), key=lambda i: len(encoded[i])
        )  # similar lengths: less padding
        scores = [0.0] * len(encoded)
        pad = self.tokenizer.pad_token_id or 0
        starts = range(0, len(order), batch_size)
        # A bar (with its ETA) only where scoring takes a while and someone watches a terminal.
        bar = tqdm(
            starts,
            desc=f"scoring with {self.name}",
            unit="batch",
            leave=False,
            disable=None if len(starts) >= 8 else True,
        )
        for start in bar:
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            with torch.autocast(
                self.model.device.type, dtype=torch.bfloat16, enabled=self.autocast
            ):
                logits = self.model(
                    input_ids=input_ids.to(self.model.device),
                    attention_mask=mask.to(self.model.device),
                ).logits
            for row, i in enumerate(idx):
                scores[i] = float(logits[row, 0].float())
        return scores


def pairwise_accuracy(model: RewardModel, dataset: Dataset, batch_size: int = 32) -> float:
    """Fraction of pairs where the chosen answer scores higher than the rejected one.

    Each distinct (prompt, answer) is scored once (`reward_differences`).
    """
    if len(dataset) == 0:
        return float("nan")
    score = functools.partial(model.score, batch_size=batch_size)
    return float((reward_differences(score, dataset) > 0).mean())


def longer_answer_accuracy(dataset: Dataset) -> float:
    """The "longer answer wins" baseline: how often the chosen answer is the longer one."""
    if len(dataset) == 0:
        return float("nan")
    return sum(
        len(c) > len(r) for c, r in zip(dataset["chosen"], dataset["rejected"], strict=True)
    ) / len(dataset)


TRAINED_PAIRS_FILE = "trained_pairs.txt"


def pair_key(prompt: str, chosen: str, rejected: str) -> str:
    return hashlib.sha256(json.dumps([prompt, chosen, rejected]).encode()).hexdigest()[:16]


def trained_pairs(version_path: Path) -> set[str]:
    """Keys (`pair_key`) of the pairs a version was trained on; empty for older versions."""
    path = Path(version_path) / TRAINED_PAIRS_FILE
    return set(path.read_text().split()) if path.is_file() else set()
