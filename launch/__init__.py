"""Launch entry points and configs for `deepspeed launch/train.py`."""
