"""The errors edgellm raises on bad input. Each names what is wrong; none is a crash."""


class EdgeLLMError(Exception):
    """Base of every error edgellm raises on purpose."""


class GGUFError(EdgeLLMError, ValueError):
    """The file is not a well-formed GGUF container (header, metadata, tensor table, data layout)."""


class ModelError(EdgeLLMError, ValueError):
    """The container is well formed but its contents do not describe a model edgellm can run."""


class ContextLengthError(EdgeLLMError, ValueError):
    """A prompt (plus what must be generated) does not fit the context window."""


class ChatTemplateError(EdgeLLMError, ValueError):
    """The model's chat template failed to render, or tried to reach outside its sandbox."""


class BatchError(EdgeLLMError, ValueError):
    """A batch handed to a backend is malformed: token ids outside the vocabulary, positions that do not increase
    within a sequence or that the sequence's cache does not hold, sequence ids without a cache."""


class SamplingError(EdgeLLMError, ValueError):
    """A sampling keyword that does not exist, or a value out of its range."""


class TextError(EdgeLLMError, ValueError):
    """Input text that is not valid Unicode (a lone surrogate), or a file that is not the text it should be."""


class TokenError(EdgeLLMError, ValueError):
    """A token id that is not an integer of the model's vocabulary (detokenize, logits, a prompt of ids)."""


class ToolError(EdgeLLMError, ValueError):
    """A malformed `tools` list or `tool_choice` in a chat completion."""
