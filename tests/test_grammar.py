"""GBNF parsing, the pushdown matcher over bytes / code points, token masks, and grammar-constrained sampling."""
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm.grammar import (
    JSON_GBNF,
    Grammar,
    GrammarMatcher,
    VocabIndex,
    compile_grammar,
    parse_gbnf,
)
from edgellm.sampling import Sampler, SamplingParams


def matches(grammar, text) -> bool:
    g = grammar if isinstance(grammar, Grammar) else parse_gbnf(grammar)
    a = g.automaton
    data = text.encode("utf-8") if isinstance(text, str) else text
    s = a.step_bytes(a.initial, data)
    return s >= 0 and a.accepting[s]


def prefix_ok(grammar, text) -> bool:
    g = grammar if isinstance(grammar, Grammar) else parse_gbnf(grammar)
    a = g.automaton
    return a.step_bytes(a.initial, text.encode("utf-8") if isinstance(text, str) else text) >= 0


class FakeVocab:
    def __init__(self, pieces, eog=()):
        self.pieces = [p.encode() if isinstance(p, str) else p for p in pieces]
        self.n_vocab = len(self.pieces)
        self.eog_ids = frozenset(eog)

    def token_bytes(self, i):
        return self.pieces[i]

    def is_eog(self, i):
        return i in self.eog_ids


# ---- parsing -------------------------------------------------------------------------------------------

def test_literals_alternatives_sequences():
    g = parse_gbnf('root ::= "yes" | "no" | "ma" "ybe"')
    assert all(matches(g, s) for s in ("yes", "no", "maybe"))
    assert not any(matches(g, s) for s in ("", "ye", "yesno", "Yes", "may"))


def test_escapes_in_literals_and_classes():
    g = parse_gbnf(r'root ::= "a\"b\\c\n\t\x41\u00e9\U0001F600" [\]\-\\^]')
    assert matches(g, 'a"b\\c\n\tAé😀]')
    assert matches(g, 'a"b\\c\n\tAé😀-') and matches(g, 'a"b\\c\n\tAé😀\\') and matches(g, 'a"b\\c\n\tAé😀^')
    assert not matches(g, 'a"b\\c\n\tAé😀x')


def test_classes_ranges_negation_dot():
    g = parse_gbnf("root ::= [a-cx] [^0-9\\n] .")
    assert matches(g, "a!\n") and matches(g, "xZé") and matches(g, "cé😀")
    assert not matches(g, "d!!") and not matches(g, "a5!") and not matches(g, "a\n!")
    assert matches("root ::= [^a]", "é") and not matches("root ::= [^a]", "a")


def test_repetition_operators():
    g = parse_gbnf('root ::= "a"* "b"+ "c"? "d"{2} "e"{1,3} "f"{2,}')
    assert matches(g, "bdde" + "ff") and matches(g, "aaabbbcddeeefff")
    assert not matches(g, "dde" + "ff")       # b+ needs one
    assert not matches(g, "bddeeeeff")        # e{1,3}
    assert not matches(g, "bddef")            # f{2,}
    assert not matches(g, "bdeff")            # d{2}
    g = parse_gbnf('root ::= ("ab" | "c"){0,2}')
    assert all(matches(g, s) for s in ("", "ab", "c", "abc", "cab", "cc"))
    assert not matches(g, "abcab")
    assert matches('root ::= "x"{0}', "") and not matches('root ::= "x"{0}', "x")


def test_grouping_comments_and_multiline_rules():
    text = """
    # a comment line
    root ::= greeting ws name   # trailing comment
    greeting ::= (
        "hi"
      | "hello"
    )
    ws ::= [ \\t]+
    name ::= [A-Z] [a-z]*
      | "you"
    """
    g = parse_gbnf(text)
    assert matches(g, "hi Bob") and matches(g, "hello\t you") and not matches(g, "hey Bob")
    assert g.rule_names[g.root] == "root"


def test_recursion_nested_structures():
    g = parse_gbnf('root ::= "(" root* ")"')
    assert matches(g, "()") and matches(g, "(()(()))") and not matches(g, "(()") and not matches(g, "())")


@pytest.mark.parametrize("text, msg", [
    ("", "empty"),
    ('x ::= "a"', "root"),
    ("root ::= undefined", "never defined"),
    ('root ::= "a', "unterminated"),
    ("root ::= [abc", "unterminated"),
    ("root ::= (\"a\"", "expected '\\)'"),
    ('root ::= "a")', "unbalanced"),
    ('root ::= "\\q"', "escape"),
    ('root ::= "\\x4"', "hex"),
    ("root ::= [z-a]", "reversed"),
    ('root ::= "a"{3,1}', "max < min"),
    ('root ::= "a"{100000}', "above"),
    ('root ::= "a"{1', "\\}"),
    ('root ::= root "a" | "b"', "left-recursive"),
    ('root ::= a\na ::= b "x"\nb ::= "y"? a', "left-recursive"),
    ('root ::= ("a"?)*', "left-recursive"),
    ('root ::= "a"\nroot ::= "b"', "twice"),
    ("root = \"a\"", "::="),
    ("root ::= @", "unexpected"),
])
def test_malformed_grammars_raise(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_gbnf(text)


def test_expansion_limits():
    # repeating a rule costs one reference per copy, so this is small...
    assert matches(parse_gbnf('root ::= ("a"{10000}){3}'), "a" * 30000)
    # ...but long sequences repeated many times are refused, not expanded for minutes
    with pytest.raises(ValueError, match="elements"):
        parse_gbnf("root ::= " + " ".join(['"abcdefghij"{9999}'] * 6))
    with pytest.raises(ValueError):
        parse_gbnf("root ::= " + "(" * 500 + '"a"' + ")" * 500)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list('root::= |()[]^-"ab\\x*+?{},.#\n\t0123456789az')), max_size=60))
