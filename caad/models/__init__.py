"""Teacher and student speech LMs behind one interface, tiny factories and a locally trained tokenizer."""

from caad.models.tokenizer import DEFAULT_SPECIAL_TOKENS, audio_token_ids, build_prompt, train_tokenizer

__all__ = ["DEFAULT_SPECIAL_TOKENS", "audio_token_ids", "build_prompt", "train_tokenizer"]
