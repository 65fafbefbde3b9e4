"""Model configuration (PhiConfig), presets, and the exact parameter count.

PhiConfig is the architecture only: what a model folder's config.json records. How a model runs
(recompute, loss chunking, attention kernel, sequence parallel, compiled blocks) is a ModelRuntime
(megaphi.model.runtime), chosen by whoever builds the model and never exported.

Field names follow Hugging Face's PhiConfig where one exists; `rotary_dim` replaces HF's
partial_rotary_factor (rotary_dim = factor * head_dim), the dropouts are named
attention_dropout / resid_dropout / embd_dropout (HF: attention_dropout / resid_pdrop / embd_pdrop).
"""

import dataclasses
import json
from dataclasses import dataclass


@dataclass
class PhiConfig:
    vocab_size: int = 51200  # padded vocabulary (rows of the embedding and lm_head)
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    rotary_dim: int = 32  # leading dims of each head that are rotated
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_dropout: float = 0.1  # on attention probabilities, training only (paper)
    resid_dropout: float = 0.1  # on the attention and MLP outputs, training only (paper)
    embd_dropout: float = 0.0
    initializer_range: float = 0.02
    hidden_act: str = "gelu_new"  # tanh-approximated GELU (the only one supported)

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"PhiConfig: {msg}")

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name} must be a positive int")
        need(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
        )
        need(
            0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
            f"rotary_dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}",
        )
        for name in ("attention_dropout", "resid_dropout", "embd_dropout"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1)")
        need(
            self.hidden_act in ("gelu_new", "gelu_pytorch_tanh", "gelu_tanh"),
            f"hidden_act {self.hidden_act!r} is not supported (phi uses tanh GELU, 'gelu_new')",
        )

    def check_tensor_parallel(self, tp):
        """Raise if this config cannot be split over tp ranks."""
        for name, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
        ):
            if value % tp != 0:
                hint = " (pad it: megaphi.parallel.pad_vocab_size)" if name == "vocab_size" else ""
                raise ValueError(f"PhiConfig.{name}={value} is not divisible by tensor-model-parallel size {tp}{hint}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, source="config"):
        """PhiConfig from a dict of its fields; the runtime keys that configs written before the
        architecture/runtime split carry (LEGACY_RUNTIME_KEYS) are ignored, so such a model runs plain."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - set(LEGACY_RUNTIME_KEYS))
        if unknown:
            raise ValueError(f"{source}: unknown PhiConfig field(s) {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json_file(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f), source=str(path))

    def replace(self, **overrides):
        return dataclasses.replace(self, **overrides)


# Runtime choices that config.json files and checkpoint metadata recorded as PhiConfig fields before
# they moved to ModelRuntime; reading such a file skips them.
LEGACY_RUNTIME_KEYS = (
    "recompute",
    "recompute_granularity",
    "recompute_num_layers",
    "loss_chunk_tokens",
    "use_flash_attn",
    "attention_backend",
    "sequence_parallel",
)


PRESETS = {
    "phi-1": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32),
    "phi-1-small": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=16),
    # Tests and smoke runs: 2 layers, head dim 64 with rotary 32 like the real models.
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
    ),
}


def get_preset(name, **overrides):
    """PhiConfig for a preset name ('phi-1', 'phi-1-small', 'tiny') with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PhiConfig(**{**PRESETS[name], **overrides})


def num_parameters(config):
    """Exact parameter count of PhiForCausalLM(config), computed from the config alone."""
    h, f, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    per_layer = (
        2 * h  # shared LayerNorm
        + 3 * h * h
        + 3 * h  # q, k, v
        + h * h
        + h  # dense
        + h * f
        + f  # fc1
        + f * h
        + h
    )  # fc2
    return v * h + n * per_layer + 2 * h + (h * v + v)
