import pytest

from venom_hf.format import VNMSpec
from venom_hf.pruning import VNMSchedule


@pytest.mark.parametrize("spec", ["64:2:8", "64:2:16", "1:2:4", "128:3:10"])
@pytest.mark.parametrize("ramp", ["cubic", "linear"])
def test_levels_and_times(spec, ramp):
    s = VNMSchedule(spec, 10, 200, ramp=ramp)
    steps = s.steps()
    sp = VNMSpec.parse(spec)
    assert [x.n for _, x in steps] == list(range(sp.m - 1, sp.n - 1, -1))
    times = [t for t, _ in steps]
    assert times[0] == 10 and times[-1] == 200 and times == sorted(set(times))
    assert all(x.v == sp.v and x.m == sp.m for _, x in steps)
    if ramp == "linear":
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert max(gaps) - min(gaps) <= 1


def test_cubic_prunes_early():
    cub = VNMSchedule("64:2:8", 0, 100, ramp="cubic").steps()
    lin = VNMSchedule("64:2:8", 0, 100, ramp="linear").steps()
    assert all(c[0] <= l[0] for c, l in zip(cub, lin))


def test_recipe_path_and_num_steps():
    s = VNMSchedule("64:2:8", 2, 14, init_n=5, ramp="linear")
    assert [(t, str(x)) for t, x in s.steps()] == [(2, "64:5:8"), (6, "64:4:8"), (10, "64:3:8"), (14, "64:2:8")]
    s = VNMSchedule("64:2:16", 0, 100, init_n=9, num_steps=4, ramp="linear")
    ns = [x.n for _, x in s.steps()]
    assert ns[0] == 9 and ns[-1] == 2 and ns == sorted(ns, reverse=True)
    assert s.spec_at(0).n == 9 and s.spec_at(100).n == 2 and s.next_step(100) is None


def test_errors():
    with pytest.raises(ValueError):
        VNMSchedule("64:2:8", 0, 3)  # 6 levels in 4 steps
    with pytest.raises(ValueError):
        VNMSchedule("64:2:8", 0, 10, init_n=8)
    with pytest.raises(ValueError):
        VNMSchedule("64:2:8", 0, 10, ramp="exp")
