import pytest

from slimkern.fl.budget import Budget, Cost, assign_switch, fits

# hand costs (macs, params) per branch, like a 2-layer net where cost ~ width^2
COSTS = {
    "[1.0]": Cost(((100.0, 40.0),)),
    "[0.75]": Cost(((57.0, 23.0),)),
    "[0.5]": Cost(((26.0, 11.0),)),
    "[0.25]": Cost(((7.0, 3.0),)),
    "[0.5,0.5]": Cost(((26.0, 11.0), (26.0, 11.0))),
    "[4x0.25]": Cost(((7.0, 3.0),) * 4),
}


def cost(sw):
    return COSTS[sw]


def test_best_fitting_single_device():
    assert assign_switch(Budget(macs=100), list(COSTS), cost) == "[1.0]"
    assert assign_switch(Budget(macs=60), list(COSTS), cost) == "[0.75]"
    assert assign_switch(Budget(macs=30), list(COSTS), cost) == "[4x0.25]"  # 28 MACs on one device
    assert assign_switch(Budget(macs=30), list(COSTS), cost, distributed=False) == "[0.5]"
    assert assign_switch(Budget(params=12), list(COSTS), cost) == "[4x0.25]"
    assert assign_switch(Budget(macs=30, params=11), list(COSTS), cost) == "[0.5]"


def test_two_devices_get_paradis_switch():
    assert assign_switch(Budget(macs=30, devices=2), list(COSTS), cost) == "[0.5,0.5]"
    assert assign_switch(Budget(macs=30, devices=2), list(COSTS), cost, distributed=False) == "[0.5]"
    # four quarter branches on two devices: two per device (14 MACs each)
    assert fits(COSTS["[4x0.25]"], Budget(macs=14, devices=2))
    assert not fits(COSTS["[4x0.25]"], Budget(macs=13, devices=2))
    assert fits(COSTS["[4x0.25]"], Budget(macs=7, devices=4))
    assert not fits(COSTS["[4x0.25]"], Budget(macs=7, devices=3))
    assert not fits(COSTS["[0.5,0.5]"], Budget(macs=30))


def test_none_fits_clear_error():
    with pytest.raises(ValueError, match=r"no candidate switch fits .*cheapest, \[0.25\], needs 7 MACs"):
        assign_switch(Budget(macs=5), ["[1.0]", "[0.25]"], cost)
    with pytest.raises(ValueError, match="Budget.devices must be an int >= 1"):
        Budget(devices=0)
    with pytest.raises(ValueError, match="Budget.macs must be a positive number"):
        Budget(macs=-1)
    with pytest.raises(TypeError, match="budget must be a Budget"):
        assign_switch(5, ["[1.0]"], cost)


def test_assignment_by_slimkern_profile():
    import slimkern
    from slimkern import Switch
    from slimkern.fl.budget import profile_cost
    from slimkern.fl.models import small_cnn

    net = small_cnn(channels=(8, 16, 16))
    cost = profile_cost(net, (1, 1, 8, 8))
    cands = [Switch([1.0]), Switch([0.5]), Switch([0.5, 0.5]), Switch([0.25])]
    half = slimkern.profile(net, Switch([0.5]), input_size=(1, 1, 8, 8))
    full = slimkern.profile(net, Switch([1.0]), input_size=(1, 1, 8, 8))
    assert cost(Switch([0.5, 0.5])).macs > cost(Switch([0.5])).macs == pytest.approx(half.macs)
    assert assign_switch(Budget(macs=full.macs), cands, cost) == Switch([1.0])
    assert assign_switch(Budget(macs=half.macs * 1.01), cands, cost) == Switch([0.5])
    assert assign_switch(Budget(macs=half.macs * 1.01, devices=2), cands, cost) == Switch([0.5, 0.5])
    with pytest.raises(ValueError, match=r"cheapest, \[0.25\]x"):
        assign_switch(Budget(macs=1.0), cands, cost)


def test_strategy_switches_per_tier():
    import random

    from slimkern import Switch
    from slimkern.fl.strategy import FedAvg, FedRolex, FjORD, HeteroFL, ParaDiSFL

    tiers = [Switch([1.0]), Switch([0.5]), Switch([0.5, 0.5])]
    p = ParaDiSFL()
    assert [p.client_switch(t, tiers) for t in tiers] == tiers
    assert p.step_switches(Switch([1.0]), None) == [Switch([1.0]), Switch([0.5]), Switch([0.5, 0.5])]
    assert p.step_switches(Switch([0.5, 0.5]), None) == [Switch([0.5, 0.5]), Switch([0.5])]
    assert p.step_switches(Switch([0.5]), None) == [Switch([0.5])]
    assert ParaDiSFL(nested=False).step_switches(Switch([1.0]), None) == [Switch([1.0])]
    assert [HeteroFL().client_switch(t, tiers) for t in tiers] == [Switch([1.0]), Switch([0.5]), Switch([0.5])]
    assert {FedAvg().client_switch(t, tiers) for t in tiers} == {Switch([0.5])}
    from slimkern.fl.rolex import SubModel
    r = FedRolex(step=0.25)  # a dense index-set sub-model per round (test_fl_rules checks the sets)
    assert r.round_switch(Switch([0.5]), 3) == SubModel(Switch([0.5]), 3, 0.25, 1.0)
    assert FedRolex().round_switch(Switch([1.0]), 3) == SubModel(Switch([1.0]), 3, None, 1.0)
    rng = random.Random(0)
    widths = {FjORD().step_switch(Switch([0.5]), rng) for _ in range(50)}
    assert widths == {Switch([0.25]), Switch([0.5])}
