"""The package as users get it: what importing it costs, and what a wheel carries."""
import subprocess
import sys
import zipfile

import pytest

from xllm_sampling.paths import PROJECT_ROOT
from xllm_sampling.port import cli


def imported_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.splitlines()[-1].split())  # the last line: what the command printed comes before


def test_importing_the_ops_does_not_import_the_driver_tools():
    modules = imported_by("import xllm_sampling")
    assert not {"git", "pytest", "torch"} & modules  # torch comes with the first op used
    assert "torch" in imported_by("import xllm_sampling; xllm_sampling.logit_softmax")


@pytest.mark.parametrize("argv", [["--help"], ["flags", "list"]])
def test_quick_commands_do_not_import_torch(argv):
    modules = imported_by(f"import sys; from xllm_sampling.port import cli\ntry: cli.run({argv!r})\nexcept SystemExit: pass")
    assert "torch" not in modules


def test_bench_op_names_match():
    from xllm_sampling import bench

    assert cli.BENCH_OPS == bench.OPS and cli.BENCH_ALL_OPS == bench.ALL_OPS


@pytest.mark.skipif(not (PROJECT_ROOT / "pyproject.toml").exists(), reason="needs the source checkout")
def test_the_wheel_carries_every_resource(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(PROJECT_ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("xllm_sampling-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for resource in ("flags/flags.toml", "csrc/air_topk/air_topk.cu", "patches/series", "patches/sampler/manifest.toml",
                     "verify/conftest.py", "verify/pytest.ini", "verify/sampler/test_parity.py", "rollback/sampler.sh",
                     "target/refengine/engine/decode.py"):
        assert f"xllm_sampling/_data/{resource}" in names, resource
    assert not any(n.startswith(("tests/", "xllm_sampling/_data/tests/")) for n in names)


def test_op_names_stay_functions_whatever_is_imported_first():
    """Each op's module lives in xllm_sampling.ops, so loading it (as the sampler or the bench do)
    never replaces the package's function of the same name (the patched engine calls
    ``from xllm_sampling import logit_softmax``)."""
    code = ("import xllm_sampling.bench, xllm_sampling, types\n"
            "from xllm_sampling import logit_softmax, sample, air_topk_last_dim\n"
            "assert all(callable(f) and not isinstance(f, types.ModuleType) for f in "
            "(logit_softmax, sample, air_topk_last_dim, xllm_sampling.logit_softmax))")
    subprocess.run([sys.executable, "-c", code], check=True)
