"""edgellm: LLM inference for CPUs and edge devices.

    from edgellm import LLM
    llm = LLM("smollm2")
    print(llm.create_chat_completion([{"role": "user", "content": "Hi!"}])["choices"][0]["message"]["content"])
"""

from .errors import ChatTemplateError, ContextLengthError, EdgeLLMError, GGUFError, ModelError, TextError, TokenError

__version__ = "0.1.0"
__all__ = ["LLM", "Llama", "EdgeLLMError", "GGUFError", "ModelError", "ContextLengthError", "ChatTemplateError", "TextError", "TokenError"]


def __getattr__(name):
    # `LLM` pulls in the whole driver (jinja2, the backends); tools that only read a GGUF don't pay for it.
    if name in ("LLM", "Llama"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgellm' has no attribute {name!r}")
