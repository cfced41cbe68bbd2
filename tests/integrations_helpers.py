"""Tiny offline models, a word-level tokenizer and reference losses for the integration tests.

Nothing is downloaded: models are built from configs with fixed seeds, the tokenizer from a
``tokenizers`` WordLevel model. The reference losses are written here from the definitions
(full logits, float64), independent of caad_kernels.
"""

from __future__ import annotations

import torch

VOCAB = 63
PAD, EOS, UNK = 60, 61, 62
IGNORE = -100


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(PAD)}
    vocab.update({"<pad>": PAD, "<eos>": EOS, "<unk>": UNK})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _common(hidden: int, vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS,
                bos_token_id=EOS, tie_word_embeddings=False)


def causal_lm(kind: str = "llama", seed: int = 0, hidden: int = 16, vocab: int = VOCAB, **config: object):
    """A one-layer ``*ForCausalLM`` of ``kind`` (llama, cohere, granite, gemma2), seeded, in train mode."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM),
        "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    settings = _common(hidden, vocab)
    if kind == "gemma2":
        settings.update(head_dim=hidden // 2, query_pre_attn_scalar=hidden // 2)
    settings.update(config)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings))
    with torch.no_grad():  # larger logits than the default init, so that transforms and mistakes show
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def batch(batch_size: int = 2, length: int = 7, seed: int = 0, ignored_prefix: tuple[int, ...] | None = None):
    """``input_ids``, ``attention_mask`` and ``labels`` (a prompt prefix of each row ignored)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, PAD, (batch_size, length), generator=g)
    labels = ids.clone()
    prefix = ignored_prefix or tuple(int(x) for x in torch.randint(1, length - 1, (batch_size,), generator=g))
    for row, n in enumerate(prefix):
        labels[row, :n] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def kl_rows(student_logits, teacher_logits, beta=0.0, temperature=1.0):
    """Per-row generalised JSD (TRL's beta convention) of float64 logits ``[..., V]``: ``[...]``."""
    log_q = torch.log_softmax(student_logits.double() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    if beta == 0:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if beta == 1:
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_p + torch.log(torch.tensor(beta, dtype=torch.float64)),
                                         log_q + torch.log(torch.tensor(1 - beta, dtype=torch.float64))]), dim=0)
    return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
