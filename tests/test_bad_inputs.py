"""Bad and unusual inputs: each is refused with a class from msbnb_pass.errors and a message naming the culprit,
or handled as documented; never a traceback, a silent oddity or a wrong result.

The first tests reproduce the six cases of the "rules are data" issue; the rest cover one input per
requirement (rule sets owning their state, regexes checked at load, config typos, skip lists that match
nothing, keep_float on NaN weights, state-dict loaders, the CLI's exit codes and output paths, summary)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import msbnb_pass as mb
from msbnb_pass import errors
from msbnb_pass.errors import (
    CheckpointError,
    CheckpointKeyError,
    ConfigError,
    MsbnbError,
    QuantizationError,
    RewriteError,
    RuleError,
)
from msbnb_pass.rules import RuleSet

REPO = Path(__file__).resolve().parents[1]


def msbnb(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOG_v": "3", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "msbnb_pass.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def assert_one_line_error(out: subprocess.CompletedProcess, *parts: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("msbnb ")]
    assert len(lines) == 1, out.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


def fingerprint(net, x) -> str:
    """Every parameter's name, dtype and bytes plus the output on ``x``, hashed."""
    import hashlib

    h = hashlib.sha256()
    for name, p in net.parameters_and_names():
        h.update(name.encode() + str(p.dtype).encode() + p.asnumpy().tobytes())
    h.update(net(x).asnumpy().tobytes())
    return h.hexdigest()


FINGERPRINT_SCRIPT = """
import hashlib, numpy as np, mindspore as ms, msbnb_pass as mb
from mindspore import Tensor
from tests import zoo
ms.set_device("CPU")
net = zoo.make_bert()
mb.apply(net, "nf4")
x = Tensor(np.random.default_rng(0).integers(0, 96, (2, 7)).astype(np.int32))
h = hashlib.sha256()
for name, p in net.parameters_and_names():
    h.update(name.encode() + str(p.dtype).encode() + p.asnumpy().tobytes())
h.update(net(x).asnumpy().tobytes())
print(h.hexdigest())
"""

DENSE_IN_OUT_THEN_BROKEN = """
[linear."mindspore.nn.Dense"]
layout = "in_out"

[[rule]]
name = "broken"
pattern = "linear-cell"
rewrite = { to = "linear4bit", quant_type = "nf5" }
"""


