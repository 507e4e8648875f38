"""prism_fast.tune: path selection and its cache, with injected timings (the timing itself
needs a GPU; choosing, storing and reusing do not)."""

from __future__ import annotations

import json

import pytest
import torch

import prism_fast
from prism_fast import tuning
from prism_fast.kernels import gated_lora as gl
from tests import models as M


@pytest.fixture
def patched():
    model = prism_fast.patch_model(M.peft_model(M.base_model("llama"), rank=8), backend="torch")
    yield model
    gl.use_choices("cpu", {tuning.choice_key(shape, m): None   # leave no chosen path to
                           for shape in tuning.group_shapes(model)    # other tests
                           for m in tuning.DECODE_MS})


class FakeTimer:
    """µs per call: a launch cost per stage, per path, plus what `extra` adds; counts calls.
    The whole projection (fuse_base models): F.linear 20 + the LoRA path's; fused_base 30."""

    LORA = {"split": 8.0, "fused": 9.0, "coop": 7.0}

    def __init__(self, extra=lambda shape, m, path: 0.0):
        self.calls: list[tuple] = []
        self.extra = extra

    def __call__(self, shape, m, path):
        self.calls.append((shape, m, path))
        if path == tuning.FUSED_BASE:
            base = 30.0
        elif path.startswith(tuning.LINEAR):
            base = 20.0 + self.LORA[path.removeprefix(tuning.LINEAR)]
        else:
            base = self.LORA[path]
        return base + self.extra(shape, m, path)


def run(model, tmp_path, timer, **kw):
    return prism_fast.tune(model, directory=tmp_path, timer=timer, device_name="Fake GPU",
                           sms=132, progress=False, **kw)


def test_select_keeps_split_unless_clearly_beaten():
    assert tuning.select({"split": 10.0, "fused": 9.8, "coop": 9.9}) == "split"   # < 3 %
    assert tuning.select({"split": 10.0, "fused": 9.0, "coop": 9.5}) == "fused"
    assert tuning.select({"split": 10.0, "fused": None, "coop": 8.0}) == "coop"
    assert tuning.select({"split": None, "fused": 12.0}) == "fused"               # split failed
    assert tuning.select({"split": 10.0, "fused": None, "coop": None}) == "split"


def test_groups_of_a_patched_llama(patched):
    shapes = tuning.group_shapes(patched)
    hidden, inter = 64, 96
    assert [(k, ns) for k, ns, *_ in shapes] == [
        (hidden, (hidden, 32, 32)), (hidden, (hidden,)), (hidden, (inter, inter)),
        (inter, (hidden,))]
    assert all(r == 8 and adt == "float32" and xdt == "float32" for *_, r, adt, xdt in shapes)
    with pytest.raises(ValueError, match="model: expected a model patched"):
        tuning.group_shapes(M.base_model("llama"))


