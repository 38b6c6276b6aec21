"""Learning from language feedback (ILF; Scheurer et al., 2022, "Training Language Models
with Language Feedback").

For each critique (prompt, answer, written feedback):

1. the policy writes `num_refinements` refinements conditioned on the prompt, its answer
   and the feedback (`REFINE_TEMPLATE`);
2. one refinement is kept by this rule: the candidate whose embedding is most similar to
   the feedback's, relative to how similar the original answer already was
   (cos(feedback, refinement) - cos(feedback, answer)), i.e. the one that moved furthest
   toward what the feedback asks for; embeddings are mean-pooled hidden states of an
   encoder (the reward backbone, all-MiniLM-L6-v2 by default). Scheurer et al. select
   with a model judging whether a refinement incorporates the feedback; an embedding
   similarity is the offline stand-in used here. A rewrite the annotator wrote
   (`refinement` column) is always kept instead: a person's refinement beats a sampled one;
3. the policy is fine-tuned (SFT) on prompt -> kept refinement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

from training.generation import generate_completions

REFINE_TEMPLATE = (
    "{prompt}\n\nA draft answer:\n{answer}\n\nFeedback on the draft:\n{feedback}\n\n"
    "Write an improved answer that addresses the feedback."
)


@dataclass
class Embedder:
    """Mean-pooled, normalized encoder embeddings."""

    model: torch.nn.Module
    tokenizer: Any  # a transformers tokenizer (callable on a batch of texts)

    @classmethod
    def load(cls, name_or_path: str) -> Embedder:
        from transformers import AutoModel, AutoTokenizer

        from training.models import MODEL_LOADING

        with MODEL_LOADING:  # see there: the default dtype is process-wide
            model = AutoModel.from_pretrained(name_or_path, dtype=torch.float32)
        return cls(model.eval(), AutoTokenizer.from_pretrained(name_or_path))

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        hidden = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)


def select_refinement(
    embed: Embedder, feedback: str, answer: str, candidates: list[str]
) -> tuple[int, list[float]]:
    """Index of the kept candidate and every candidate's score (see the module docstring)."""
    vectors = embed([feedback, answer, *candidates])
    baseline = float(vectors[0] @ vectors[1])
    scores = [float(vectors[0] @ v) - baseline for v in vectors[2:]]
    return max(range(len(scores)), key=scores.__getitem__), scores


def refinements(
    critiques: Dataset,
    policy,
    tokenizer,
    embed: Embedder,
    num_refinements: int = 4,
    max_new_tokens: int = 128,
    seed: int = 0,
) -> Dataset:
    """prompt/completion pairs of kept refinements, with how each was chosen."""
    needs_model = [i for i, r in enumerate(critiques["refinement"]) if not r]
    requests = [
        REFINE_TEMPLATE.format(
            prompt=critiques[i]["prompt"],
            answer=critiques[i]["completion"],
            feedback=critiques[i]["feedback"],
        )
        for i in needs_model
    ]
    sampled = (
        generate_completions(
            policy,
            tokenizer,
            requests,
            num_completions=num_refinements,
            max_new_tokens=max_new_tokens,
            temperature=0.8,
            seed=seed,
        )
        if requests
        else []
    )
    generated = dict(zip(needs_model, sampled, strict=True))
    rows: dict[str, list] = {"prompt": [], "completion": [], "chosen_by": [], "selection_score": []}
    for i, row in enumerate(critiques):
        if row["refinement"]:
            kept, how, score = row["refinement"], "annotator", float("nan")
        else:
            candidates = [c for c in generated[i] if c.strip()] or generated[i]
            index, scores = select_refinement(embed, row["feedback"], row["completion"], candidates)
            kept, how, score = candidates[index], "feedback similarity", scores[index]
        rows["prompt"].append(row["prompt"])
        rows["completion"].append(kept)
        rows["chosen_by"].append(how)
        rows["selection_score"].append(score)
    return Dataset.from_dict(rows)