def test_fuzzed_grammar_text_parses_or_raises_value_error(text):
    try:
        g = parse_gbnf(text)
    except ValueError:
        return
    a = g.automaton
    for s in (b"", b"a", b"ab", b"\xc3\xa9", b"{}"):
        a.step_bytes(a.initial, s)  # never hangs or crashes


# ---- matching bytes and code points ----------------------------------------------------------------------

def test_utf8_split_across_steps_and_invalid_bytes():
    g = parse_gbnf('root ::= "é" [α-ω]+')
    a = g.automaton
    e = "é".encode()
    s = a.step(a.initial, e[0])
    assert s >= 0 and not a.accepting[s]           # half a code point: alive, not complete
    s = a.step(s, e[1])
    s = a.step_bytes(s, "λ".encode())
    assert s >= 0 and a.accepting[s]
    assert a.step(a.initial, 0x80) < 0              # a stray continuation byte
    assert a.step(a.initial, 0xFF) < 0
    assert a.step(a.initial, "è".encode()[0]) >= 0  # same lead byte as é: could still be é
    assert a.step_bytes(a.initial, "è".encode()) < 0
    assert a.step(a.initial, 0xE2) < 0              # a 3-byte lead: no code point in the class starts so


def test_overlong_surrogate_and_out_of_range_utf8_rejected():
    a = parse_gbnf('root ::= "e"').automaton
    assert a.accepting[a.step_bytes(a.initial, b"e")]
    assert a.step_bytes(a.initial, b"\xe0\x81\xa5") < 0   # overlong 3-byte "e"
    assert a.step_bytes(a.initial, b"\xc1\xa5") < 0       # overlong 2-byte "e"
    assert a.step(a.initial, 0xE0) < 0                    # no 3-byte sequence can spell "e"
    anything = parse_gbnf("root ::= .").automaton
    assert anything.step_bytes(anything.initial, b"\xed\xa0\x80") < 0      # a surrogate
    assert anything.step_bytes(anything.initial, b"\xf4\x90\x80\x80") < 0  # beyond U+10FFFF
    assert anything.step_bytes(anything.initial, b"\xed\xa0") < 0           # can only end as a surrogate
    assert anything.accepting[anything.step_bytes(anything.initial, "\U0010FFFF".encode())]


def test_json_grammar_samples():
    g = parse_gbnf(JSON_GBNF)
    good = ['{}', '{"a": 1}', '{"a": [1, -2.5e+3, "x\\n\\u00e9", true, null, {"b": {}}]}', '{ "é": "ü" } ']
    bad = ['[]', '{"a": 01}', '{"a": }', '{"a" 1}', "{'a': 1}", '{"a": "\x01"}', '{"a": 1,}', '{}{}']
    assert all(matches(g, s) for s in good)
    assert not any(matches(g, s) for s in bad)


# ---- token masks ---------------------------------------------------------------------------------------

PIECES = ["a", "b", "ab", "ba", "abc", "c", " ", "\"", "{", "}", "{\"", "\":", "1", "12", "x", "é".encode()[:1],
          "é".encode()[1:], "é", "aé", "", "\n"]
EOG = 21


def brute_force_mask(g, vocab, state):
    a = g.automaton
    out = np.zeros(vocab.n_vocab, bool)
    for i, p in enumerate(vocab.pieces):
        if i in vocab.eog_ids:
            out[i] = a.accepting[state]
        elif p:
            out[i] = a.step_bytes(state, p) >= 0
    return out


GRAMMARS = [
    'root ::= ("a" | "b")+ "c"',
    'root ::= "{" ( "\\"" [a-z]* "\\":" [0-9]+ )? "}"',
    'root ::= [^c]* "c"',
    'root ::= "é"+ | "a" "é" "x"',
    'root ::= ([ab]{2} " "?){1,3}',
    JSON_GBNF,
]


@pytest.mark.parametrize("grammar", GRAMMARS)
def test_mask_equals_brute_force_along_random_walks(grammar):
    vocab = FakeVocab(PIECES + ["<eos>"], eog=[EOG])
    vocab.pieces[EOG] = b""
    g = parse_gbnf(grammar)
    rng = np.random.default_rng(0)
    for walk in range(20):
        m = GrammarMatcher(g, vocab)
        for _ in range(12):
            mask = m.allowed_mask()
            np.testing.assert_array_equal(mask, brute_force_mask(g, vocab, m.state))
            assert mask[EOG] == m.can_end
            assert not mask[19]  # the empty piece: never allowed
            choices = np.flatnonzero(mask)
            if choices.size == 0:
                break
            t = int(rng.choice(choices))
            assert m.is_allowed(t)
            if t == EOG:
                break
            m.accept(t)
        with pytest.raises(ValueError):
            m.accept(19)