def test_chooses_by_timing_applies_and_caches(patched, tmp_path):
    timer = FakeTimer()   # coop 7 < split 8: coop everywhere it differs from split
    choices = run(patched, tmp_path, timer)
    shapes = tuning.group_shapes(patched)
    assert len(choices) == len(shapes) * len(tuning.DECODE_MS)
    assert set(choices.values()) == {"coop"}
    assert {p for *_, p in timer.calls} <= set(gl.PATHS)   # no fuse_base: no whole projection
    timed = {(shape, m) for shape, m, _ in timer.calls}
    assert timed == {(s, m) for s in shapes for m in (*tuning.DECODE_MS, tuning.PREFILL_M)}
    assert all(p == "split" for _, m, p in timer.calls if m == tuning.PREFILL_M)
    # in use: pick_config now returns the cooperative stage for these shapes
    k, ns, r = shapes[0][:3]
    assert gl.pick_config(1, k, ns, r, torch.device("cpu"))["stages"] == [gl.STAGE_COOP]
    files = list(tmp_path.glob("tune-Fake_GPU-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["key"]["gpu"] == "Fake GPU" and data["choices"] == choices
    assert data["key"]["triton"]

    # A second run reads the cache and times nothing.
    again = FakeTimer()
    assert run(patched, tmp_path, again) == choices and again.calls == []
    # Another GPU (or Triton version, or shapes) is another key: timed anew.
    other = FakeTimer(extra=lambda s, m, p: 5.0 if p == "coop" else 0.0)
    choices2 = prism_fast.tune(patched, directory=tmp_path, timer=other, device_name="Other GPU",
                               sms=132, progress=False)
    assert other.calls and set(choices2.values()) == {"split"}
    assert len(list(tmp_path.glob("tune-*.json"))) == 2


def test_failures_and_a_corrupt_cache(patched, tmp_path):
    def extra(shape, m, path):
        return -3.0 if path == "fused" and m == 8 else 0.0

    timer = FakeTimer(extra)
    failing = lambda shape, m, path: None if path == "coop" else timer(shape, m, path)  # noqa: E731
    choices = run(patched, tmp_path, failing)
    assert {p for key, p in choices.items() if key.endswith("|8")} == {"fused"}
    assert {p for key, p in choices.items() if not key.endswith("|8")} == {"split"}
    path = next(tmp_path.glob("tune-*.json"))
    path.write_text("{not json")
    again = FakeTimer()
    with pytest.warns(UserWarning, match=f"ignoring the cache file {path}: unreadable"):
        run(patched, tmp_path, again)
    assert again.calls, "a corrupt cache file is timed anew and rewritten"
    assert json.loads(path.read_text())["choices"]


@pytest.mark.parametrize("bad", [{"nonsense": "split"}, {"64|64,32,32|8": "warp"},
                                 {"64|64|x|1": "split"}, {"64|48|8|1": "fused_base"},
                                 {"base|64|48|8|1": "coop"}, {"base|64|48|1": "split"}])
def test_a_bad_choice_in_the_cache_is_ignored_with_a_warning(patched, tmp_path, bad):
    run(patched, tmp_path, FakeTimer())
    path = next(tmp_path.glob("tune-*.json"))
    data = json.loads(path.read_text())
    data["choices"] = {**data["choices"], **bad}
    path.write_text(json.dumps(data))
    again = FakeTimer()
    with pytest.warns(UserWarning, match=f"ignoring the cache file {path}: bad choice"):
        choices = run(patched, tmp_path, again)
    assert again.calls and not set(bad) & set(choices)
    assert not set(bad) & set(json.loads(path.read_text())["choices"])   # rewritten


def test_an_unwritable_cache_warns_and_keeps_the_choices(patched, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="could not write the cache file .*file/tune-"):
        choices = prism_fast.tune(patched, directory=str(tmp_path / "file"), timer=FakeTimer(),
                                  device_name="Fake GPU", sms=132, progress=False)
    assert set(choices.values()) == {"coop"}


def test_budget_cut_stores_nothing(patched, tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 1))   # every tick is one second later
    monkeypatch.setattr(tuning.time, "monotonic", lambda: float(next(clock)))
    timer = FakeTimer()
    choices = run(patched, tmp_path, timer, budget_s=3.0)
    assert len(timer.calls) <= 4
    assert not list(tmp_path.glob("tune-*.json"))
    assert len(choices) < len(tuning.group_shapes(patched)) * len(tuning.DECODE_MS)


def test_cpu_times_nothing(patched, tmp_path):
    with pytest.warns(UserWarning, match="the model is on cpu, not a CUDA GPU: nothing timed"):
        assert prism_fast.tune(patched, directory=tmp_path, progress=False) == {}
    assert not list(tmp_path.glob("*"))


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRISM_FAST_CACHE_DIR", str(tmp_path / "a"))
    assert tuning.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("PRISM_FAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert tuning.cache_dir() == tmp_path / "x" / "prism_fast"
