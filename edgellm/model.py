"""A model on disk made ready to run: GGUF container + architecture + hyper-parameters + tokenizer + chat template.

Loading is cheap: tensors stay in the mmap until a backend asks for them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .arch import get_arch
from .chat import ChatTemplate
from .errors import ModelError
from .gguf import GGUFFile
from .tokenizer import load_tokenizer


class Model:
    def __init__(self, path: str | os.PathLike):
        t0 = time.perf_counter()
        self.path = Path(path)
        self.gguf = GGUFFile(self.path)
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
            self.chat_template = ChatTemplate.from_metadata(self.gguf.metadata, self.tokenizer)
        except BaseException:
            self.gguf.close()
            raise
        self.load_seconds = time.perf_counter() - t0

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
