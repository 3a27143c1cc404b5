"""The foolbox adapter: threat norms follow the foolbox attack, minimal-norm attacks are clipped to the ball, the
results match foolbox's own, randomness comes from our generator, and errors are clear."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from robustkit.attacks import FoolboxAttack, get_attack
from robustkit.attacks.foolbox_adapter import foolbox_attack_names, import_foolbox
from robustkit.errors import InputError

pytestmark = pytest.mark.usefixtures("single_thread")

foolbox = import_foolbox()




@pytest.fixture
def frozen(trained_fc):
    """The trained network with frozen parameters, as foolbox's PyTorchModel wants it; restored afterwards."""
    for p in trained_fc.parameters():
        p.requires_grad_(False)
    yield trained_fc
    for p in trained_fc.parameters():
        p.requires_grad_(True)
        p.grad = None


@pytest.mark.parametrize(("name", "options", "threat"), [
    ("LinfPGD", {}, "linf"),
    ("LinfDeepFoolAttack", {}, "linf"),
    ("FGSM", {}, "linf"),
    ("L2PGD", {}, "l2"),
    ("L2CarliniWagnerAttack", {}, "l2"),
    ("L2DeepFoolAttack", {}, "l2"),
    ("InversionAttack", {"distance": "linf"}, "linf"),
    ("InversionAttack", {"distance": "l2"}, "l2"),
])
def test_threat_norm_follows_the_foolbox_attack(name, options, threat):
    assert FoolboxAttack(attack=name, options=options).threat == threat


@pytest.mark.parametrize(("name", "options", "match"), [
    ("L1PGD", {}, "L1 distance"),
    ("L0FMNAttack", {}, "L0 distance"),
    ("SpatialAttack", {}, "no distance of its own"),
    ("InversionAttack", {}, "options={'distance': 'linf'}"),
    ("InversionAttack", {"distance": "l1"}, "'linf' or 'l2'"),
])
def test_attacks_outside_our_threat_models_are_refused(name, options, match):
    with pytest.raises(InputError, match=match):
        FoolboxAttack(attack=name, options=options)


def test_unknown_class_lists_close_matches():
    with pytest.raises(InputError) as info:
        FoolboxAttack(attack="LinfDeepFool")
    message = str(info.value)
    assert "unknown foolbox attack 'LinfDeepFool'" in message
    assert "Did you mean 'LinfDeepFoolAttack'" in message
    assert "L2CarliniWagnerAttack" in message  # the valid classes are listed
    with pytest.raises(InputError, match="Did you mean 'LinfPGD'"):
        FoolboxAttack(attack="linfpgd")
    with pytest.raises(InputError, match="unknown foolbox attack 'Attack'"):
        FoolboxAttack(attack="Attack")  # the abstract base class is not an attack one can run


def test_class_names_come_from_foolbox():
    names = foolbox_attack_names()
    assert {"LinfPGD", "LinfDeepFoolAttack", "L2CarliniWagnerAttack", "FGSM"} <= set(names)
    assert "Attack" not in names and "FixedEpsilonAttack" not in names


def test_bad_options_name_what_the_class_takes():
    with pytest.raises(InputError, match="does not take these options") as info:
        FoolboxAttack(attack="LinfPGD", options={"stepz": 3})
    assert "rel_stepsize" in str(info.value) and "steps" in str(info.value)
    with pytest.raises(InputError, match="restarts"):
        FoolboxAttack(restarts=0)
    with pytest.raises(InputError, match="mapping or"):
        FoolboxAttack(options=[("steps",)])
    with pytest.raises(TypeError):
        FoolboxAttack(attacks="LinfPGD")


def test_options_are_stored_as_sorted_pairs():
    from_mapping = FoolboxAttack(attack="LinfPGD", options={"steps": 10, "abs_stepsize": 0.01})
    from_pairs = FoolboxAttack(attack="LinfPGD", options=(("abs_stepsize", 0.01), ("steps", 10)))
    assert from_mapping.options == (("abs_stepsize", 0.01), ("steps", 10))
    assert from_mapping == from_pairs and hash(from_mapping) == hash(from_pairs)
    assert repr(from_mapping) == (
        "FoolboxAttack(attack='LinfPGD', options=(('abs_stepsize', 0.01), ('steps', 10)), restarts=1)"
    )
    assert from_mapping.option_dict == {"abs_stepsize": 0.01, "steps": 10}
    assert from_mapping.accepts("steps") and not FoolboxAttack(attack="FGSM").accepts("steps")


def test_registered_and_reachable_by_name():
    attack = get_attack("foolbox", attack="LinfDeepFoolAttack")
    assert isinstance(attack, FoolboxAttack) and attack.threat == "linf"
    assert FoolboxAttack().attack == "LinfPGD"


