"""prism_fast.tune on a model patched with fuse_base=True: the fused base + LoRA kernel timed
against F.linear + the chosen LoRA path (injected timings), chosen only when clearly faster,
cached, and followed by the dispatch (ops.gated_lora_group and the fused_base_lora op) through
gated_lora_config.pick_base. Triton's interpreter runs the kernels on CPU tensors."""

from __future__ import annotations

import json

import pytest
import torch

import prism_fast
from prism_fast import tuning
from prism_fast.kernels import fused_base_lora as fb
from prism_fast.kernels import gated_lora_config as configs
from prism_fast.ops import gated_lora as ops
from tests import models as M
from tests.test_tuning import FakeTimer, run
from tests.tolerances import MODEL_REL_TOL, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def forget(model) -> None:
    """Leave no chosen path of this model's shapes to other tests."""
    configs.use_choices("cpu", {key(shape, m): None for shape in tuning.group_shapes(model)
                                for m in (*tuning.DECODE_MS, 2, 4, 16)
                                for key in (tuning.choice_key, tuning.base_choice_key)})


@pytest.fixture
def fused():
    model = prism_fast.patch_model(M.peft_model(M.base_model("llama"), rank=8),
                                   backend="triton", fuse_base=True)
    forget(model)
    yield model
    forget(model)


