import pytest

from tests.solver.reference import make_layer


@pytest.fixture
def small_layer():
    return make_layer(6, 16, 48, seed=0)


@pytest.fixture
def medium_layer():
    weight, inputs = make_layer(96, 128, 512, seed=1)
    return weight, inputs, inputs.T @ inputs
