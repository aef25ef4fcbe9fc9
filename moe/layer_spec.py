"""One switch-MoE layer described once (:class:`LayerSpec`), and the checks on it.

``MoESettings.build`` (moe/units.py) makes the spec; the backend that runs the layer takes it whole:
``SwitchMoE(spec)`` (moe/switch.py) or ``DeepSpeedSwitchMoE(spec, ep_size=...)``
(moe/deepspeed_backend.py), and a DeepSpeed layer's local copy is ``SwitchMoE(layer.spec)``.

Every check on MoE hyper-parameters is written here once. The config (``MoESettings``,
``model.config.check_ranges``), the trainer and the layers call the same function, so a message
names the config key the value comes from (``model.matcher.moe.*``) wherever it is raised.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.typed_config import ConfigError  # a ValueError

GATES = ("switch", "published")
DROPPED_POLICIES = ("zero", "passthrough")
KEY = "model.matcher.moe."


def check_top_k(top_k: int, num_experts: int) -> None:
    """1 <= top_k <= num_experts (the first text is the config range check's own)."""
    if top_k < 1:
        raise ConfigError(f"{KEY}top_k: must be >= 1, got {top_k!r}")
    if top_k > num_experts:
        raise ConfigError(f"{KEY}top_k ({top_k}) cannot exceed {KEY}num_experts ({num_experts})")


def check_ep_size(ep_size: int, num_experts: int) -> None:
    """ep_size >= 1 and divides num_experts: each expert-parallel rank holds num_experts / ep_size experts."""
    if ep_size < 1 or num_experts % ep_size:
        raise ConfigError(f"{KEY}ep_size: {ep_size} must be >= 1 and divide num_experts ({num_experts})")


def check_ep_world(ep_size: int, world: int, error: type[Exception] = ConfigError) -> None:
    """ep_size divides the number of processes (the expert-parallel groups tile the world); ``error`` is
    the exception type the caller reports set-up failures with."""
    if world % ep_size:
        raise error(f"{KEY}ep_size={ep_size} must divide the number of processes ({world})")


def check_gate_backend(gate: str, backend: str) -> None:
    """The published gate exists only in the local backend (``SwitchMoE``)."""
    if gate == "published" and backend != "local":
        raise ConfigError("model.matcher.compat: published runs the published gate, which exists only in the local "
                          "backend (model.matcher.moe.backend: local)")


@dataclass(frozen=True)
class LayerSpec:
    """A top-k switch layer over FFN experts ``d_model -> d_ff -> d_out`` (GELU), routed by a
    ``Linear(gate_dim, num_experts)`` router; backend-independent (expert placement, ``ep_size``, is
    the DeepSpeed backend's own argument). ``d_out`` and ``gate_dim`` default to ``d_model``.

    ``gate``: ``switch`` (DeepSpeed ``TopKGate`` semantics) or ``published`` (the published code's
    gate, local backend only). ``dropped``: what a token whose every route the capacity limit drops
    gets: ``zero`` (as DeepSpeed) or ``passthrough`` (its input; needs d_out == d_model).
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    d_out: int | None = None
    gate_dim: int | None = None
    gate: str = "switch"
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = False
    dropped: str = "zero"

    def __post_init__(self) -> None:
        # Frozen: the defaults are filled in through object.__setattr__.
        object.__setattr__(self, "d_out", self.d_out or self.d_model)
        object.__setattr__(self, "gate_dim", self.gate_dim or self.d_model)
        if self.gate not in GATES:
            raise ValueError(f"unknown gate {self.gate!r}; choose one of {GATES}")
        if self.dropped not in DROPPED_POLICIES:
            raise ValueError(f"unknown dropped-token policy {self.dropped!r}; choose one of {DROPPED_POLICIES}")
        check_top_k(self.top_k, self.num_experts)
        if self.dropped == "passthrough" and self.drop_tokens and self.d_out != self.d_model:
            raise ValueError(f"dropped: passthrough needs equal input and output widths, got {self.d_model} -> {self.d_out}")

    @property
    def width(self) -> int:
        """The wider of the input and output widths (what DeepSpeed's layer moves tokens at)."""
        return max(self.d_model, self.d_out)
