"""The flag registry: precedence, override, aliases, errors, files re-read on change."""
import os
import warnings

import pytest

from xllm_sampling import flags


@pytest.fixture(autouse=True)
def clean_flags(monkeypatch):
    for name, d in flags.DEFINITIONS.items():
        for var in (d.env, *d.aliases):
            monkeypatch.delenv(var, raising=False)
        flags.unset(name)
    monkeypatch.delenv(flags.FLAGS_FILE_ENV, raising=False)
    yield
    for name in flags.DEFINITIONS:
        flags.unset(name)


def test_defaults_match_the_spec():
    assert flags.snapshot() == {"logit_softmax": True, "air_topk": True, "sampler": True, "beam_search": True,
                                "spec_decode": True, "cuda_graph": True, "cuda_graph_max_batch": 256, "nvtx": False}


def test_precedence_env_then_file_then_code(monkeypatch, tmp_path):
    monkeypatch.setenv("XLLM_SAMPLING_AIR_TOPK", "0")
    assert flags.lookup("air_topk") == (False, "env:XLLM_SAMPLING_AIR_TOPK")
    path = tmp_path / "flags.toml"
    flags.write_file(path, {"air_topk": True})
    monkeypatch.setenv(flags.FLAGS_FILE_ENV, str(path))
    assert flags.lookup("air_topk") == (True, "file")
    flags.set("air_topk", "off")
    assert flags.lookup("air_topk") == (False, "code")
    flags.unset("air_topk")
    assert flags.get("air_topk") is True


def test_override_restores_previous_values():
    flags.set("sampler", False)
    with flags.override(sampler=True, nvtx="yes"):
        assert flags.get("sampler") is True and flags.get("nvtx") is True
        with flags.override(sampler=False):
            assert flags.get("sampler") is False
        assert flags.get("sampler") is True
    assert flags.lookup("sampler") == (False, "code")
    assert flags.lookup("nvtx") == (False, "default")


def test_engine_aliases(monkeypatch):
    monkeypatch.setenv("XLLM_USE_AIR_TOPK", "false")
    monkeypatch.setenv("XLLM_ENABLE_NVTX", "1")
    assert flags.get("air_topk") is False and flags.get("nvtx") is True
    assert flags.lookup("nvtx")[1] == "env:XLLM_ENABLE_NVTX"


def test_unknown_name_and_bad_values_name_the_flag():
    with pytest.raises(ValueError, match="unknown flag 'air_topkk'.*air_topk"):
        flags.get("air_topkk")
    with pytest.raises(ValueError, match="flag 'sampler'.*'maybe'.*true/false"):
        flags.set("sampler", "maybe")
    with pytest.raises(ValueError, match="flag 'cuda_graph_max_batch'.*an integer"):
        flags.override(cuda_graph_max_batch="big").__enter__()
    with pytest.raises(ValueError, match="unknown flag 'nope'"):
        flags.override(nope=True).__enter__()


def test_bad_environment_value_is_an_error(monkeypatch):
    monkeypatch.setenv("XLLM_SAMPLING_SAMPLER", "yesplease")
    with pytest.raises(ValueError, match="flag 'sampler'"):
        flags.get("sampler")


