"""Which weight tensors of a model get a mask."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn.utils import parametrize

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                                    nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class LayerSelection:
    """Rules that pick prunable layers; the parameters ``parameters`` names (``weight`` by default)
    of each picked layer get a mask.

    ``include`` / ``exclude`` are regular expressions matched (``re.search``) against the module's
    qualified name, e.g. ``"features"`` or ``r"^fc\\d$"``. ``parameters`` names which of a picked
    module's own parameters are masked (regular expressions matched in full): ``"weight"`` for
    Linear and Conv; add the types and names of other layers to mask them too, e.g.
    ``layer_types=(nn.LSTM,), parameters=(r"weight_(ih|hh)_l\\d+",)`` or
    ``(nn.Linear, nn.MultiheadAttention), parameters=("weight", "in_proj_weight")``. Biases and norm
    parameters are not masked by default: they are few and pruning them does not make a model
    smaller.
    """

    layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    exclude_first: bool = False
    exclude_last: bool = False
    parameters: Sequence[str] = ("weight",)

    def __post_init__(self) -> None:
        # A lone string would be read one character at a time: take it as the one pattern it is
        for name in ("include", "exclude", "parameters"):
            value = getattr(self, name)
            if value is None:  # "no patterns"
                value = ()
            if not isinstance(value, str | Iterable):
                raise ValueError(f"LayerSelection {name} must be a regular expression or a list of them, "
                                 f"got {value!r}")
            patterns = (value,) if isinstance(value, str) else tuple(value)
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as err:
                    raise ValueError(f"LayerSelection {name}: {pattern!r} is not a regular expression "
                                     f"({err})") from None
            object.__setattr__(self, name, patterns)
        given = self.layer_types
        types = (given,) if isinstance(given, type | str) or not isinstance(given, Iterable) else tuple(given)
        wrong = [t for t in types if not (isinstance(t, type) and issubclass(t, nn.Module))]
        if wrong or not types:
            hint = " (the class, not an instance: nn.Linear, not nn.Linear(...))" \
                if any(isinstance(t, nn.Module) for t in wrong) else ""
            raise ValueError(f"LayerSelection layer_types must be nn.Module classes, got {given!r}{hint}")
        object.__setattr__(self, "layer_types", types)
        for name in ("exclude_first", "exclude_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LayerSelection {name} must be True or False, got {getattr(self, name)!r}")

    def candidates(self, model: nn.Module) -> list[str]:
        """Qualified names of the modules of ``layer_types`` with a parameter to mask, in
        registration order (``named_modules``). ``exclude_first`` / ``exclude_last`` take the first
        and last of them as the input and output layers: true when layers are registered in the
        order they run, as in most models; otherwise name them with ``exclude``."""
        return [name for name, module in model.named_modules()
                if isinstance(module, self.layer_types) and self._maskable(module)]

    def select(self, model: nn.Module) -> list[str]:
        """Qualified names of the selected modules, in registration order."""
        candidates = self.candidates(model)
        if self.exclude_first and candidates:
            candidates = candidates[1:]
        if self.exclude_last and candidates:
            candidates = candidates[:-1]
        include = [re.compile(p) for p in self.include]
        exclude = [re.compile(p) for p in self.exclude]
        return [name for name in candidates
                if (not include or any(p.search(name) for p in include))
                and not any(p.search(name) for p in exclude)]

    def describe_miss(self, model: nn.Module) -> str:
        """Why nothing is selected: what the rules ask for, and what the model has instead."""
        wanted = (f"{', '.join(t.__name__ for t in self.layer_types)} layers with a parameter named "
                  f"{' or '.join(self.parameters) or '(none)'}")
        candidates = self.candidates(model)
        if candidates:
            rules = [rule for rule, active in (("exclude_first", self.exclude_first),
                                               ("exclude_last", self.exclude_last),
                                               (f"include={list(self.include)}", bool(self.include)),
                                               (f"exclude={list(self.exclude)}", bool(self.exclude))) if active]
            listed = ", ".join(repr(name) for name in candidates[:5]) + (", ..." if len(candidates) > 5 else "")
            return f"{', '.join(rules)} left out every one of the {wanted} ({listed})"
        found: dict[str, set[str]] = {}
        for module in model.modules():
            names = [attr for attr, param in module._parameters.items() if param is not None]
            if names:
                found.setdefault(type(module).__name__, set()).update(names)
        has = "; ".join(f"{kind} ({', '.join(sorted(names))})" for kind, names in found.items()) or "no parameters"
        return (f"it takes {wanted}; the model has {has} "
                "(choose them with LayerSelection(layer_types=..., parameters=...))")

    def select_tensors(self, model: nn.Module) -> list[str]:
        """``"<module>.<parameter>"`` of every tensor to mask, module by module in registration order."""
        return [f"{name}.{attr}" if name else attr
                for name in self.select(model) for attr in self._maskable(model.get_submodule(name))]

    def _maskable(self, module: nn.Module) -> list[str]:
        """The module's own tensors that ``parameters`` names: its parameters, and also tensors
        that something else computes (a parametrization, a ``torch.nn.utils.prune`` hook), so that
        attaching masks to them is reported rather than skipped."""
        patterns = [re.compile(p) for p in self.parameters]
        names = [attr for attr, param in module._parameters.items() if param is not None]
        if parametrize.is_parametrized(module):
            names += list(module.parametrizations)
        names += [attr for attr, value in vars(module).items() if isinstance(value, Tensor)]
        return [attr for attr in dict.fromkeys(names) if any(p.fullmatch(attr) for p in patterns)]


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the tensor named ``"<module>.<attr>"`` (e.g. ``"fc.weight"``), and ``attr``."""
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr
