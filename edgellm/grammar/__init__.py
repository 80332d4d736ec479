"""Grammar-constrained decoding: GBNF grammars (llama.cpp's format), JSON schema → GBNF, token masks.

    from edgellm.grammar import Grammar, GrammarMatcher, json_schema_to_gbnf
    g = Grammar.from_gbnf('root ::= "yes" | "no"')
    m = GrammarMatcher(g, tokenizer)      # per generation
    mask = m.allowed_mask(); m.accept(token)
"""
from .gbnf import Grammar, parse_gbnf
from .json_schema import JSON_GBNF, json_schema_to_gbnf
from .matcher import Automaton, GrammarMatcher, VocabIndex

__all__ = [
    "JSON_GBNF",
    "Automaton",
    "Grammar",
    "GrammarMatcher",
    "VocabIndex",
    "compile_grammar",
    "json_schema_to_gbnf",
    "parse_gbnf",
    "response_format_to_schema",
]


def compile_grammar(grammar=None, json_schema=None) -> Grammar | None:
    """A compiled Grammar from GBNF text, an already compiled Grammar, or a JSON schema (dict or JSON text;
    ``{"type": "json_object"}``-style generic JSON via ``json_schema={}``). Compiled grammars are cached by
    their text, so repeated requests with the same grammar share states and token masks."""
    if grammar is not None and json_schema is not None:
        raise ValueError("give either grammar or json_schema, not both")
    if isinstance(grammar, Grammar):
        return grammar
    if grammar is not None:
        if not isinstance(grammar, str):
            raise ValueError(f"grammar must be GBNF text or a compiled Grammar, got {type(grammar).__name__}")
        return _cached(grammar)
    if json_schema is not None:
        return _cached(json_schema_to_gbnf(json_schema))
    return None


_CACHE: dict[str, Grammar] = {}


def _cached(text: str) -> Grammar:
    g = _CACHE.get(text)
    if g is None:
        g = parse_gbnf(text)
        if len(_CACHE) >= 64:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[text] = g
    return g


def response_format_to_schema(response_format):
    """The JSON schema an OpenAI `response_format` asks for, or None for plain text.

    {"type": "text"} -> None; {"type": "json_object"} -> any JSON object (llama-cpp-python also takes an
    optional "schema" there); {"type": "json_schema", "json_schema": {"schema": {...}}} -> that schema."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise ValueError(f"response_format must be a dict with a 'type', got {response_format!r}")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return response_format.get("schema") or {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError('response_format {"type": "json_schema"} needs "json_schema": {"schema": {...}}')
        return spec["schema"]
    raise ValueError(f"unknown response_format type {kind!r} (text | json_object | json_schema)")