def test_unknown_environment_variable_is_reported(monkeypatch):
    monkeypatch.setenv("XLLM_SAMPLING_SAMPLR", "0")
    assert flags.unknown_environment() == ["XLLM_SAMPLING_SAMPLR"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flags.warn_unknown_environment()
    assert any("XLLM_SAMPLING_SAMPLR names no xllm_sampling flag" in str(w.message) for w in caught)


def test_file_change_takes_effect_on_the_next_call(monkeypatch, tmp_path):
    path = tmp_path / "flags.toml"
    flags.write_file(path, {"beam_search": True})
    monkeypatch.setenv(flags.FLAGS_FILE_ENV, str(path))
    assert flags.get("beam_search") is True
    flags.write_file(path, {"beam_search": False})
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # coarse filesystem clocks
    assert flags.get("beam_search") is False


def test_path_state_is_each_path_flag_from_every_source(monkeypatch, tmp_path):
    """path_state (read once per graph replay, the flags file once for all its flags) gives what
    get gives for each path flag, whichever source sets it, and follows a change at once."""
    def expected():
        return tuple(flags.get(name) for name in flags.path_flags())

    assert flags.path_state() == expected() == tuple(flags.definition(n).default for n in flags.path_flags())
    path = tmp_path / "flags.toml"
    flags.write_file(path, {"sampler": False})
    monkeypatch.setenv(flags.FLAGS_FILE_ENV, str(path))
    monkeypatch.setenv("XLLM_USE_AIR_TOPK", "off")
    flags.set("beam_search", False)
    state = flags.path_state()
    assert state == expected()
    off = {name for name, on in zip(flags.path_flags(), state) if not on}
    assert {"sampler", "air_topk", "beam_search"} <= off
    flags.unset("beam_search")
    assert flags.path_state() == expected() and flags.path_state() != state


def test_malformed_flags_file_names_the_file(monkeypatch, tmp_path):
    path = tmp_path / "flags.toml"
    path.write_text("sampler = = true\n")
    with pytest.raises(ValueError, match="flags file .*flags.toml"):
        flags.read_file(path)
    path.write_text("samplerr = true\n")
    with pytest.raises(ValueError, match="unknown flag 'samplerr'"):
        flags.read_file(path)


def test_environment_changes_take_effect_on_the_next_call(monkeypatch):
    """The environment is read on every call (through the fast lookup): a value set, changed or
    removed between two calls applies to the second; the name's own variable wins over an alias."""
    assert flags.lookup("air_topk") == (True, "default")
    monkeypatch.setenv("XLLM_USE_AIR_TOPK", "off")
    assert flags.lookup("air_topk") == (False, "env:XLLM_USE_AIR_TOPK")
    monkeypatch.setenv("XLLM_SAMPLING_AIR_TOPK", "on")
    assert flags.lookup("air_topk") == (True, "env:XLLM_SAMPLING_AIR_TOPK")
    monkeypatch.setenv("XLLM_SAMPLING_AIR_TOPK", "0")
    assert flags.lookup("air_topk") == (False, "env:XLLM_SAMPLING_AIR_TOPK")
    monkeypatch.delenv("XLLM_SAMPLING_AIR_TOPK")
    monkeypatch.delenv("XLLM_USE_AIR_TOPK")
    assert flags.lookup("air_topk") == (True, "default")


def test_environment_without_cpython_internals_still_reads(monkeypatch):
    """Where os.environ is a plain mapping (no encoded-key dict), flags read it the portable way."""
    monkeypatch.setattr(flags.os, "environ", {"XLLM_SAMPLING_SAMPLER": "off"})
    assert flags.lookup("sampler") == (False, "env:XLLM_SAMPLING_SAMPLER")
    assert flags.values(("sampler", "nvtx")) == (False, False)


def test_values_follow_each_source_at_the_next_call(monkeypatch, tmp_path):
    """values() (every op's read of its flags) sees a change of the environment, of an alias, of
    the flags file and of a value set from code at the very next call, in precedence order."""
    names = ("sampler", "nvtx")
    for var in flags.definition("sampler").env_vars + flags.definition("nvtx").env_vars:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(flags.FLAGS_FILE_ENV, raising=False)
    assert flags.values(names) == (True, False)
    monkeypatch.setenv("XLLM_ENABLE_NVTX", "1")  # an alias
    assert flags.values(names) == (True, True)
    monkeypatch.setenv("XLLM_SAMPLING_NVTX", "off")  # the flag's own variable wins over its alias
    assert flags.values(names) == (True, False)
    path = tmp_path / "flags.toml"
    flags.write_file(path, {"sampler": False, "nvtx": True})
    monkeypatch.setenv(flags.FLAGS_FILE_ENV, str(path))
    assert flags.values(names) == (False, True)
    with flags.override(sampler=True):
        assert flags.values(names) == (True, True)
    assert flags.values(names) == (False, True)
    assert flags.values(list(names)) == (False, True)  # any iterable of names


@pytest.mark.parametrize("op", ["logit_softmax", "air_topk", "sampler", "beam_search"])
def test_an_op_call_reads_the_flags_file_once(monkeypatch, tmp_path, op):
    """Each op call reads its own flag and the nvtx flag with one stat of the flags file
    (nvtx.op_call), and a toggle in the file still applies to the very next call."""
    import torch

    import xllm_sampling as xs
    from xllm_sampling.ops.beam_search import BeamSearchState

    path = tmp_path / "flags.toml"
    flags.write_file(path, {op: True})
    monkeypatch.setenv(flags.FLAGS_FILE_ENV, str(path))
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    calls = {
        "logit_softmax": lambda: xs.logit_softmax(logits, 0.8),
        "air_topk": lambda: xs.air_topk_last_dim(logits, 5),
        "sampler": lambda: xs.sample(logits, temperature=0.8, top_k=5),
        "beam_search": lambda: xs.beam_search_step(logits, BeamSearchState.start(1, 2, 1, 8, eos=0, device="cpu")),
    }
    calls[op]()  # warm: first reads parse the file
    stats, real_stat = [], os.stat
    monkeypatch.setattr(flags.os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    calls[op]()
    assert stats == [str(path)]
    seen = []  # the flags read by the next call, after a toggle, and their values

    def read(names, real=flags.values):
        value = real(names)
        seen.append(dict(zip(names, value)))
        return value

    monkeypatch.setattr(flags, "values", read)
    flags.write_file(path, {op: False})  # another size: seen as changed whatever the file clock
    calls[op]()
    assert seen == [{op: False, "nvtx": False}]
