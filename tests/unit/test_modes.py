"""model/modes.py: eval_mode gives the caller's training flag back, after an exception too."""

import pytest
from torch import nn

from model.modes import eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_the_previous_mode_comes_back_on_every_way_out(training):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train(training)
    with eval_mode(model) as m:
        assert m is model and not model.training and not model[1].training
    assert model.training is training and model[1].training is training
    with pytest.raises(KeyboardInterrupt), eval_mode(model):
        raise KeyboardInterrupt
    assert model.training is training and model[1].training is training