def test_partial_utf8_tokens():
    # "é" arrives as two byte tokens; in between, only its continuation byte is allowed
    vocab = FakeVocab(["é".encode()[:1], "é".encode()[1:], "é", "e", "x", "<eos>"], eog=[5])
    vocab.pieces[5] = b""
    m = GrammarMatcher(parse_gbnf('root ::= "é" "x"'), vocab)
    assert list(np.flatnonzero(m.allowed_mask())) == [0, 2]
    m.accept(0)
    assert list(np.flatnonzero(m.allowed_mask())) == [1]
    m.accept(1)
    assert list(np.flatnonzero(m.allowed_mask())) == [4]
    m.accept(4)
    assert m.can_end and m.is_complete
    assert list(np.flatnonzero(m.allowed_mask())) == [5]


def test_constrained_sampling_with_fake_vocab():
    # (":" alone is needed: without it `{""` is a dead end this vocabulary cannot continue)
    vocab = FakeVocab(PIECES + ["<eos>", ":"], eog=[EOG])
    vocab.pieces[EOG] = b""
    g = 'root ::= "{" ( "\\"" [a-z]{0,6} "\\":" [0-9]{1,3} )? "}"'
    for first in (False, True):
        for seed in range(30):
            s = Sampler(SamplingParams(seed=seed, grammar=g, grammar_first=first, top_k=0, min_p=0.0), vocab=vocab)
            rng = np.random.default_rng(seed)
            out = b""
            for _ in range(40):
                t = s.sample(rng.standard_normal(vocab.n_vocab).astype(np.float32), [])
                s.accept(t)
                if t == EOG:
                    break
                out += vocab.pieces[t]
            assert t == EOG, out
            assert matches(g, out), out


def test_distribution_is_masked():
    vocab = FakeVocab(["a", "b", "c", "<eos>"], eog=[3])
    vocab.pieces[3] = b""
    s = Sampler(SamplingParams(grammar='root ::= "a" | "b"', **dict(top_k=0, top_p=1.0, min_p=0.0)), vocab=vocab)
    ids, probs = s.distribution(np.array([0.0, 0.0, 5.0, 5.0], np.float32))
    assert sorted(ids.tolist()) == [0, 1] and probs == pytest.approx([0.5, 0.5])
    # greedy picks the best allowed token, not the best token
    s = Sampler(SamplingParams(grammar='root ::= "a" | "b"', temperature=0), vocab=vocab)
    assert s.sample(np.array([0.0, 1.0, 5.0, 5.0], np.float32)) == 1


def test_compile_grammar_caches_and_validates():
    assert compile_grammar('root ::= "a"') is compile_grammar('root ::= "a"')
    g = parse_gbnf('root ::= "a"')
    assert compile_grammar(g) is g and compile_grammar() is None
    with pytest.raises(ValueError):
        compile_grammar('root ::= "a"', json_schema={})
    with pytest.raises(ValueError):
        compile_grammar(42)


# ---- the real vocabulary: masking cost (printed, not asserted) --------------------------------------------

def test_mask_cost_on_smollm2_vocabulary(smollm2_path, capsys):
    import json

    from edgellm.model import Model

    model = Model(smollm2_path)
    tok = model.tokenizer
    t0 = time.perf_counter()
    VocabIndex.for_tokenizer(tok)
    t_index = time.perf_counter() - t0
    g = parse_gbnf(JSON_GBNF)
    text = json.dumps({"name": "Ada Lovelace", "born": 1815, "tags": ["math", "poetry"], "x": -1.5e3,
                       "ok": True, "note": "café ☕"}, ensure_ascii=False)
    ids = tok.encode(text, add_special=False)
    m = GrammarMatcher(g, tok)
    cold = []
    for t in ids:
        a = time.perf_counter()
        mask = m.allowed_mask()
        cold.append(time.perf_counter() - a)
        assert mask[t], (t, tok.token_bytes(t))
        m.accept(t)
    assert m.can_end
    assert m.allowed_mask()[tok.eos_id] or any(m.allowed_mask()[i] for i in tok.eog_ids)
    m.reset()
    warm = []
    for t in ids:
        a = time.perf_counter()
        m.allowed_mask()
        warm.append(time.perf_counter() - a)
        m.accept(t)
    with capsys.disabled():
        print(f"\n[grammar] vocab index {t_index * 1e3:.0f} ms; mask per step over {len(ids)} tokens: "
              f"cold mean {np.mean(cold) * 1e3:.2f} ms (max {np.max(cold) * 1e3:.2f}), "
              f"cached mean {np.mean(warm) * 1e6:.1f} us")
    model.close()
