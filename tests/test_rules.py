"""Rules: TOML loading with clear errors, built-in families, user checks, name matching."""

from __future__ import annotations

import pytest

import msbnb_pass as mb
from msbnb_pass.replacements import BUILTIN_REPLACEMENTS
from msbnb_pass.rules import BUILTIN_FAMILIES, Rule, RuleError, RuleSet, name_matches, register_check

from . import zoo


def test_builtin_families():
    for fam in BUILTIN_FAMILIES:
        rs = RuleSet.builtin(fam)
        assert [r.pattern.name for r in rs] == ["linear-cell", "matmul-param-bias", "matmul-param"]
        assert [r.priority for r in rs] == [100, 60, 50]
        assert all(r.where == {"exclude": ["lm_head"]} for r in rs)
    assert RuleSet.builtin("nf4").rules[0].scheme == "nf4"
    assert RuleSet.builtin("llm_int8").rules[0].scheme == "llm_int8"
    with pytest.raises(ValueError, match="unknown rule family 'nf8'"):
        RuleSet.builtin("nf8")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rule]\nname = 'x'", r"bad.toml: TOML syntax error"),
        (
            "[[rule]]\nname = 'r1'\npattern = 'nope'\nrewrite = { to = 'linear4bit' }",
            r"bad.toml:1: rule 'r1': unknown pattern 'nope'; known: \['embedding-cell', 'linear-cell'",
        ),
        (
            "[[rule]]\nname = 'r2'\npattern = 'linear-cell'\nrewrite = { to = 'linear5bit' }",
            r"bad.toml:1: rule 'r2': 'rewrite.to' = 'linear5bit': unknown replacement 'linear5bit'",
        ),
        (
            "[[rule]]\nname = 'r3'\npattern = 'linear-cell'\nrewrite = { to = 'linear4bit', bits = 3 }",
            r"bad.toml:4: rule 'r3': unknown key 'rewrite.bits' for replacement 'linear4bit'",
        ),
        (
            "[[rule]]\nname = 'r4'\npattern = 'linear-cell'\nwhere = { min_in = 3 }\nrewrite = { to = 'linear4bit' }",
            r"bad.toml:4: rule 'r4': unknown condition 'where.min_in'",
        ),
        (
            "[[rule]]\nname = 'r5'\npattern = 'linear-cell'\npriority = 'high'\nrewrite = { to = 'linear4bit' }",
            r"bad.toml:1: rule 'r5': 'priority' must be an integer, got 'high'",
        ),
        (
            "[[rule]]\nname = 'r6'\npattern = 'linear-cell'\ncolour = 1\nrewrite = { to = 'linear4bit' }",
            r"bad.toml:1: rule 'r6': unknown key\(s\) \['colour'\]",
        ),
        ("[pattern.p]\nnodes.a = { kind = 'cel' }", r"bad.toml:1: pattern 'p': nodes.a.kind must be one of"),
        (
            "[pattern.p]\nnodes.a = { kind = 'cell', shape = 2 }",
            r"bad.toml:1: pattern 'p': nodes.a: unknown key\(s\) \['shape'\]",
        ),
        (
            "[pattern.p]\nnodes.a = { kind = 'cell' }\nedges = [['a', 'b']]",
            r"bad.toml:1: pattern 'p': edge names unknown node 'b'",
        ),
        ("[linear.'x.Y']\nweights = 'w'", r"bad.toml:1: linear\.'x.Y': unknown key\(s\) \['weights'\]"),
        ("[[rule]]\nname = 'r7'\nrewrite = { to = 'linear4bit' }", r"bad.toml:1: rule 'r7': missing key 'pattern'"),
    ],
)
def test_malformed_rule_files_name_file_rule_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RuleError, match=message):
        RuleSet.from_toml(path)


def test_missing_rule_file():
    with pytest.raises(RuleError, match="nowhere.toml: cannot read the rule file"):
        RuleSet.from_toml("nowhere.toml")


def test_name_matching():
    assert name_matches("model.lm_head", "lm_head") and name_matches("lm_head", "lm_head")
    assert name_matches("encoder.layer.0.fc", "encoder") and name_matches("a.classifier", "*.classifier")
    assert not name_matches("lm_head_extra", "lm_head") and not name_matches("model.head", "lm_head")
    assert name_matches("layers.3.mlp.up_proj", "re:layers\\.[0-4]\\.mlp") and not name_matches(
        "layers.7.mlp", "re:layers\\.[0-4]\\."
    )


def test_conditions_and_user_checks(ms_cpu):
    @register_check("not_query")
    def not_query(cand, value):
        return "queries stay in float" if value and cand.path.endswith("query") else None

    rule = mb.Rule("mine", "linear-cell", {"to": "linear8bit"}, where={"min_out_features": 100, "not_query": True})
    trace = mb.explain(zoo.make_bert(), mb.RuleSet([rule]))
    assert trace.decision("encoder.0.intermediate").rule == "mine"  # 128 outputs
    assert trace.decision("encoder.0.value").reasons["mine"] == "too small: out_features=64 (min_out_features = 100)"
    rule2 = mb.Rule("mine2", "linear-cell", {"to": "linear8bit"}, where={"not_query": True, "dtype": ["float32"]})
    trace = mb.explain(zoo.make_bert(), mb.RuleSet([rule2]))
    assert trace.decision("encoder.1.query").reasons["mine2"] == "queries stay in float"
    assert trace.decision("encoder.1.key").rule == "mine2"


def test_rules_from_python_and_files_combine(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(
        "[[rule]]\nname = 'only-pooler'\npattern = 'linear-cell'\npriority = 200\n"
        "where = { include = ['pooler'] }\nrewrite = { to = 'linear8bit', symmetric = false }\n"
    )
    rs = RuleSet.from_toml(path) + RuleSet.builtin("nf4")
    assert [r.name for r in rs][:2] == ["only-pooler", "nf4-linear"]
    with pytest.raises(RuleError, match="rule 'only-pooler' is defined twice"):
        rs + RuleSet.from_toml(path)


def test_a_rule_file_loaded_on_a_base_may_name_its_replacements():
    base = RuleSet()
    base.register_replacement(
        "int8_mine", BUILTIN_REPLACEMENTS["linear8bit"].build, dict(BUILTIN_REPLACEMENTS["linear8bit"].params), "int8"
    )
    base.add(Rule("first", "linear-cell", {"to": "linear8bit"}, priority=1))
    text = '[[rule]]\nname = "mine"\npattern = "matmul-param"\nrewrite = { to = "int8_mine", per_channel = false }\n'
    with pytest.raises(RuleError, match=r"mine.toml:1: rule 'mine': 'rewrite.to' = 'int8_mine': unknown replacement"):
        RuleSet.from_toml("mine.toml", text)
    loaded = RuleSet.from_toml("mine.toml", text, base=base)
    assert [r.name for r in loaded] == ["first", "mine"]
    assert loaded.rules[1].replacement_params()["per_channel"] is False
    assert [r.name for r in base] == ["first"]  # the base is not changed
    with pytest.raises(TypeError, match="from_toml: base must be a RuleSet or None, got str"):
        RuleSet.from_toml("mine.toml", text, base="nf4")