@pytest.fixture
def fused_calls(monkeypatch):
    """Row counts of every fused-kernel call, from the layers (ops) and from the op (fb)."""
    rows: list[int] = []
    real = fb.fused_base_lora_triton

    def counting(x, *args, **kwargs):
        rows.append(x.numel() // x.shape[-1])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(ops, "fused_base_lora_triton", counting)
    monkeypatch.setattr(fb, "fused_base_lora_triton", counting)
    return rows


def faster_at(gains: dict[int, float | None]):
    """A timer whose fused_base takes (1 − gain) of the whole split projection (F.linear 20 +
    coop 7, FakeTimer's) at each M; None: it fails there."""
    def extra(shape, m, path):
        if path != tuning.FUSED_BASE:
            return 0.0
        gain = gains[m]
        return 27.0 * (1 - gain) - 30.0 if gain is not None else 0.0

    fake = FakeTimer(extra)

    def timer(shape, m, path):
        t = fake(shape, m, path)   # counted, failed or not
        return None if path == tuning.FUSED_BASE and gains[m] is None else t

    return timer, fake


def test_timed_only_for_fuse_base_models_and_chosen_when_clearly_faster(fused, tmp_path):
    timer, fake = faster_at({1: 0.02, 8: 0.10, 32: None, 64: -0.2})
    choices = run(fused, tmp_path, timer)
    shapes = tuning.group_shapes(fused)
    whole = [(s, m, p) for s, m, p in fake.calls if p in (tuning.FUSED_BASE, "linear+coop")]
    # per group and M: the fused kernel and F.linear + the chosen LoRA path (coop), once each
    assert sorted(whole) == sorted((s, m, p) for s in shapes for m in tuning.DECODE_MS
                                   for p in (tuning.FUSED_BASE, "linear+coop"))
    assert not [p for *_, p in fake.calls if p.startswith(tuning.LINEAR) and p != "linear+coop"]
    for shape in shapes:
        assert choices[tuning.choice_key(shape, 8)] == "coop"          # the LoRA path, as ever
        assert {m: choices[tuning.base_choice_key(shape, m)] for m in tuning.DECODE_MS} == {
            1: "split", 8: "fused_base", 32: "split", 64: "split"}   # < 3 %, failed, slower
    # in use, through the one function the dispatch asks
    k, ns, r = shapes[0][:3]
    cpu = torch.device("cpu")
    assert [configs.pick_base(m, k, ns, r, cpu) for m in (1, 5, 8, 20, 64, 65)] == [
        "split", "fused_base", "fused_base", "split", "split", "split"]
    assert configs.pick_base(4, k, ns, r, cpu) == "fused_base"   # untuned size: the default
    # cached under a key of its own, read back without timing
    path = next(tmp_path.glob("tune-*.json"))
    data = json.loads(path.read_text())
    assert data["key"]["fuse_base"] is True and data["choices"] == choices
    forget(fused)
    again = FakeTimer()
    assert run(fused, tmp_path, again) == choices and again.calls == []
    assert configs.pick_base(8, k, ns, r, cpu) == "fused_base"
    # the same shapes without fuse_base: another table, which times no whole projection
    plain = prism_fast.patch_model(M.peft_model(M.base_model("llama"), rank=8), backend="torch")
    other = FakeTimer()
    plain_choices = run(plain, tmp_path, other)
    assert other.calls and {p for *_, p in other.calls} <= {"split", "fused", "coop"}
    assert not [c for c in plain_choices if c.startswith(configs.BASE_PREFIX)]
    assert len(list(tmp_path.glob("tune-*.json"))) == 2


def test_the_layers_follow_the_table(fused, fused_calls, tmp_path):
    """36 rows (M = 64's entry): split where the table says so, fused where it does not."""
    ids, mask = M.prompts(4, 9, "left")
    fused_out = M.forward(fused, ids, mask)
    assert fused_calls and set(fused_calls) == {36}             # no table: the fused kernel
    fused_calls.clear()
    timer, _ = faster_at(dict.fromkeys(tuning.DECODE_MS, -0.5))   # fused_base slower everywhere
    choices = run(fused, tmp_path, timer)
    assert {v for c, v in choices.items() if c.startswith(configs.BASE_PREFIX)} == {"split"}
    split_out = M.forward(fused, ids, mask)
    assert not fused_calls
    assert rel_err(split_out, fused_out) <= MODEL_REL_TOL


def test_the_op_follows_the_table(fused_calls):
    """The op a compiled model calls (torch.ops.prism_fast.fused_base_lora) asks pick_base
    when it runs."""
    x, w = torch.randn(4, 32), torch.randn(16, 32)
    a, b = torch.randn(1, 8, 32), torch.randn(1, 16, 8)
    scaling, ids = torch.ones(1, 1), torch.zeros(4, dtype=torch.int32)
    key = configs.base_choice_key(32, (16,), 8, 4)
    try:
        configs.use_choices("cpu", {key: "split"})
        split = torch.ops.prism_fast.fused_base_lora(x, [w], [None], a, b, scaling, ids)[0]
        assert not fused_calls
        configs.use_choices("cpu", {key: None})
        one = torch.ops.prism_fast.fused_base_lora(x, [w], [None], a, b, scaling, ids)[0]
        assert fused_calls == [4]
        torch.testing.assert_close(one, split, rtol=1e-4, atol=1e-4)
    finally:
        configs.use_choices("cpu", {key: None})


def test_base_path_rules_and_bad_values():
    assert [configs.base_path(m, 64, (64,), 8, {}) for m in (1, 64, 65)] == [
        "fused_base", "fused_base", "split"]                      # the opt-in's default
    table = {"base:8": "split", "choices": {"base|64|64|8|8": "fused_base"}}
    assert configs.base_path(5, 64, (64,), 8, table) == "fused_base"   # the group's entry
    assert configs.base_path(5, 64, (32,), 8, table) == "split"        # "base:<M>"
    with pytest.raises(ValueError, match="path: expected one of"):
        configs.use_choices("cpu", {"base|64|64|8|8": "coop"})
    with pytest.raises(ValueError, match="path: expected one of"):
        configs.use_choices("cpu", {"64|64|8|8": "fused_base"})
    with pytest.raises(ValueError, match="choices: expected keys"):
        configs.use_choices("cpu", {"base|64|8|8": "split"})


@pytest.mark.parametrize("bad", [{"base:8": "warp"}, {"choices": {"base|64|64|8|8": "coop"}}])
def test_a_table_with_a_bad_base_value_is_not_used(tmp_path, bad):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"base:1": "split", **bad}))
    assert configs._read_table(path, "cpu") == {}
    path.write_text(json.dumps({"base:1": "split"}))
    assert configs._read_table(path, "cpu") == {"base:1": "split"}


@pytest.mark.parametrize("path", ["fused_base", "linear+split", "linear+fused", "linear+coop"])
def test_what_the_timer_runs_is_the_whole_projection(path):
    """tuning_timers.projection_runner (what the GPU timer graphs, under the interpreter here):
    every slice's x Wᵀ + scale · x A_sᵀ B_sᵀ, by the fused kernel or F.linear + a LoRA path."""
    shape = (64, (32, 16), 8, "float32", "float32")
    run_, (x, a, b, _, _, _), ws = tuning.projection_runner(shape, 3, path,
                                                            torch.device("cpu"), 2.0)
    ys = run_()
    lo = 0
    for s, (w, y) in enumerate(zip(ws, ys)):
        n = w.shape[0]
        u = x @ a[0, s * 8:(s + 1) * 8].t()
        torch.testing.assert_close(y, x @ w.t() + 2.0 * u @ b[0, lo:lo + n].t(),
                                   rtol=1e-4, atol=1e-4)
        lo += n
    with pytest.raises(ValueError, match="path: expected 'fused_base' or 'linear\\+'"):
        tuning.projection_runner(shape, 3, "linear+warp", torch.device("cpu"))
