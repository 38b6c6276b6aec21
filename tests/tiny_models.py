"""Tiny random models with real tokenizers, built in seconds, saved as HF folders.

They load through exactly the code paths users' models take (`from_pretrained` on a
folder), so tests exercise the real loading, generation, scoring and training code.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The capital of France is Paris. Paris is a city on the river Seine.",
    "Who wrote the novel? It was written by an author in the nineteenth century.",
    "A good answer is helpful, truthful and harmless. A bad answer is wrong or rude.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog again and again.",
    "Explain how plants make food from sunlight, water and carbon dioxide.",
    "Men and women could be doctors, nurses, engineers, teachers or pilots.",
    "yes no maybe great terrible good bad excellent awful happy sad",
    "1 2 3 4 5 6 7 8 9 10 first second third answer question prompt",
] * 20


def build_tiny_policy(folder: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 with a ByteLevel BPE tokenizer and a ChatML chat template."""
    import torch

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=2,
        n_embd=64,
        n_head=2,
        n_positions=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _wordpiece_vocab(specials: list[str]) -> dict[str, int]:
    """The corpus's characters (alone and as "##" continuations) and its whole words, sorted.

    Written out rather than learned: tokenizers' WordPiece trainer breaks ties between equally
    frequent merges arbitrarily, so every build had another vocabulary, the same seed gave
    another model, and a test's outcome varied from run to run."""
    normalizer, pre_tokenizer = (
        normalizers.BertNormalizer(lowercase=True),
        pre_tokenizers.BertPreTokenizer(),
    )
    words = sorted(
        {
            w
            for line in CORPUS
            for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
        }
    )
    characters = sorted({c for w in words for c in w})
    tokens = [*specials, *characters, *(f"##{c}" for c in characters), *words]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def build_tiny_reward_backbone(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT sequence classifier (num_labels=1) with a WordPiece tokenizer.

    Like the default MiniLM backbone, its tokenizer has no eos token and its head is new.
    """
    import torch

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(_wordpiece_vocab(specials), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForSequenceClassification(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_steered_policy(
    folder: Path,
    token: str,
    probability: float,
    generation: dict | None = None,
    seed: int = 0,
) -> Path:
    """The tiny policy made to emit `token` with `probability` at every step, whatever came
    before: a model that ends its answers at a known rate (token = its eos), or favours one
    token. `generation` goes into its generation_config, as a hub model's settings do.

    The final layer norm's scale is set to 0, so the last hidden state is the norm's bias:
    a vector along the token's (tied) embedding, scaled so that softmax gives the token
    `probability` (found by bisection; the embedding is lengthened first, so that no other
    token can win along that direction).
    """
    import torch

    from training.models import load_causal_lm

    build_tiny_policy(folder, seed=seed)
    model, tokenizer = load_causal_lm(str(folder))
    token_id = tokenizer.convert_tokens_to_ids(token)
    embeddings = model.get_input_embeddings().weight  # tied with the language-model head
    with torch.no_grad():
        embeddings[token_id] *= 3
        direction = embeddings[token_id] / embeddings[token_id].norm()
        projections = embeddings @ direction

        def p(scale: float) -> float:
            return torch.softmax(scale * projections, dim=0)[token_id].item()

        low, high = 0.0, 1000.0
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if p(middle) < probability else (low, middle)
        final_norm = model.transformer.ln_f
        final_norm.weight.zero_()
        final_norm.bias.copy_(low * direction)
    for key, value in (generation or {}).items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
