"""A model on disk made ready to run: GGUF container + architecture + hyper-parameters + tokenizer + chat template.

Loading is cheap: tensors stay in the mmap until a backend asks for them; the chat template compiles on first use.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .arch import get_arch
from .errors import ModelError
from .gguf import GGUFFile
from .memory import fixed_trim_threshold
from .tokenizer import load_tokenizer


class Model:
    def __init__(self, path: str | os.PathLike, use_mmap: bool = True):
        """use_mmap=False reads the file into memory instead of mapping it (llama.cpp's --no-mmap)."""
        t0 = time.perf_counter()
        fixed_trim_threshold()   # loading and sampling free MBs of temporaries: give them back (edgellm/memory.py)
        self.path = Path(path)
        self.gguf = GGUFFile(self.path) if use_mmap else GGUFFile(self.path, use_mmap=False)
        try:
            arch_name = self.gguf.get_str("general.architecture", required=True)
            self.arch = get_arch(arch_name)
            self.hparams = self.arch.HParams.from_gguf(self.gguf)
            self.tokenizer = load_tokenizer(self.gguf.metadata)
            if self.tokenizer.n_vocab != self.hparams.n_vocab:
                raise ModelError(
                    f"{self.path}: tokenizer has {self.tokenizer.n_vocab} tokens but token_embd.weight has "
                    f"{self.hparams.n_vocab} rows"
                )
            self._chat_template = None   # compiled on first use (the chat_template property)
        except BaseException:
            self.gguf.close()
            raise
        self.load_seconds = time.perf_counter() - t0

    @property
    def chat_template(self):
        """The model's chat template (edgellm.chat.ChatTemplate), compiled on first use: a plain completion never
        imports jinja2 (~7 MB resident). A template that does not compile raises ChatTemplateError here."""
        if self._chat_template is None:
            from .chat import ChatTemplate

            self._chat_template = ChatTemplate.from_metadata(self.gguf.metadata, self.tokenizer)
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template) -> None:
        self._chat_template = template

    @property
    def chat_template_kind(self) -> str:
        """The chat template's kind without compiling it: "model" (the file's own), else the built-in fallback
        ("gemma" for gemma3, "chatml"), as ChatTemplate.from_metadata chooses."""
        if self._chat_template is not None:
            return self._chat_template.kind
        source = self.gguf.metadata.get("tokenizer.chat_template")
        if isinstance(source, bytes):
            source = source.decode("utf-8", errors="replace")
        if source is not None and not isinstance(source, str):
            return self.chat_template.kind   # from_metadata raises the ChatTemplateError that names it
        if source is not None and source.strip():
            return "model"
        return "gemma" if self.gguf.metadata.get("general.architecture") == "gemma3" else "chatml"

    def chat_ids(self, messages, max_chars: int | None = None, **extra) -> list[int]:
        """The token ids of a chat prompt: the template rendered with the generation prompt, message text kept
        non-special, BOS added once where the template did not write it (as llama.cpp does). max_chars: only that
        much of each rendered piece (the start of a prompt, for routing)."""
        tok = self.tokenizer
        ids: list[int] = []
        for text, parse_special in self.chat_template.render(messages, add_generation_prompt=True, **extra):
            ids += tok.encode(text if max_chars is None else text[:max_chars], add_special=False,
                              parse_special=parse_special)
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return ids

    @property
    def name(self) -> str:
        return self.gguf.get_str("general.name", default=None) or self.path.stem

    @property
    def weight_bytes(self) -> int:
        """Bytes of all tensors in the file: what one decode step streams from memory, roughly."""
        return sum(t.nbytes for t in self.gguf.tensors.values())

    def close(self) -> None:
        self.gguf.close()

    def __repr__(self) -> str:
        hp = self.hparams
        return f"Model({str(self.path)!r}, arch={hp.arch}, n_layer={hp.n_layer}, n_embd={hp.n_embd}, n_vocab={hp.n_vocab})"
