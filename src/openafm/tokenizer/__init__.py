"""Byte-level BPE tokenizer and the model's chat template."""

from openafm.tokenizer.bpe import Tokenizer, load_tokenizer
from openafm.tokenizer.chat import ChatTemplate, ChatTemplateError, chat_messages

__all__ = ["ChatTemplate", "ChatTemplateError", "Tokenizer", "chat_messages", "load_tokenizer"]
