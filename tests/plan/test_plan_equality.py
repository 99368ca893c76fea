"""Plans compare by value (frequencies bit for bit) and never raise on `==`."""

from __future__ import annotations

import torch

import ropekit
from ropekit.plan.scaling import Scaling


def test_equal_plans_compare_equal_and_different_plans_do_not():
    spec = ropekit.RopeSpec.from_preset("llama2-7b")
    first, again = ropekit.make_plan(spec, 16384, "dprope"), ropekit.make_plan(spec, 16384, "dprope")
    assert first == again
    assert first != ropekit.make_plan(spec, 16384, "yarn")
    assert first != ropekit.make_plan(spec, 32768, "dprope")


def test_scaling_equality_compares_tensors_bit_for_bit():
    inv = torch.tensor([1.0, 0.5], dtype=torch.float32)
    a = Scaling(inv, (1.0, 2.0), details={"t": torch.tensor([1.0])})
    assert a == Scaling(inv.clone(), (1.0, 2.0), details={"t": torch.tensor([1.0])})
    assert a != Scaling(inv.clone(), (1.0, 2.0), details={"t": torch.tensor([1.5])})
    assert a != Scaling(torch.nextafter(inv, torch.tensor(2.0)), (1.0, 2.0), details={"t": torch.tensor([1.0])})
    assert a != Scaling(inv, (1.0, 2.0), details={"t": [1.0]})