def test_same_result_as_calling_foolbox_directly(frozen, mnist):
    """Without randomness, the adapter's successes are exactly foolbox's own at the same eps."""
    x, y = mnist.test.x[:100], mnist.test.y[:100]
    options = {"steps": 20, "abs_stepsize": 0.01, "random_start": False}
    ours = FoolboxAttack(attack="LinfPGD", options=options)(frozen, x, y, eps=0.06)
    _, clipped, success = foolbox.attacks.LinfPGD(**options)(
        foolbox.PyTorchModel(frozen, bounds=(0, 1), device="cpu"), x, y, epsilons=0.06
    )
    with torch.no_grad():
        clean_wrong = frozen(x).argmax(1) != y
    # foolbox attacks clean-misclassified samples too; robustkit counts them as broken without attacking
    assert torch.equal(ours.success, success | clean_wrong)
    keep = ~clean_wrong
    assert torch.allclose(ours.x_adv[keep], clipped[keep], atol=1e-6)
    assert 0 < int(ours.success.sum()) < 100


@pytest.mark.parametrize(("name", "eps"), [("LinfDeepFoolAttack", 0.04), ("L2CarliniWagnerAttack", 0.8)])
def test_minimal_norm_attacks_are_clipped_to_the_ball(name, eps, frozen, mnist):
    """Minimal-norm attacks look for the smallest perturbation, which can be larger than eps; the adapter calls
    them with eps, so what it returns lies in the ball and counts only if it still fools the model there."""
    x, y = mnist.test.x[:60], mnist.test.y[:60]
    options = {"steps": 30} if name == "LinfDeepFoolAttack" else {"steps": 50, "binary_search_steps": 3}
    attack = FoolboxAttack(attack=name, options=options)
    result = attack(frozen, x, y, eps=eps)
    p = float("inf") if attack.threat == "linf" else 2.0
    distance = (result.x_adv - x).flatten(1).norm(p=p, dim=1)
    assert float(distance.max()) <= eps + 1e-5
    with torch.no_grad():
        assert torch.equal(result.success, frozen(result.x_adv).argmax(1) != y)
    # the unconstrained minimal perturbation exceeds eps for some samples, so the clipping did matter
    raw, _, _ = getattr(foolbox.attacks, name)(**options)(
        foolbox.PyTorchModel(frozen, bounds=(0, 1), device="cpu"), x, y, epsilons=None
    )
    raw_distance = (raw - x).flatten(1).norm(p=p, dim=1)
    assert bool((raw_distance > eps + 1e-3).any())
    assert 0 < int(result.success.sum()) < 60


def test_randomness_comes_from_the_generator(trained_fc, mnist):
    x, y = mnist.test.x[:40], mnist.test.y[:40]
    attack = FoolboxAttack(attack="LinfPGD", options={"steps": 3})
    global_state = torch.get_rng_state()
    first = attack(trained_fc, x, y, eps=0.1, generator=torch.Generator().manual_seed(5))
    second = attack(trained_fc, x, y, eps=0.1, generator=torch.Generator().manual_seed(5))
    other = attack(trained_fc, x, y, eps=0.1, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), global_state)  # the global generator is left as it was
    assert torch.equal(first.x_adv, second.x_adv)
    assert not torch.equal(first.x_adv, other.x_adv)  # a different seed gives different random starts


def test_restarts_rerun_on_the_robust_samples_and_only_help(trained_fc, mnist):
    x, y = mnist.test.x[:100], mnist.test.y[:100]
    one = FoolboxAttack(options={"steps": 3}, restarts=1)(trained_fc, x, y, eps=0.06,
                                                          generator=torch.Generator().manual_seed(1))
    three = FoolboxAttack(options={"steps": 3}, restarts=3)(trained_fc, x, y, eps=0.06,
                                                            generator=torch.Generator().manual_seed(1))
    assert torch.all(three.success[one.success]) and three.robust_accuracy <= one.robust_accuracy


def test_zero_eps_returns_the_inputs(trained_fc, mnist):
    x, y = mnist.test.x[:10], mnist.test.y[:10]
    result = FoolboxAttack(attack="LinfDeepFoolAttack")(trained_fc, x, y, eps=0.0)
    assert torch.equal(result.x_adv, x)


def test_missing_foolbox_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "foolbox", None)  # makes "import foolbox" raise ImportError
    with pytest.raises(InputError, match=r"needs the foolbox package \(pip install"):
        FoolboxAttack()


def test_imports_without_git_and_without_warnings(tmp_path):
    """foolbox imports GitPython, which fails without a git executable unless GIT_PYTHON_REFRESH=quiet: the
    adapter sets it before importing foolbox. Warnings are errors here, so the import is also quiet."""
    env = {k: v for k, v in os.environ.items() if k != "GIT_PYTHON_REFRESH"}
    env["PATH"] = str(tmp_path)  # no git on the PATH
    code = "from robustkit.attacks import FoolboxAttack; print(FoolboxAttack(attack='FGSM').threat)"
    finished = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True,
                              check=False)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "linf" and finished.stderr == ""
