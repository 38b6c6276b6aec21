"""Runs inside the vLLM server's worker (its own environment): imports nothing of ours.

`vllm serve --worker-extension-cls ml_backend.harness.vllm_worker.WeightReload` mixes this
class into vLLM's worker, so `POST /collective_rpc {"method": "reload_from", "args":
[folder]}` (a development endpoint, VLLM_SERVER_DEV_MODE=1) loads a policy's new weights
from a folder of safetensors in place, without restarting the server.

vLLM's own `reload_weights(weights_path=...)` does the loading; what it misses (vLLM
0.32 on CPU) is a model whose language-model head is tied to its input embeddings, as
SmolLM2's and GPT-2's are: the checkpoint holds no separate head, so the head keeps its
old prepacked weights and the server samples from a model that is half old, half new.
The head is tied again to the reloaded embeddings and its kernel prepared again.
"""

from __future__ import annotations

from typing import Any


class WeightReload:
    # No other attribute: vLLM refuses an extension whose names clash with its worker's.
    def reload_from(self, folder: str) -> str:
        """Reload the weights in `folder`; returns what was done, for the caller's log."""
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            ParallelLMHead,
            VocabParallelEmbedding,
        )

        worker: Any = self  # vLLM's worker, which this class is mixed into
        worker.reload_weights(weights_path=folder)
        model = worker.model_runner.get_model()
        if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            return "reloaded"
        heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
        embeddings = [
            m
            for m in model.modules()
            if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
        ]
        if len(heads) != 1 or len(embeddings) != 1:
            return f"reloaded; {len(heads)} heads, {len(embeddings)} embeddings: not tied again"
        head = heads[0]
        head.weight = embeddings[0].weight
        head.quant_method.process_weights_after_loading(head)
        return "reloaded; head tied to the embeddings again"
