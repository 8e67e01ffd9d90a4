"""Built-in models (``mlp``, ``cnn``, ``gpt``) and loading a user's ``"package.module:factory"``."""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GPT", "build_model", "cnn", "gpt", "mlp"]


def mlp(
    input_shape: list[int],
    num_classes: int,
    hidden: int = 128,
    depth: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """A ReLU MLP over the flattened input."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(
    input_shape: list[int], num_classes: int, channels: int = 32, batch_norm: bool = True
) -> nn.Module:
    """Two 3x3 conv blocks (with BatchNorm: buffers matter for distributed sync), pool, linear."""
    in_ch = input_shape[0]

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm),
            nn.BatchNorm2d(cout) if batch_norm else nn.Identity(),
            nn.ReLU(),
        ]

    return nn.Sequential(
        *block(in_ch, channels),
        *block(channels, 2 * channels),
        nn.MaxPool2d(2),
        *block(2 * channels, 2 * channels),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * channels, num_classes),
    )


class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )
        self.n_head, self.dropout = n_head, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A small GPT (minGPT/nanoGPT layout) for next-token prediction; logits ``(B, T, vocab)``."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"gpt: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.seq_len = seq_len
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(seq_len, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.wte.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(
                f"gpt: sequence of {t} tokens, but the model was built for {self.seq_len}"
            )
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt(vocab_size: int, seq_len: int, **kwargs: Any) -> nn.Module:
    """See :class:`GPT` for the arguments."""
    return GPT(vocab_size, seq_len, **kwargs)


BUILTIN: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "gpt": gpt}


def _resolve(name: str) -> Callable[..., nn.Module]:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(
            f"[model] name = {name!r}: expected one of {', '.join(BUILTIN)} or 'package.module:factory'"
        )
    module_name, attr = name.split(":", 1)
    module = _import_user_module(module_name, f"[model] name = {name!r}")
    factory = getattr(module, attr, None)
    homes = {module_name.split(".")[0], (getattr(factory, "__module__", None) or "").split(".")[0]}
    stdlib = sorted(h for h in homes if h in sys.stdlib_module_names or h == "builtins")
    if stdlib:
        raise ValueError(
            f"[model] name = {name!r}: {attr!r} comes from the Python standard library "
            f"({stdlib[0]}), not a model factory; refusing to call it"
        )
    if not (inspect.isfunction(factory) or inspect.isclass(factory)):
        raise ValueError(
            f"[model] name = {name!r}: {module_name} has no function or class {attr!r}"
        )
    return factory  # type: ignore[return-value]


def _import_user_module(module_name: str, where: str) -> Any:
    """Import a user's module with the working directory first on ``sys.path``, as
    ``python -m rangerdl`` has it, so the ``rangerdl`` console script finds ``./mymodels.py`` too.

    Raises:
        ValueError: the module cannot be imported, naming where it was looked for.
    """
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"{where}: cannot import {module_name!r} ({exc}); looked in the working directory "
            f"{cwd} and on sys.path ({os.pathsep.join(p for p in sys.path if p)}); put the file "
            "there or install its package"
        ) from exc
    finally:
        if added:
            sys.path.remove(cwd)


def build_model(name: str, args: dict[str, Any], data_info: dict[str, Any]) -> nn.Module:
    """Call the factory with the dataset facts it accepts (``input_shape``, ``num_classes``,
    ``vocab_size``, ``seq_len``) and the user's ``args``; bad arguments name the valid ones."""
    factory = _resolve(name)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if factory is gpt:
        valid += [n for n in inspect.signature(GPT).parameters if n not in valid]
        takes_any = False
    unknown = [k for k in args if k not in valid and not takes_any]
    if unknown:
        raise ValueError(
            f"[model.args] unknown argument(s) {', '.join(unknown)} for model {name!r}; "
            f"valid: {', '.join(v for v in valid if v not in data_info)}"
        )
    kwargs = {k: v for k, v in data_info.items() if k in valid or takes_any}
    kwargs.update(args)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"[model] {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