# ---- the six cases of the issue -------------------------------------------------------------------------------
def test_1_a_failed_rule_load_leaves_later_passes_identical_to_a_fresh_process(ms_cpu, tmp_path):
    from mindspore import Tensor

    from . import zoo

    bad = tmp_path / "bad.toml"
    bad.write_text(DENSE_IN_OUT_THEN_BROKEN)
    with pytest.raises(RuleError, match=r"bad.toml:2: linear.'mindspore.nn.Dense' is already declared by built-in"):
        RuleSet.from_toml(bad)
    # the same declaration without the clash fails later in the file: still nothing changes anywhere
    bad.write_text(DENSE_IN_OUT_THEN_BROKEN.replace("mindspore.nn.Dense", "mindspore.nn.Conv2d"))
    with pytest.raises(RuleError, match=r"bad.toml:8: rule 'broken': rewrite.quant_type = 'nf5' is not accepted"):
        RuleSet.from_toml(bad)
    with pytest.raises(RuleError):
        mb.apply(zoo.make_bert(), str(bad))
    net = zoo.make_bert()
    result = mb.apply(net, "nf4")
    assert len(result.quantized) == 14 and not result.report.violations
    x = Tensor(np.random.default_rng(0).integers(0, 96, (2, 7)).astype(np.int32))
    here = fingerprint(net, x)
    env = {**os.environ, "GLOG_v": "3", "PYTHONPATH": str(REPO)}
    fresh = subprocess.run(
        [sys.executable, "-c", FINGERPRINT_SCRIPT], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.strip().splitlines()[-1] == here


EVIL_MODULE = """
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("the rule file ran my code")
class Lin:
    pass
"""

EVIL_RULES = """
[linear."msbnb_evil_mod.Lin"]
weight = "w"

[pattern.evil]
nodes.c = { kind = "cell", type = ["msbnb_evil_mod.Lin"] }

[[rule]]
name = "evil-rule"
pattern = "evil"
rewrite = { to = "linear8bit" }
"""


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A module that records being imported, importable from the working directory, and a rule file naming it."""
    (tmp_path / "msbnb_evil_mod.py").write_text(EVIL_MODULE)
    (tmp_path / "evil.toml").write_text(EVIL_RULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("msbnb_evil_mod", None)


def test_2_rule_files_never_import_without_an_opt_in(ms_cpu, evil):
    from . import zoo

    rs = RuleSet.from_toml(evil / "evil.toml")
    mb.explain(zoo.make_bert(), str(evil / "evil.toml"))
    mb.apply(zoo.make_bert(), str(evil / "evil.toml"), dry_run=True)
    assert "msbnb_evil_mod" not in sys.modules and not (evil / "IMPORTED").exists()
    assert "msbnb_evil_mod.Lin" in rs.linear_classes()
    # only an explicit opt-in imports, and only under the listed prefix
    with pytest.raises(RuleError, match="allow_imports: 'bad prefix!' is not a module prefix"):
        RuleSet.from_toml(evil / "evil.toml", allow_imports=["bad prefix!"])
    RuleSet.from_toml(evil / "evil.toml", allow_imports=["other_pkg"])
    assert not (evil / "IMPORTED").exists()
    RuleSet.from_toml(evil / "evil.toml", allow_imports=["msbnb_evil_mod"])
    assert (evil / "IMPORTED").exists()


def test_2_cli_explain_and_rules_import_nothing(evil):
    (evil / "model.py").write_text("from tests.zoo import make_bert\n")
    out = msbnb("rules", "evil.toml", cwd=evil)
    assert out.returncode == 0, out.stderr
    out = msbnb("explain", "model.py:make_bert", "--rules", "evil.toml", cwd=evil)
    assert out.returncode == 0, out.stderr
    assert not (evil / "IMPORTED").exists()
    out = msbnb("rules", "evil.toml", "--allow-import", "msbnb_evil_mod", cwd=evil)
    assert out.returncode == 0 and (evil / "IMPORTED").exists()


def test_2_an_allowed_import_that_names_nothing_is_an_error(ms_cpu, evil):
    (evil / "typo.toml").write_text('[linear."msbnb_evil_mod.Lni"]\nweight = "w"\n')
    with pytest.raises(
        RuleError, match=r"typo.toml:1: linear.'msbnb_evil_mod.Lni': 'msbnb_evil_mod.Lni' names no class"
    ):
        RuleSet.from_toml(evil / "typo.toml", allow_imports=["msbnb_evil_mod"])
    (evil / "fn.toml").write_text('[linear."os.path.join"]\n')
    with pytest.raises(RuleError, match=r"fn.toml:1: linear.'os.path.join': 'os.path.join' is a function, not a class"):
        RuleSet.from_toml(evil / "fn.toml")


def test_4_output_paths_that_are_not_regular_files_are_refused_before_the_pass(tmp_path):
    from msbnb_pass.outputs import OutputError, check_output_file, write_atomic

    with pytest.raises(OutputError, match=r"-o '/dev/full' is a character device, not a regular file; refusing"):
        check_output_file("/dev/full", "-o")
    assert Path("/dev/full").is_char_device()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="is a named pipe, not a regular file"):
        write_atomic(fifo, lambda tmp: Path(tmp).write_text("x"), "out")
    link = tmp_path / "link.ckpt"
    link.symlink_to(tmp_path / "elsewhere.ckpt")
    with pytest.raises(OutputError, match="is a symbolic link, not a regular file"):
        check_output_file(link)
    with pytest.raises(OutputError, match=r"the directory '.*/missing' does not exist"):
        check_output_file(tmp_path / "missing" / "q.ckpt")
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["link.ckpt", "pipe"]
    # the CLI checks them before building the model or running the pass: nothing on stdout
    out = msbnb("apply", "tests.zoo:make_bert", "--rules", "nf4", "-o", str(fifo), cwd=REPO)
    assert_one_line_error(out, "msbnb apply: error: -o/--output", "is a named pipe")
    assert out.stdout == "" and fifo.is_fifo()
    out = msbnb("apply", "tests.zoo:make_bert", "--rules", "nf4", "--dump", str(fifo), cwd=REPO)
    assert_one_line_error(out, "--dump", "is a named pipe, not a directory")


VERIFY_MODELS = """
from mindspore import nn
NET = nn.SequentialCell([nn.Dense(64, 64)])  # a module-level Cell


def unseeded():  # different random weights on every call
    return nn.SequentialCell([nn.Dense(64, 64)])
"""


@pytest.mark.parametrize("model", ["vmodels.py:NET", "vmodels.py:unseeded"])
def test_5_verify_quantizes_a_deep_copy_of_one_instance(tmp_path, model):
    (tmp_path / "vmodels.py").write_text(VERIFY_MODELS)
    out = msbnb("verify", model, "--rules", "int4", "--input-shape", "4,64", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"verify: built {model} once, quantized a deep copy, compared both on the same inputs" in out.stdout
    import json

    metrics = json.loads(out.stdout[out.stdout.index("{") :])
    # neither vacuous (the same object quantized twice: 1.0) nor a false alarm (two random instances: ~0)
    assert 0.95 < metrics["cosine"] < 0.999999


def test_6_float64_weights_beyond_float32_are_refused_with_index_and_value(ms_cpu):
    w = np.ones((8, 64))
    w[2, 5] = 1e300
    for cls in (mb.Linear4bit, mb.Linear8bit, mb.Linear8bitLt):
        with pytest.raises(
            QuantizationError,
            match=r"^fc: weight contains 1 value\(s\) beyond the float32 range .*first at index \(2, 5\): 1e\+300",
        ):
            cls(64, 8, weight=w, layer_name="fc")
    w[2, 5] = np.nan
    with pytest.raises(QuantizationError, match=r"fc: weight contains 1 non-finite value\(s\) .*index \(2, 5\): nan"):
        mb.Linear4bit(64, 8, weight=w.astype(np.float32), layer_name="fc")


def test_6_asymmetric_scales_stay_finite_near_the_float32_limit(ms_cpu):
    from msbnb_pass import formats

    w = np.full((2, 64), 1.0, np.float32)
    w[0, :2] = (3.3e38, -3.3e38)
    q, scale, offset = formats.quantize_int8(w, symmetric=False)
    assert np.isfinite(scale).all() and np.isfinite(formats.dequantize_int8(q, scale, offset)).all()
    layer = mb.Linear8bit(64, 2, has_fp16_weights=False, symmetric=False, weight=w, layer_name="big")
    assert np.isfinite(layer.weight_scale.asnumpy()).all()
    np.testing.assert_allclose(layer.dequantized_weight()[0, :2], (3.3e38, -3.3e38), rtol=0.01)
    with pytest.raises(QuantizationError, match=r"^big: weight: block 0 spans a range wider than float32"):
        mb.Linear4bit(64, 2, quant_type="int4", symmetric=False, weight=w, layer_name="big")


# ---- one per requirement ------------------------------------------------------------------------------------
def test_the_error_hierarchy():
    for cls in (
        errors.RuleError,
        errors.MatchConflict,
        errors.RewriteError,
        errors.PassError,
        errors.CheckpointError,
        errors.ConfigError,
        errors.QuantizationError,
        errors.CLIError,
    ):
        assert issubclass(cls, MsbnbError) and issubclass(cls, ValueError)
    assert issubclass(CheckpointKeyError, KeyError) and str(CheckpointKeyError("no 'x'")) == "no 'x'"
    # where they were importable before, they still are
    from msbnb_pass.match import MatchConflict
    from msbnb_pass.passes import PassError
    from msbnb_pass.rewrite import RewriteError as RE
    from msbnb_pass.rules import RuleError as RuE

    assert (MatchConflict, PassError, RE, RuE) == (errors.MatchConflict, errors.PassError, RewriteError, RuleError)
    assert mb.RuleError is RuleError and mb.MsbnbError is MsbnbError


def test_a_rule_set_owns_its_linear_classes(ms_cpu):
    from . import zoo

    mine = RuleSet.builtin("nf4")
    mine.register_linear(zoo.MyLinear, weight="w", bias="b", layout="in_out")
    net = zoo.make_uses_my_linear()
    assert len(mb.apply(net, mine).quantized) == 2
    # a RuleSet made afterwards, the built-in families and a loaded file do not know the class
    assert RuleSet.builtin("nf4").linear_spec(zoo.MyLinear) is None
    assert not mb.apply(zoo.make_uses_my_linear(), "nf4").quantized
    with pytest.raises(RuleError, match=r"<python>: rule 'r': unknown condition 'where.min_in_feature'; did you mean"):
        RuleSet([mb.Rule("r", "linear-cell", {"to": "linear8bit"}, where={"min_in_feature": 3})])
    # checks and replacements registered on a RuleSet are that RuleSet's only
    own = RuleSet()
    own.register_check(
        "not_pooler", lambda cand, value: "the pooler stays" if value and cand.path == "pooler" else None
    )
    own.register_replacement(
        "int8_weights",
        mb.rules.BUILTIN_REPLACEMENTS["linear8bit"].build,
        {"symmetric": True, "per_channel": True, "has_fp16_weights": False, "backend": None},
        "int8",
    )
    own.add(mb.Rule("own", "linear-cell", {"to": "int8_weights"}, where={"not_pooler": True}))
    result = mb.apply(zoo.make_bert(), own)
    assert len(result.quantized) == 13 and ("pooler", "the pooler stays (own)") in result.kept
    with pytest.raises(RuleError, match=r"<python>: rule 'own': unknown condition 'where.not_pooler'"):
        RuleSet([mb.Rule("own", "linear-cell", {"to": "linear8bit"}, where={"not_pooler": True})])
    with pytest.raises(RuleError, match=r"'rewrite.to' = 'int8_weights': unknown replacement 'int8_weights'"):
        RuleSet([mb.Rule("own", "linear-cell", {"to": "int8_weights"})])
    # apply(backend=...) works on a copy: the caller's RuleSet is unchanged
    rs = RuleSet.builtin("int8")
    mb.apply(zoo.make_bert(), rs, backend="reference", verify=False)
    assert all("backend" not in r.rewrite for r in rs)


def test_regexes_and_values_are_checked_when_the_rule_is_loaded(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(
        '[[rule]]\nname = "bad-re"\npattern = "linear-cell"\n\nwhere = { exclude = ["re:layers\\\\.[0-"] }\n'
        'rewrite = { to = "linear8bit" }\n'
    )
    with pytest.raises(
        RuleError, match=r"r.toml:5: rule 'bad-re': where.exclude: 're:layers\\\\\.\[0-' is not a valid"
    ):
        RuleSet.from_toml(path)
    path.write_text(
        '[[rule]]\nname = "n"\npattern = "linear-cell"\nwhere = { min_in_features = -1 }\nrewrite = { to = "linear8bit" }\n'
    )
    with pytest.raises(RuleError, match=r"r.toml:4: rule 'n': where.min_in_features: must be an integer >= 0, got -1"):
        RuleSet.from_toml(path)
    path.write_bytes(b'[[rule]]\nname = "caf\xe9"\n')
    with pytest.raises(RuleError, match=r"r.toml:2: the rule file is not UTF-8 text"):
        RuleSet.from_toml(path)


def test_config_typos_name_the_close_match():
    with pytest.raises(
        ConfigError,
        match=r"BitsAndBytesConfig: unknown argument\(s\) 'bnb_4bit_quant_typ' \(did you mean 'bnb_4bit_quant_type'\?\)",
    ):
        mb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_typ="nf4")
    with pytest.raises(ConfigError, match=r"'load_in_4bits' \(did you mean 'load_in_4bit'\?\)"):
        mb.BitsAndBytesConfig.from_dict({}, load_in_4bits=True)
    with pytest.raises(
        ConfigError, match=r"unknown field\(s\) \['groupsize'\]; 'groupsize': did you mean 'group_size'"
    ):
        mb.Int4Config.from_dict({"groupsize": 64})


def test_a_skip_list_that_matches_nothing_warns_with_the_closest_names(ms_cpu, caplog):
    from . import zoo

    cfg = mb.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["pooler", "encoder.0.querry"])
    result = mb.quantize(zoo.make_bert(), cfg, verify=False)
    expected = (
        "llm_int8_skip_modules entry 'encoder.0.querry' matches no layer of the network; closest names: encoder.0.query"
    )
    assert any(w.startswith(expected) for w in result.warnings), result.warnings
    assert expected in caplog.text
    rule = mb.Rule("mine", "linear-cell", {"to": "linear8bit"}, where={"include": ["encoder.*.valeu"]})
    result = mb.apply(zoo.make_bert(), RuleSet([rule]), dry_run=True)
    assert "rule 'mine' where.include entry 'encoder.*.valeu' matches no layer of the network" in "\n".join(
        result.warnings
    )
    # the built-in default skip of lm_head is no warning on a network without a head
    assert not mb.apply(zoo.make_bert(), "nf4", dry_run=True).warnings


def test_a_nan_weight_names_layer_index_and_value_and_keep_float_keeps_it(ms_cpu):
    from mindspore import Tensor, nn

    from . import zoo

    net = zoo.make_bert()
    w = net.encoder[1].value.weight.asnumpy()
    w[3, 7] = np.nan
    net.encoder[1].value.weight.set_data(Tensor(w))
    with pytest.raises(
        RewriteError,
        match=r"encoder.1.value: rule 'nf4-linear' cannot quantize this layer: encoder.1.value: weight "
        r"'encoder.1.value.weight' contains 1 non-finite value\(s\) \(NaN/Inf\), first at index \(3, 7\): nan.*"
        r"on_violation='keep_float'",
    ):
        mb.apply(net, "nf4")
    assert isinstance(net.encoder[0].query, nn.Dense)  # restored
    result = mb.apply(net, "nf4", on_violation="keep_float")
    assert isinstance(net.encoder[1].value, nn.Dense) and isinstance(net.encoder[0].query, mb.Linear4bit)
    assert len(result.quantized) == 13
    assert "  encoder.1.value: kept in float: cannot quantize: encoder.1.value: weight 'encoder.1.value.weight'" in (
        result.summary()
    )


def test_the_summary_names_every_kept_layer_and_why(ms_cpu):
    from mindspore import nn

    class WithHead(nn.Cell):
        def __init__(self):
            super().__init__()
            self.body = nn.Dense(64, 64)
            self.pooler = nn.Dense(64, 64)
            self.lm_head = nn.Dense(64, 96)

        def construct(self, x):
            return self.lm_head(self.pooler(self.body(x)))

    cfg = mb.BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["pooler"])
    summary = mb.quantize(WithHead(), cfg).summary()
    assert "kept 2 weight-holding layer(s) in full precision:" in summary
    assert "  lm_head: skipped by the default skip of the output head ('lm_head')" in summary
    assert "  pooler: skipped by llm_int8_skip_modules ('pooler')" in summary


def test_state_dict_loaders_name_the_wrong_tensor(ms_cpu):
    from msbnb_pass import formats

    layer = mb.Linear4bit(64, 8, quant_type="nf4", compress_statistics=True)
    sd = layer.bnb_state_dict("fc.")
    assert mb.Linear4bit.from_bnb_state_dict(sd, prefix="fc.").out_features == 8
    for key, value, message in [
        (
            "fc.weight",
            sd["fc.weight"][:-1],
            r"'fc.weight' must hold 256 bytes of packed 4-bit codes for shape \[8, 64\]",
        ),
        (
            "fc.weight.absmax",
            sd["fc.weight.absmax"].astype(np.float32),
            r"'fc.weight.absmax' must be a uint8 tensor with 8",
        ),
        (
            "fc.weight.nested_absmax",
            np.array([np.inf], np.float32),
            r"'fc.weight.nested_absmax' holds 1 invalid .*: inf",
        ),
        (
            "fc.weight.quant_map",
            np.zeros(15, np.float32),
            r"'fc.weight.quant_map' must be a float tensor with 16 entries",
        ),
        (
            "fc.bias",
            np.zeros(9, np.float32),
            r"'fc.bias' must be a float tensor of shape \[8\], got float32 of shape \[9\]",
        ),
    ]:
        with pytest.raises(CheckpointError, match=message):
            mb.Linear4bit.from_bnb_state_dict({**sd, key: value}, prefix="fc.")
    broken = dict(sd)
    del broken["fc.weight.quant_map"]
    with pytest.raises(CheckpointKeyError, match="state dict lacks 'fc.weight.quant_map'"):
        formats.QuantState.from_state_dict("fc.weight", broken)
    sd8 = mb.Linear8bitLt(64, 8).bnb_state_dict("l.")
    for key, value, message in [
        ("l.weight", sd8["l.weight"].astype(np.int16), r"'l.weight' must be a 2-D int8 tensor \[out, in\]"),
        ("l.SCB", -np.ones(8, np.float32), r"'l.SCB' holds an invalid row absmax at index 0: -1.0"),
        ("l.SCB", np.ones(7, np.float32), r"'l.SCB' must be a float tensor of shape \[8\]"),
        ("l.weight_format", np.array(1, np.uint8), r"'l.weight_format' = \[1\]: only format 0"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            mb.Linear8bitLt.from_bnb_state_dict({**sd8, key: value}, prefix="l.")


BROKEN_IMPORT = "raise ImportError('this module cannot be imported here')\n"


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        (
            ("apply", "tests.zoo:make_bert", "--rules", "nf4", "--input-shape", "0,64"),
            ["--input-shape 0,64: every dimension"],
        ),
        (
            ("apply", "tests.zoo:make_bert", "--rules", "re.toml"),
            ["re.toml:4: rule 'r': where.exclude: 're:(' is not a valid"],
        ),
        (
            ("apply", "tests.zoo:make_bert", "--rules", "latin1.toml"),
            ["latin1.toml:1: the rule file is not UTF-8 text"],
        ),
        (("apply", "tests.zoo:make_bert", "--rules", "syntax.toml"), ["syntax.toml: TOML syntax error"]),
        (
            ("apply", "broken_mod:make", "--rules", "nf4"),
            ["--model: cannot import 'broken_mod'", "cannot be imported here"],
        ),
        (("apply", "tests.zoo:make_bert", "--config", "."), ["--config .: cannot read it"]),
        (("apply", "tests.zoo:make_bert", "--config", "typo.json"), ["'bnb_4bit_quant_typ' (did you mean"]),
        (("apply", "tests.zoo:make_bert", "--rules", "nf4", "-o", "no/such/dir/q.ckpt"), ["does not exist"]),
        (("apply", "tests.zoo:make_bert", "--rules", "nf4", "--input-dtype", "int3"), ["--input-dtype must be one of"]),
        (("quantize", "--npy", "missing.npy"), ["No such file or directory"]),
        (("dump", "tests.zoo:make_bert", "-o", "typo.json"), ["-o/--output 'typo.json' is a regular file, not a"]),
        (
            ("explain", "tests.zoo:make_bert", "--rules", "nf4", "--layer", "encoder.0.querry"),
            ["--layer 'encoder.0.querry' is not a weight-holding layer", "closest: encoder.0.query"],
        ),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_code_2(tmp_path, args, parts):
    (tmp_path / "re.toml").write_text(
        '[[rule]]\nname = "r"\npattern = "linear-cell"\nwhere = { exclude = ["re:("] }\nrewrite = { to = "linear8bit" }\n'
    )
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    (tmp_path / "syntax.toml").write_text("[[rule]\n")
    (tmp_path / "broken_mod.py").write_text(BROKEN_IMPORT)
    (tmp_path / "typo.json").write_text('{"load_in_4bit": true, "bnb_4bit_quant_typ": "nf4"}')
    out = msbnb(*args, cwd=tmp_path)
    assert_one_line_error(out, *parts)


def test_readme_lists_the_exit_codes():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Command line") :]
    for line in ("| 0 |", "| 1 |", "| 2 |"):
        assert line in section
